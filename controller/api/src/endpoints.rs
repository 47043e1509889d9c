//! The endpoints annotation: a compact JSON array of addresses, one per replica.

use std::net::IpAddr;

/// Why an endpoints annotation cannot be used for routing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointsError {
    #[error("missing sandbox.opensandbox.io/endpoints annotation")]
    Missing,
    #[error("failed to parse endpoints annotation: {0}")]
    Invalid(String),
    #[error("endpoints annotation contains no IPs")]
    Empty,
}

/// Encodes addresses the way the controller publishes them: `["10.0.0.1","10.0.0.2"]`.
pub fn encode(addresses: &[String]) -> String {
    // Serializing a slice of strings cannot fail.
    serde_json::to_string(addresses).unwrap_or_else(|_| String::from("[]"))
}

/// Parses the annotation value and keeps the entries that are IP literals, in order.
///
/// Empty entries (a replica without an IP yet) and entries that are not addresses are skipped;
/// a list with no usable entry is an error so a sandbox is never routed to nowhere.
pub fn parse(value: Option<&str>) -> Result<Vec<IpAddr>, EndpointsError> {
    let value = value
        .filter(|v| !v.trim().is_empty())
        .ok_or(EndpointsError::Missing)?;
    let entries: Vec<String> =
        serde_json::from_str(value).map_err(|e| EndpointsError::Invalid(e.to_string()))?;
    let usable: Vec<IpAddr> = entries
        .iter()
        .filter_map(|entry| parse_address(entry))
        .collect();
    if usable.is_empty() {
        return Err(EndpointsError::Empty);
    }
    Ok(usable)
}

fn parse_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    // Accept the bracketed IPv6 form too; it is how addresses are often written next to a port.
    let entry = entry
        .strip_prefix('[')
        .and_then(|e| e.strip_suffix(']'))
        .unwrap_or(entry);
    entry.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_usable_addresses_in_order() {
        let got = parse(Some(
            r#"["", "10.0.0.2", "not-an-ip", "[fd00::1]", "10.0.0.1"]"#,
        ));
        let want: Vec<IpAddr> = ["10.0.0.2", "fd00::1", "10.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, Ok(want));
    }

    #[test]
    fn rejects_unusable_annotations() {
        assert_eq!(parse(None), Err(EndpointsError::Missing));
        assert_eq!(parse(Some(" ")), Err(EndpointsError::Missing));
        assert!(matches!(
            parse(Some("10.0.0.1")),
            Err(EndpointsError::Invalid(_))
        ));
        assert!(matches!(
            parse(Some(r#"{"a":1}"#)),
            Err(EndpointsError::Invalid(_))
        ));
        assert!(matches!(
            parse(Some("[1,2]")),
            Err(EndpointsError::Invalid(_))
        ));
        assert_eq!(parse(Some("[]")), Err(EndpointsError::Empty));
        assert_eq!(parse(Some(r#"["",""]"#)), Err(EndpointsError::Empty));
    }

    #[test]
    fn encode_is_compact() {
        let got = encode(&["127.0.0.3".into(), "127.0.0.4".into()]);
        assert_eq!(got, r#"["127.0.0.3","127.0.0.4"]"#);
    }

    proptest::proptest! {
        /// What the controller publishes (addresses in index order, `""` for a pod without
        /// one) is what the gateway reads back: the addresses, in order, blanks skipped.
        #[test]
        fn published_addresses_read_back_in_order(
            slots in proptest::collection::vec(proptest::option::of(proptest::prelude::any::<IpAddr>()), 0..12),
        ) {
            let written: Vec<String> = slots
                .iter()
                .map(|s| s.map(|ip| ip.to_string()).unwrap_or_default())
                .collect();
            let want: Vec<IpAddr> = slots.iter().flatten().copied().collect();
            let got = parse(Some(&encode(&written)));
            if want.is_empty() {
                proptest::prop_assert_eq!(got, Err(EndpointsError::Empty));
            } else {
                proptest::prop_assert_eq!(got, Ok(want));
            }
        }

        #[test]
        fn any_annotation_parses_or_is_refused_without_panicking(text in "\\PC{0,120}") {
            if let Ok(ips) = parse(Some(&text)) {
                proptest::prop_assert!(!ips.is_empty());
            }
        }
    }
}
