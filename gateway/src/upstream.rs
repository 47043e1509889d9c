//! Which sandbox addresses may be dialled (`--allowed-upstream-cidrs`). By default everything
//! except link-local, cloud metadata and unspecified addresses; an address outside
//! the policy is dropped from the route table, so it is never dialled.

use std::net::IpAddr;

use sandbox_api::net::{self, Cidr};

#[derive(Debug, Clone, Default)]
pub struct UpstreamPolicy {
    /// `None`: the default policy.
    allowed: Option<Vec<Cidr>>,
}

impl UpstreamPolicy {
    /// Parses a comma-separated list; an empty string means the default policy.
    pub fn parse(list: &str) -> Result<Self, String> {
        let cidrs = net::parse_list(list).map_err(|e| e.to_string())?;
        Ok(Self {
            allowed: if cidrs.is_empty() { None } else { Some(cidrs) },
        })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = net::canonical(ip);
        if ip.is_unspecified() || is_broadcast(ip) {
            return false;
        }
        match &self.allowed {
            Some(cidrs) => cidrs.iter().any(|c| c.contains(ip)),
            None => !net::is_metadata(ip),
        }
    }
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
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
            "100.100.100.200",
            "fd00:ec2::254",
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
