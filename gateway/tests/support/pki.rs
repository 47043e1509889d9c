//! A test certificate authority made with the real `openssl` command, and leaf certificates
//! it signs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` arguments for a new P-256 key, unencrypted.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// A test CA in `dir`, and leaf certificates it signs.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        openssl(
            dir,
            &[
                &["req", "-x509"][..],
                &NEW_KEY,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-subj",
                    "/CN=test CA",
                    "-days",
                    "30",
                ],
            ]
            .concat(),
        );
        Pki {
            dir: dir.to_owned(),
        }
    }

    /// `<name>.pem` and `<name>.key` for `dns` names, valid `days`.
    pub fn leaf(&self, name: &str, dns: &[&str], days: u32) -> (PathBuf, PathBuf) {
        let ext = format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
            dns.iter()
                .map(|d| format!("DNS:{d}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        std::fs::write(self.dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, pem) = (
            format!("{name}.key.new"),
            format!("{name}.csr"),
            format!("{name}.pem.new"),
        );
        let subject = format!("/CN={}", dns[0]);
        openssl(
            &self.dir,
            &[
                &["req"][..],
                &NEW_KEY,
                &["-keyout", &key, "-out", &csr, "-subj", &subject],
            ]
            .concat(),
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                &days.to_string(),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        // Into place by rename, as a Secret volume update or cert-manager would.
        let (pem_final, key_final) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::rename(self.dir.join(&key), &key_final).unwrap();
        std::fs::rename(self.dir.join(&pem), &pem_final).unwrap();
        (pem_final, key_final)
    }

    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.dir.join("ca.pem")).unwrap())
            .unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }
}
