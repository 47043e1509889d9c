//! Which sandbox addresses may be dialled (`--allowed-upstream-cidrs`). By default everything
//! except link-local (cloud metadata lives there) and unspecified addresses; an address outside
//! the policy is dropped from the route table, so it is never dialled.

use std::net::IpAddr;
use std::str::FromStr;

/// An address block `ip/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, normalize(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Clone, Default)]
pub struct UpstreamPolicy {
    /// `None`: the default policy.
    allowed: Option<Vec<Cidr>>,
}

impl UpstreamPolicy {
    /// Parses a comma-separated list; an empty string means the default policy.
    pub fn parse(list: &str) -> Result<Self, String> {
        let cidrs: Vec<Cidr> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            allowed: if cidrs.is_empty() { None } else { Some(cidrs) },
        })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = normalize(ip);
        if ip.is_unspecified() || is_broadcast(ip) {
            return false;
        }
        match &self.allowed {
            Some(cidrs) => cidrs.iter().any(|c| c.contains(ip)),
            None => !is_link_local(ip),
        }
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_refuses_link_local_and_unspecified() {
        let p = UpstreamPolicy::default();
        for bad in [
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "::ffff:169.254.169.254",
            "255.255.255.255",
        ] {
            assert!(!p.permits(ip(bad)), "{bad}");
        }
        for good in ["10.0.0.1", "127.0.0.2", "fd00::1", "2001:db8::1"] {
            assert!(p.permits(ip(good)), "{good}");
        }
    }

    #[test]
    fn explicit_lists() {
        let p = UpstreamPolicy::parse("10.0.0.0/8, fd00::/8,127.0.0.5").unwrap();
        assert!(
            p.permits(ip("10.200.3.4")) && p.permits(ip("fd12::1")) && p.permits(ip("127.0.0.5"))
        );
        assert!(!p.permits(ip("127.0.0.6")) && !p.permits(ip("192.168.1.1")));
        assert!(
            UpstreamPolicy::parse("0.0.0.0/0")
                .unwrap()
                .permits(ip("169.254.1.1"))
        );
        assert!(UpstreamPolicy::parse("10.0.0.0/33").is_err());
        assert!(UpstreamPolicy::parse("ten/8").is_err());
        assert!(UpstreamPolicy::parse("").unwrap().permits(ip("1.2.3.4")));
    }
}
