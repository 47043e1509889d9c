//! Port lists: the `opensandbox.io/exposed-ports` annotation (which doors of a sandbox are open
//! on purpose) and `--denied-ports` (doors never opened through the gateway), both written as
//! `"8080,3000,9000-9010"`.

use std::fmt;

/// A set of ports as sorted, merged inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet(Box<[(u16, u16)]>);

/// Why a port list could not be read; names the offending item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    #[error("empty item in {0:?}")]
    Empty(String),
    #[error("{0:?} is not a port (1-65535)")]
    NotAPort(String),
    #[error("range {0:?} ends before it starts")]
    Backwards(String),
    #[error("more than {MAX_ITEMS} items")]
    TooMany,
}

/// Longest list accepted: annotations are user-written and the gateway holds one per sandbox.
const MAX_ITEMS: usize = 256;

impl PortSet {
    /// Parses `"8080, 3000,9000-9010"`. An empty or blank string is the empty set.
    pub fn parse(text: &str) -> Result<Self, PortsError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::default());
        }
        let mut ranges = Vec::new();
        for item in text.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(PortsError::Empty(text.chars().take(64).collect()));
            }
            if ranges.len() == MAX_ITEMS {
                return Err(PortsError::TooMany);
            }
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (port(a.trim(), item)?, port(b.trim(), item)?),
                None => {
                    let p = port(item, item)?;
                    (p, p)
                }
            };
            if hi < lo {
                return Err(PortsError::Backwards(item.to_owned()));
            }
            ranges.push((lo, hi));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(Self(merged.into()))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < port {
                    std::cmp::Ordering::Less
                } else if lo > port {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn port(text: &str, item: &str) -> Result<u16, PortsError> {
    // Digits only: `+80`, ` 80` inside a range or `0x50` are not ports.
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortsError::NotAPort(item.chars().take(32).collect()));
    }
    match text.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PortsError::NotAPort(item.chars().take(32).collect())),
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reads_lists_and_ranges() {
        let s = PortSet::parse("8080, 3000,9000-9010").unwrap();
        for p in [8080, 3000, 9000, 9005, 9010] {
            assert!(s.contains(p), "{p}");
        }
        for p in [1, 2999, 3001, 8999, 9011, 18080, 65535] {
            assert!(!s.contains(p), "{p}");
        }
        assert_eq!(s.to_string(), "3000,8080,9000-9010");
        assert_eq!(PortSet::parse("1-10,5-20,21").unwrap().to_string(), "1-21");
        assert!(PortSet::parse("  ").unwrap().is_empty());
        assert!(PortSet::parse("1-65535").unwrap().contains(65535));
    }

    #[test]
    fn refuses_what_is_not_a_port_list() {
        for bad in [
            "80,", ",80", "80,,81", "0", "65536", "+80", "0x50", "http", "80-", "-80", "90-80",
            "1-2-3", "80 81", "８０",
        ] {
            assert!(PortSet::parse(bad).is_err(), "{bad:?} accepted");
        }
        let many = (1..=300)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        assert!(PortSet::parse(&many).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(text in "[0-9, \\-a-z]{0,40}") {
            let _ = PortSet::parse(&text);
        }

        #[test]
        fn contains_exactly_the_listed_ports(ranges in proptest::collection::vec((1u16..2000, 0u16..50), 1..20), probe in 1u16..2100) {
            let text = ranges.iter().map(|(lo, len)| format!("{lo}-{}", lo.saturating_add(*len))).collect::<Vec<_>>().join(",");
            let set = PortSet::parse(&text).unwrap();
            let expected = ranges.iter().any(|(lo, len)| (*lo..=lo.saturating_add(*len)).contains(&probe));
            prop_assert_eq!(set.contains(probe), expected);
            prop_assert_eq!(PortSet::parse(&set.to_string()).unwrap(), set);
        }
    }
}
