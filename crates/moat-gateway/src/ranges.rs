//! Address ranges: CIDR rules, and the ranges that stay blocked unless a rule
//! names them (loopback, private, link-local with the cloud metadata address,
//! CGNAT, ULA, multicast…), seen through IPv4-mapped, NAT64, 6to4 and Teredo
//! wrappings so that no IPv6 spelling of a blocked IPv4 address gets through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Cidr, String> {
        s.parse()
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("bad CIDR {s:?}");
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = crate::host::canonical_ip(
            a.trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .map_err(|_| bad())?,
        );
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        // Store the network address, so that equal ranges compare equal.
        Ok(Cidr {
            addr: mask(addr, prefix),
            prefix,
        })
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = crate::host::canonical_ip(ip);
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

const V4_RANGES: &[(u32, u8, &str)] = &[
    (0x0000_0000, 8, "this network (0.0.0.0/8)"),
    (0x7f00_0000, 8, "loopback"),
    (0x0a00_0000, 8, "private (RFC 1918)"),
    (0xac10_0000, 12, "private (RFC 1918)"),
    (0xc0a8_0000, 16, "private (RFC 1918)"),
    (0xa9fe_0000, 16, "link-local (cloud metadata)"),
    (0x6440_0000, 10, "shared address space (CGNAT)"),
    (0xc000_0000, 24, "IETF protocol assignments"),
    (0xc612_0000, 15, "benchmarking"),
    (0xe000_0000, 4, "multicast"),
    (0xf000_0000, 4, "reserved"),
];

/// The blocked range `ip` falls in, if any.
pub fn special_range(ip: IpAddr) -> Option<&'static str> {
    match crate::host::canonical_ip(ip) {
        IpAddr::V4(v4) => {
            let n = u32::from(v4);
            V4_RANGES
                .iter()
                .find(|(net, prefix, _)| n & (u32::MAX << (32 - prefix)) == *net)
                .map(|(_, _, name)| *name)
        }
        IpAddr::V6(v6) => {
            let n = u128::from(v6);
            if v6.is_loopback() {
                return Some("loopback");
            }
            if v6.is_unspecified() {
                return Some("unspecified");
            }
            if let Some(v4) = embedded_v4(n) {
                return special_range(IpAddr::V4(v4)).or(Some("IPv4 wrapped in IPv6"));
            }
            let top = |bits: u32, net: u128| n >> (128 - bits) == net >> (128 - bits);
            if top(10, 0xfe80 << 112) {
                return Some("link-local");
            }
            if top(7, 0xfc00 << 112) {
                return Some("unique local (ULA)");
            }
            if top(8, 0xff00 << 112) {
                return Some("multicast");
            }
            if top(10, 0xfec0 << 112) {
                return Some("site-local");
            }
            None
        }
    }
}

/// The IPv4 address inside an IPv4-compatible, NAT64, 6to4 or Teredo address.
fn embedded_v4(n: u128) -> Option<Ipv4Addr> {
    let low32 = Ipv4Addr::from(n as u32);
    if n >> 32 == 0 {
        return Some(low32); // ::a.b.c.d (IPv4-compatible)
    }
    if n >> 32 == 0x0064_ff9b_0000_0000_0000_0000 || n >> 80 == 0x0064_ff9b_0001 {
        return Some(low32); // NAT64, well-known and local-use prefixes
    }
    if n >> 112 == 0x2002 {
        return Some(Ipv4Addr::from((n >> 80) as u32)); // 6to4
    }
    if n >> 96 == 0x2001_0000 {
        return Some(Ipv4Addr::from(!(n as u32))); // Teredo client, obfuscated
    }
    None
}

/// The host machine's own addresses, which a sandbox must not reach by them either.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and then free.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match (*sa).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Option<&'static str> {
        special_range(s.parse().unwrap())
    }

    #[test]
    fn blocked_ranges_in_every_wrapping() {
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.0.1", "private (RFC 1918)"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("100.100.100.200", "shared address space (CGNAT)"),
            ("224.0.0.1", "multicast"),
            ("0.0.0.0", "this network (0.0.0.0/8)"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b:1::a9fe:a9fe", "link-local (cloud metadata)"),
            ("2002:7f00:1::", "loopback"),
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),
            ("fe80::1", "link-local"),
            ("fd00:ec2::254", "unique local (ULA)"),
            ("ff02::1", "multicast"),
        ] {
            assert_eq!(range(ip), Some(want), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:2800:220:1:248:1893:25c8:1946",
            "1.1.1.1",
        ] {
            assert_eq!(range(ip), None, "{ip}");
        }
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.1.7.9/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains("10.1.200.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.1".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        let one: Cidr = "fd00::1".parse().unwrap();
        assert_eq!(one.prefix, 128);
        assert!("1.2.3.4/40".parse::<Cidr>().is_err());
        assert_eq!(serde_json::to_string(&c).unwrap(), "\"10.1.0.0/16\"");
        assert!(!local_addresses().is_empty());
    }
}
