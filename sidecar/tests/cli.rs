//! The sidecar's command line: settings come from the environment, so `--version` and `--help`
//! answer and anything else is refused rather than ignored.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_egress-sidecar"))
        .args(args)
        .env_clear()
        .output()
        .unwrap_or_else(|e| panic!("start the sidecar: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_help_and_refused_arguments() {
    let (code, out, _) = run(&["--version"]);
    assert_eq!(
        (code, out.trim()),
        (0, concat!("egress-sidecar ", env!("CARGO_PKG_VERSION")))
    );
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("OPENSANDBOX_EGRESS_"), "{out}");
    let (code, _, err) = run(&["--mode", "dns"]);
    assert_eq!(code, 2);
    assert!(err.contains("unexpected arguments"), "{err}");
}
