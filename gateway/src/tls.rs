//! TLS on the listener: certificate/key pairs chosen per handshake by SNI, reloaded from disk.
//!
//! Each pair is a PEM chain and its key (`--tls-cert-file`, `--tls-key-file`, repeated for
//! more pairs). A handshake gets the pair whose certificate names the SNI host exactly, else the
//! one with a wildcard for its parent (`*.sandbox.example.com` for `a-80.sandbox.example.com`,
//! one label deep, as RFC 6125 matches), else the first pair. The files are polled every
//! second; when one changes, every pair is read again and swapped in at once for the handshakes
//! that follow (open connections keep the certificate they started with). A pair that does not
//! load (unreadable, not PEM, a key that does not match its certificate) keeps the previous set
//! in force, logged and counted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::metrics::metrics;

/// How often the files are checked for changes.
const POLL: Duration = Duration::from_secs(1);

/// One certificate chain and its key, as named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A loaded pair.
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// DNS names of the leaf (subjectAltName, else the common name), lower case.
    names: Vec<String>,
    /// The leaf's notAfter, Unix seconds.
    not_after: i64,
    /// How the metric names it: the first name, else the file.
    label: String,
}

/// Every pair, indexed for the handshake.
#[derive(Debug, Default)]
pub struct Certificates {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `sandbox.example.com` for a `*.sandbox.example.com` certificate.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    /// (label, notAfter) per pair, for the expiry metric.
    expiry: Vec<(String, i64)>,
}

impl Certificates {
    /// Reads every pair; the first error names the file.
    pub fn load(pairs: &[Pair]) -> Result<Certificates, String> {
        let mut set = Certificates::default();
        for pair in pairs {
            let loaded = load_pair(pair)?;
            for name in &loaded.names {
                match name.strip_prefix("*.") {
                    Some(parent) => {
                        set.wildcard
                            .entry(parent.to_owned())
                            .or_insert_with(|| loaded.key.clone());
                    }
                    None => {
                        set.exact
                            .entry(name.clone())
                            .or_insert_with(|| loaded.key.clone());
                    }
                }
            }
            set.default.get_or_insert_with(|| loaded.key.clone());
            set.expiry.push((loaded.label, loaded.not_after));
        }
        Ok(set)
    }

    /// The pair for an SNI host name (`None`: no SNI, as with an address).
    pub fn choose(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(host) = sni.map(|h| h.trim_end_matches('.').to_ascii_lowercase()) {
            if let Some(k) = self.exact.get(&host) {
                return Some(k.clone());
            }
            if let Some((_, parent)) = host.split_once('.')
                && let Some(k) = self.wildcard.get(parent)
            {
                return Some(k.clone());
            }
        }
        self.default.clone()
    }
}

fn load_pair(pair: &Pair) -> Result<Loaded, String> {
    let cert_name = pair.cert.display();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
        .map_err(|e| format!("{cert_name}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_name}: {e}"))?;
    let leaf = chain
        .first()
        .ok_or_else(|| format!("{cert_name}: no certificate in the file"))?;
    let key = PrivateKeyDer::from_pem_file(&pair.key)
        .map_err(|e| format!("{}: no private key read: {e}", pair.key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("{}: {e}", pair.key.display()))?;
    let (names, not_after) = leaf_facts(leaf).map_err(|e| format!("{cert_name}: {e}"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{} does not belong to {cert_name}: {e}", pair.key.display()))?;
    let label = names
        .first()
        .cloned()
        .unwrap_or_else(|| cert_name.to_string());
    Ok(Loaded {
        key: Arc::new(certified),
        names,
        not_after,
        label,
    })
}

/// The leaf's DNS names and notAfter.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(|cn| cn.to_ascii_lowercase()),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// The certificate chooser Pingora's TLS listener asks at each handshake.
#[derive(Debug)]
pub struct Resolver {
    current: ArcSwap<Certificates>,
}

impl Resolver {
    pub fn new(certs: Certificates) -> Arc<Resolver> {
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(certs),
        });
        resolver.report();
        resolver
    }

    /// Updates the seconds-left gauge of every certificate in force.
    fn report(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let gauge = &metrics().tls_expiry;
        gauge.reset();
        for (label, not_after) in &self.current.load().expiry {
            gauge.with_label_values(&[label]).set(not_after - now);
        }
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load().choose(hello.server_name())
    }
}

/// Size and modification time of each file, to notice a change without reading.
fn stamps(pairs: &[Pair]) -> Vec<Option<(u64, SystemTime)>> {
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).ok()?;
        Some((m.len(), m.modified().ok()?))
    };
    pairs
        .iter()
        .flat_map(|p| [stamp(&p.cert), stamp(&p.key)])
        .collect()
}

/// Reloads the pairs when their files change.
pub struct Reloader {
    pub pairs: Vec<Pair>,
    pub resolver: Arc<Resolver>,
}

#[async_trait::async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut seen = stamps(&self.pairs);
        let mut tick = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            let now = stamps(&self.pairs);
            if now != seen {
                seen = now;
                match Certificates::load(&self.pairs) {
                    Ok(certs) => {
                        tracing::info!(pairs = self.pairs.len(), "TLS certificates reloaded");
                        self.resolver.current.store(Arc::new(certs));
                    }
                    Err(error) => {
                        metrics().tls_reload_errors.inc();
                        tracing::error!(%error, "TLS certificates not reloaded; the previous ones stay in force");
                    }
                }
            }
            self.resolver.report();
        }
    }
}
