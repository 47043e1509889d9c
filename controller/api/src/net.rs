//! Address blocks and the special address classes every part judges the same way: the gateway
//! (which upstreams it may dial), the controller (which endpoints it publishes) and the sidecar
//! (policy rules, DNS answers it strips).
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are judged as the IPv4 address they carry, so
//! no rule or check can be sidestepped by spelling an address the other way.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address as (is IPv6, bits); IPv4 and IPv4-mapped addresses are IPv4.
pub fn bits(ip: IpAddr) -> (bool, u128) {
    match canonical(ip) {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (true, u128::from(v6)),
    }
}

/// IPv4-mapped IPv6 addresses become the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn width(v6: bool) -> u32 {
    if v6 { 128 } else { 32 }
}

/// `value` with everything past `prefix` bits cleared.
pub fn mask(v6: bool, value: u128, prefix: u8) -> u128 {
    let host = width(v6) - u32::from(prefix).min(width(v6));
    if host >= 128 {
        0
    } else {
        value & (u128::MAX << host) & (u128::MAX >> (128 - width(v6)))
    }
}

/// An address block: an address and a prefix length (a single address when the prefix is the
/// full width). The address is stored masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub v6: bool,
    pub bits: u128,
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or CIDR")]
    NotAnAddress(String),
    #[error("{0:?} has an invalid prefix length")]
    Prefix(String),
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ip` or `ip/prefix`; the prefix may not exceed the written address's width.
    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let s = text.trim();
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| CidrError::NotAnAddress(s.to_owned()))?;
        let written: u8 = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => written,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= written)
                .ok_or_else(|| CidrError::Prefix(s.to_owned()))?,
        };
        // A block of IPv4-mapped addresses is the IPv4 block 96 bits shorter; a wider block
        // stays IPv6 (it covers more than mapped addresses).
        Ok(match ip {
            IpAddr::V6(v6) if prefix < 96 || v6.to_ipv4_mapped().is_none() => {
                Cidr::new(true, u128::from(v6), prefix)
            }
            IpAddr::V6(_) => Cidr::new(false, bits(ip).1, prefix - 96),
            IpAddr::V4(v4) => Cidr::new(false, u128::from(u32::from(v4)), prefix),
        })
    }
}

impl Cidr {
    pub fn new(v6: bool, value: u128, prefix: u8) -> Cidr {
        let prefix = prefix.min(if v6 { 128 } else { 32 });
        Cidr {
            v6,
            bits: mask(v6, value, prefix),
            prefix,
        }
    }

    /// The block of exactly one address.
    pub fn host(ip: IpAddr) -> Cidr {
        let (v6, value) = bits(ip);
        Cidr::new(v6, value, if v6 { 128 } else { 32 })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v6, value) = bits(ip);
        v6 == self.v6 && mask(v6, value, self.prefix) == self.bits
    }

    /// First and last address of the block, as bits.
    pub fn range(&self) -> (u128, u128) {
        let host = width(self.v6) - u32::from(self.prefix);
        let span = if host >= 128 {
            u128::MAX
        } else {
            (1u128 << host) - 1
        };
        (self.bits, self.bits | span)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.v6 {
            write!(f, "{}/{}", Ipv6Addr::from(self.bits), self.prefix)
        } else {
            let v4 = Ipv4Addr::from(u32::try_from(self.bits).unwrap_or(u32::MAX));
            write!(f, "{v4}/{}", self.prefix)
        }
    }
}

/// Parses a comma-separated list of blocks (empty entries skipped).
pub fn parse_list(list: &str) -> Result<Vec<Cidr>, CidrError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

/// The cloud metadata endpoints outside link-local space (Alibaba Cloud's, AWS's IPv6 one).
const METADATA_V4: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
const METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// Azure's wire server (platform metadata and agent traffic).
const WIRE_SERVER_V4: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);

/// Link-local (169.254.0.0/16, fe80::/10), where most clouds serve instance metadata.
pub fn is_link_local(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Link-local, the unspecified address, or a known cloud metadata address: never a place an
/// untrusted name or object should send traffic to.
pub fn is_metadata(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    is_link_local(ip)
        || ip.is_unspecified()
        || ip == IpAddr::V4(METADATA_V4)
        || ip == IpAddr::V4(WIRE_SERVER_V4)
        || ip == IpAddr::V6(METADATA_V6)
}

/// Addresses inside the host or the cluster's private networks: loopback, RFC 1918,
/// shared address space 100.64.0.0/10 (also used by cluster networks), IPv6 unique local
/// fc00::/7. A public name answering with one of these is a DNS rebinding attempt.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback() || v4.is_private() || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_blocks_and_rejects_bad_ones() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains(ip("10.255.0.1")) && !c.contains(ip("11.0.0.1")));
        assert!(
            c.contains(ip("::ffff:10.0.0.1")),
            "mapped form of a v4 address"
        );
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped, "10.0.0.0/8".parse().unwrap());
        let wide: Cidr = "::ffff:0:0/80".parse().unwrap();
        assert!(wide.v6);
        assert_eq!("2001:db8::1".parse::<Cidr>().unwrap().prefix, 128);
        assert_eq!(
            "0.0.0.0/0".parse::<Cidr>().unwrap().range(),
            (0, u128::from(u32::MAX))
        );
        assert_eq!("::/0".parse::<Cidr>().unwrap().range(), (0, u128::MAX));
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/",
            "10.0.0/8",
            "host",
            "1.2.3.4/-1",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            parse_list(" 10.0.0.0/8, ,fd00::/8").unwrap().len(),
            2,
            "empty entries skipped"
        );
        assert!(parse_list("10.0.0.0/8,nope").is_err());
    }

    #[test]
    fn classes() {
        for a in [
            "169.254.169.254",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.1.1",
            "0.0.0.0",
            "::",
        ] {
            assert!(is_metadata(ip(a)), "{a}");
        }
        for a in [
            "198.51.100.10",
            "2001:db8::1",
            "100.100.100.201",
            "10.0.0.1",
        ] {
            assert!(!is_metadata(ip(a)), "{a}");
        }
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "::1",
            "fd00::1",
            "fc00::1",
            "::ffff:10.1.1.1",
        ] {
            assert!(is_private(ip(a)), "{a}");
        }
        for a in [
            "198.51.100.10",
            "172.32.0.1",
            "100.128.0.1",
            "100.63.255.255",
            "2001:db8::1",
            "fe80::1",
            "8.8.8.8",
        ] {
            assert!(!is_private(ip(a)), "{a}");
        }
    }

    proptest! {
        #[test]
        fn a_block_contains_exactly_its_range(a in any::<u32>(), b in any::<u32>(), p in 0u8..=32) {
            let c = Cidr::new(false, u128::from(a), p);
            let (lo, hi) = c.range();
            let x = u128::from(b);
            prop_assert_eq!(c.contains(IpAddr::V4(Ipv4Addr::from(b))), lo <= x && x <= hi);
            prop_assert_eq!(c.to_string().parse::<Cidr>().unwrap(), c);
        }

        #[test]
        fn v6_blocks_round_trip(a in any::<u128>(), p in 0u8..=128) {
            let c = Cidr::new(true, a, p);
            if Ipv6Addr::from(c.bits).to_ipv4_mapped().is_none() {
                prop_assert_eq!(c.to_string().parse::<Cidr>().unwrap(), c);
            }
            prop_assert!(c.contains(IpAddr::V6(Ipv6Addr::from(a))) || Ipv6Addr::from(a).to_ipv4_mapped().is_some());
        }
    }
}
