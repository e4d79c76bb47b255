//! Host names as the sandbox writes them, normalised before any rule sees
//! them: lower case, no trailing dot, percent-decoding undone, and IP
//! literals in every spelling (`2130706433`, `0x7f.1`, `127.1`, `0177.0.0.1`,
//! `[::ffff:127.0.0.1]`) turned into the address they mean, so that no
//! spelling slips past a rule about the address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A normalised host: a DNS name, or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad host name {0:?}")]
pub struct BadHost(pub String);

/// Normalise a host as it appears in a request target, Host header or SNI
/// (without the port).
pub fn normalize(raw: &str) -> Result<Host, BadHost> {
    let bad = || BadHost(raw.chars().take(100).collect());
    let decoded = percent_decode(raw).ok_or_else(bad)?;
    let mut h = decoded.trim().to_ascii_lowercase();
    if h.starts_with('[') {
        let inner = h
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(bad)?;
        // Zone ids (`%eth0`) name an interface on the host: refuse them.
        let v6: Ipv6Addr = inner.parse().map_err(|_| bad())?;
        return Ok(Host::Ip(canonical_ip(IpAddr::V6(v6))));
    }
    while h.ends_with('.') {
        h.pop();
    }
    if h.is_empty() || h.len() > 253 {
        return Err(bad());
    }
    if let Ok(v6) = h.parse::<Ipv6Addr>() {
        return Ok(Host::Ip(canonical_ip(IpAddr::V6(v6))));
    }
    if let Some(v4) = parse_ipv4_loose(&h) {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
    };
    if !h.split('.').all(label_ok) {
        return Err(bad());
    }
    // A name whose last label is all digits would be read as an address by
    // some resolvers (`1.2.3.0x4` is caught above; `foo.123` is not a name).
    if h.rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    Ok(Host::Name(h))
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are the IPv4 address.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// IPv4 the way `inet_aton` reads it: one to four parts, each decimal, octal
/// (leading 0) or hex (0x); the last part fills the remaining bytes.
fn parse_ipv4_loose(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let nums: Vec<u64> = parts
        .iter()
        .map(|p| parse_number(p))
        .collect::<Option<_>>()?;
    let (last, head) = nums.split_last()?;
    let mut value: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        value |= n << (24 - 8 * i);
    }
    let room = 32 - 8 * head.len() as u32;
    if room < 64 && *last >= (1u64 << room) {
        return None;
    }
    Some(Ipv4Addr::from((value | last) as u32))
}

fn parse_number(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(hex) = p.strip_prefix("0x") {
        (hex, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        // "0x" alone is zero to inet_aton.
        return (radix == 16).then_some(0);
    }
    u64::from_str_radix(digits, radix)
        .ok()
        .filter(|n| *n <= u32::MAX as u64)
}

/// Split `host[:port]` (with `[v6]:port`), as in a CONNECT target or Host header.
pub fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = &s[..end + 2];
        let after = &rest[end + 1..];
        return match after.strip_prefix(':') {
            Some(p) => Some((host, Some(p.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h, Some(p.parse().ok()?))),
        Some(_) => Some((s, None)),
        None => Some((s, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }

    #[test]
    fn every_spelling_of_loopback_is_loopback() {
        for s in [
            "127.0.0.1",
            "2130706433",
            "0x7f000001",
            "0x7f.1",
            "127.1",
            "0177.0.0.1",
            "0177.1",
            "127.0.1",
            "127.0.0.1.",
            "[::ffff:127.0.0.1]",
            "::ffff:7f00:1",
            "%31%32%37.0.0.1",
            "0x7F.0.0.1",
        ] {
            assert_eq!(normalize(s), Ok(ip("127.0.0.1")), "{s}");
        }
        assert_eq!(normalize("[::1]"), Ok(ip("::1")));
        assert_eq!(normalize("0"), Ok(ip("0.0.0.0")));
    }

    #[test]
    fn names_are_lower_case_without_trailing_dots() {
        assert_eq!(
            normalize("API.Example.COM."),
            Ok(Host::Name("api.example.com".into()))
        );
        assert_eq!(normalize("localhost"), Ok(Host::Name("localhost".into())));
    }

    #[test]
    fn nonsense_is_refused() {
        for s in [
            "",
            "a..b",
            "-x.com",
            "exa mple.com",
            "[::1",
            "1.2.3.4.5",
            "256.1.1.1",
            "foo.123",
            "%zz",
            "[fe80::1%eth0]",
            "x.com/evil",
        ] {
            assert!(normalize(s).is_err(), "{s}");
        }
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(
            split_host_port("example.com:443"),
            Some(("example.com", Some(443)))
        );
        assert_eq!(split_host_port("[::1]:8080"), Some(("[::1]", Some(8080))));
        assert_eq!(split_host_port("[::1]"), Some(("[::1]", None)));
        assert_eq!(split_host_port("example.com"), Some(("example.com", None)));
        assert_eq!(split_host_port("example.com:x"), None);
    }
}
