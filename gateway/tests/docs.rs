//! The README keeps up with the gateway: every flag `--help` lists and every metric family the
//! gateway exports or registers is documented there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::{GatewayOptions, TempDir, gateway_binary};

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap()
}

#[test]
fn every_flag_is_in_the_readme() {
    let help = Command::new(gateway_binary())
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let readme = readme();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .split([' ', ',', '='])
                .find(|w| w.starts_with("--"))
        })
        .filter(|f| *f != "--help" && *f != "--version")
        .collect();
    assert!(flags.len() > 40, "{flags:?}");
    let missing: Vec<_> = flags
        .iter()
        .filter(|f| !readme.contains(&format!("`{f}`")) && !readme.contains(&format!("`{f} ")))
        .collect();
    assert!(missing.is_empty(), "flags not in the README: {missing:?}");
}

#[test]
fn every_metric_is_in_the_readme() {
    let dir = TempDir::new();
    let file = dir.write("s.yaml", "apiVersion: v1\nkind: List\nitems: []\n");
    let gw = support::Gateway::start(&file, GatewayOptions::default());
    // Some traffic, so the labelled families have children to export.
    support::client::get(gw.addr, "/", &[("Host", "nobox-80.gw")]);
    let body = support::client::blocking_get(gw.metrics, "/metrics")
        .unwrap()
        .body_text();
    let readme = readme();
    let mut families: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|n| n.starts_with("sandbox_gateway_"))
        .collect();
    // Labelled families are exported only once they have a child (an h2 flood, a failed TLS
    // handshake): the names registered in the source cover those.
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs")).unwrap();
    let registered: Vec<&str> = source
        .split('"')
        .filter(|w| w.starts_with("sandbox_gateway_"))
        .collect();
    assert!(registered.len() > 20, "{registered:?}");
    families.extend(registered);
    families.sort_unstable();
    families.dedup();
    assert!(families.len() > 20, "{families:?}");
    let missing: Vec<_> = families
        .iter()
        .filter(|name| !documented(&readme, name))
        .collect();
    assert!(missing.is_empty(), "metrics not in the README: {missing:?}");
}

/// `name` in backticks, or as the second of a pair written `x_loads_total` / `_errors_total`.
fn documented(readme: &str, name: &str) -> bool {
    if readme.contains(&format!("`{name}`")) {
        return true;
    }
    let Some(base) = name.strip_suffix("_total") else {
        return false;
    };
    let Some((stem, last)) = base.rsplit_once('_') else {
        return false;
    };
    readme.contains(&format!("` / `_{last}_total`")) && readme.contains(&format!("`{stem}_"))
}
