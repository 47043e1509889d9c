//! Which sandbox addresses may be dialled (`--allowed-upstream-cidrs`). By default everything
//! except link-local, cloud metadata, unspecified, multicast and broadcast addresses (in IPv4,
//! IPv6 and IPv4-mapped forms), and except loopback for the Kubernetes providers, whose
//! endpoints come from annotations any sandbox owner can write (the file provider's file is the
//! operator's, so loopback is allowed there). An address outside the policy is dropped from
//! the route table, so it is never dialled. Unspecified, multicast and broadcast addresses are
//! refused even when an explicit list would cover them.

use std::net::IpAddr;

use sandbox_api::net::{self, Cidr};

/// The default is the Kubernetes providers' (loopback refused).
#[derive(Debug, Clone, Default)]
pub struct UpstreamPolicy {
    /// `None`: the default policy.
    allowed: Option<Vec<Cidr>>,
    /// Whether the default policy admits loopback (the file provider's).
    loopback: bool,
}

impl UpstreamPolicy {
    /// Parses a comma-separated list; an empty string means the default policy, which admits
    /// loopback when `loopback` (the operator wrote the sandboxes).
    pub fn parse(list: &str, loopback: bool) -> Result<Self, String> {
        let cidrs = net::parse_list(list).map_err(|e| e.to_string())?;
        Ok(Self {
            allowed: if cidrs.is_empty() { None } else { Some(cidrs) },
            loopback,
        })
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = net::canonical(ip);
        if ip.is_unspecified() || ip.is_multicast() || is_broadcast(ip) {
            return false;
        }
        match &self.allowed {
            Some(cidrs) => cidrs.iter().any(|c| c.contains(ip)),
            None => !net::is_metadata(ip) && (self.loopback || !ip.is_loopback()),
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
    fn default_refuses_link_local_metadata_and_non_unicast() {
        let kubernetes = UpstreamPolicy::default();
        let file = UpstreamPolicy::parse("", true).unwrap();
        for bad in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "255.255.255.255",
            "::ffff:255.255.255.255",
            "224.0.0.1",
            "::ffff:239.1.2.3",
            "ff02::1",
            "100.100.100.200",
            "::ffff:100.100.100.200",
            "fd00:ec2::254",
            "168.63.129.16",
            "::ffff:168.63.129.16",
        ] {
            assert!(!kubernetes.permits(ip(bad)), "{bad}");
            assert!(!file.permits(ip(bad)), "{bad} (file)");
        }
        for good in ["10.0.0.1", "fd00::1", "2001:db8::1", "::ffff:10.1.2.3"] {
            assert!(
                kubernetes.permits(ip(good)) && file.permits(ip(good)),
                "{good}"
            );
        }
        // Loopback: annotations are anyone's to write, the sandbox file is the operator's.
        for lo in ["127.0.0.2", "::1", "::ffff:127.0.0.1"] {
            assert!(!kubernetes.permits(ip(lo)), "{lo}");
            assert!(file.permits(ip(lo)), "{lo} (file)");
        }
    }

    #[test]
    fn explicit_lists() {
        let p = UpstreamPolicy::parse("10.0.0.0/8, fd00::/8,127.0.0.5", false).unwrap();
        assert!(
            p.permits(ip("10.200.3.4")) && p.permits(ip("fd12::1")) && p.permits(ip("127.0.0.5"))
        );
        assert!(!p.permits(ip("127.0.0.6")) && !p.permits(ip("192.168.1.1")));
        assert!(
            UpstreamPolicy::parse("0.0.0.0/0", false)
                .unwrap()
                .permits(ip("169.254.1.1"))
        );
        assert!(UpstreamPolicy::parse("10.0.0.0/33", false).is_err());
        assert!(UpstreamPolicy::parse("ten/8", false).is_err());
        assert!(
            UpstreamPolicy::parse("", false)
                .unwrap()
                .permits(ip("1.2.3.4"))
        );
    }
}
