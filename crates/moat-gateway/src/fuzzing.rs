//! The properties the fuzz target (`fuzz/`, run with `cargo fuzz run
//! hosts_and_rules`) checks on arbitrary input, kept here so that a unit test
//! also runs them over generated inputs on every build.

use crate::host::{normalize, Host};
use crate::policy::{Action, Policy, Rule};

/// Panics if a property fails for `data`.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (host_part, rule_part) = text.split_once('\n').unwrap_or((text, "*.example.com"));

    // Normalising never panics, and a normalised host normalises to itself.
    if let Ok(host) = normalize(host_part) {
        let again = normalize(&host.to_string());
        assert_eq!(
            again.as_ref(),
            Ok(&host),
            "{host_part:?} -> {host} -> {again:?}"
        );
        if let Host::Name(n) = &host {
            assert!(!n.ends_with('.') && n == &n.to_ascii_lowercase(), "{n:?}");
        }
    }

    // Rules parse or are refused, never panic; a parsed rule prints as a spec
    // that parses back to the same rule.
    for action in [Action::Allow, Action::Block, Action::Bypass] {
        if let Ok(rule) = Rule::host(action, rule_part) {
            let printed = rule.to_string();
            let spec = printed.split_once(' ').map(|(_, s)| s).unwrap_or("");
            assert_eq!(
                Rule::host(action, spec).as_ref(),
                Ok(&rule),
                "{rule_part:?} -> {printed}"
            );
        }
        let _ = Rule::cidr(action, rule_part);
    }

    // Deciding never panics, and a block rule naming the exact host always wins.
    if let (Ok(host), Ok(mut policy)) = (normalize(host_part), Policy::preset("allow-all")) {
        if let Ok(rule) = Rule::host(Action::Allow, rule_part) {
            policy.add(rule);
        }
        let _ = policy.decide_host(&host, 443);
        if let Ok(block) = Rule::host(Action::Block, &host.to_string()) {
            policy.add(block);
            assert!(
                !policy.decide_host(&host, 443).allowed(),
                "{host} not blocked by its own exact rule"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    /// A small deterministic generator: spellings of hosts built from pieces
    /// that matter (digits, dots, brackets, percent signs, wildcards).
    #[test]
    fn the_fuzz_properties_hold_on_generated_inputs() {
        let pieces = [
            "0",
            "1",
            "127",
            "0x7f",
            "0177",
            "255",
            "256",
            "4294967295",
            ".",
            "..",
            "[",
            "]",
            ":",
            "::",
            "ffff",
            "%2e",
            "%31",
            "a",
            "Example",
            "com",
            "-",
            "_",
            "*",
            "*.",
            "localhost",
            "\n",
            "/",
            "%",
            "9999999999",
            "x",
        ];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            let mut s = String::new();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 8) as usize + 1;
            let mut r = seed;
            for _ in 0..len {
                s.push_str(pieces[(r % pieces.len() as u64) as usize]);
                r /= pieces.len() as u64;
                if r == 0 {
                    r = seed.rotate_left(17);
                }
            }
            super::check(s.as_bytes());
        }
    }
}
