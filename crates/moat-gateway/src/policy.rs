//! Network policy as data: a default action and rules about hosts and
//! address ranges, with DESIGN.md's precedence: exact `host:port`, then
//! exact host, then the longest wildcard (with a port before without), then
//! `*`, then the default; at equal specificity a block wins. Addresses a name
//! resolves to are checked again: blocked ranges (loopback, private,
//! metadata…) stay closed unless an exact host rule or a CIDR rule opens them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::host::{normalize, Host};
use crate::ranges::{special_range, Cidr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Block,
    /// Allowed, and tunnelled without TLS interception.
    Bypass,
}

impl Action {
    fn rank(self) -> u8 {
        match self {
            Action::Block => 2,
            Action::Bypass => 1,
            Action::Allow => 0,
        }
    }
    fn flag(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Block => "block",
            Action::Bypass => "bypass",
        }
    }
}

/// What a rule is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// `example.com`, `*.example.com` (subdomains only), or `*`; optionally one port.
    Host {
        pattern: String,
        port: Option<u16>,
    },
    Cidr {
        cidr: Cidr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub target: Target,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.target {
            Target::Host {
                pattern,
                port: Some(p),
            } => write!(f, "{}-host {pattern}:{p}", self.action.flag()),
            Target::Host {
                pattern,
                port: None,
            } => write!(f, "{}-host {pattern}", self.action.flag()),
            Target::Cidr { cidr } => write!(f, "{}-cidr {cidr}", self.action.flag()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Default {
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub default: Default,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("bad host rule {0:?}: write example.com, *.example.com or either with :PORT")]
    Host(String),
    #[error("bad CIDR {0:?}: write e.g. 10.1.0.0/16 or fd00::/8")]
    Cidr(String),
    #[error("unknown preset {0:?}: presets are deny-all, balanced and allow-all")]
    Preset(String),
}

impl Rule {
    pub fn host(action: Action, spec: &str) -> Result<Rule, RuleError> {
        let bad = || RuleError::Host(spec.to_string());
        let (pattern, port) = match crate::host::split_host_port(spec.trim()) {
            Some((h, p)) => (h, p),
            None => return Err(bad()),
        };
        let pattern = if pattern == "*" {
            "*".to_string()
        } else if let Some(rest) = pattern.strip_prefix("*.") {
            match normalize(rest).map_err(|_| bad())? {
                Host::Name(n) => format!("*.{n}"),
                Host::Ip(_) => return Err(bad()),
            }
        } else {
            normalize(pattern).map_err(|_| bad())?.to_string()
        };
        Ok(Rule {
            action,
            target: Target::Host { pattern, port },
        })
    }

    pub fn cidr(action: Action, spec: &str) -> Result<Rule, RuleError> {
        let cidr = spec
            .parse::<Cidr>()
            .map_err(|_| RuleError::Cidr(spec.to_string()))?;
        Ok(Rule {
            action,
            target: Target::Cidr { cidr },
        })
    }
}

/// Hosts the `balanced` preset allows: package registries, source hosts, model APIs.
pub const BALANCED_HOSTS: &[&str] = &[
    // package registries
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "registry.yarnpkg.com",
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "deb.debian.org",
    "security.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "proxy.golang.org",
    "sum.golang.org",
    "rubygems.org",
    "repo.maven.apache.org",
    "repo1.maven.org",
    "plugins.gradle.org",
    "services.gradle.org",
    "nodejs.org",
    // source hosts
    "github.com",
    "api.github.com",
    "codeload.github.com",
    "*.githubusercontent.com",
    "gitlab.com",
    "bitbucket.org",
    // model APIs
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
    "api.mistral.ai",
    "api.groq.com",
    "api.x.ai",
    "openrouter.ai",
    "huggingface.co",
    "*.huggingface.co",
    "*.hf.co",
];

impl Policy {
    pub fn preset(name: &str) -> Result<Policy, RuleError> {
        match name {
            "deny-all" => Ok(Policy {
                default: Default::Deny,
                rules: vec![],
            }),
            "allow-all" => Ok(Policy {
                default: Default::Allow,
                rules: vec![],
            }),
            "balanced" => Ok(Policy {
                default: Default::Deny,
                rules: BALANCED_HOSTS
                    .iter()
                    .filter_map(|h| Rule::host(Action::Allow, h).ok())
                    .collect(),
            }),
            other => Err(RuleError::Preset(other.to_string())),
        }
    }

    /// Add a rule; one about the same target replaces it.
    pub fn add(&mut self, rule: Rule) {
        self.rules.retain(|r| r.target != rule.target);
        self.rules.push(rule);
    }
}

/// What the policy says about a destination, and which rule said it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// The matching rule, `<default policy>`, or the blocked range.
    pub rule: String,
    /// The host or range named exactly by the deciding rule: only such a rule opens blocked ranges.
    exact: bool,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.action != Action::Block
    }
    fn default(policy: &Policy) -> Verdict {
        let action = match policy.default {
            Default::Allow => Action::Allow,
            Default::Deny => Action::Block,
        };
        Verdict {
            action,
            rule: "<default policy>".into(),
            exact: false,
        }
    }
}

/// Specificity of a host rule for `host`/`port`, if it matches: higher wins.
fn host_score(
    pattern: &str,
    rule_port: Option<u16>,
    host: &Host,
    port: u16,
) -> Option<(u8, usize, u8)> {
    if rule_port.is_some_and(|p| p != port) {
        return None;
    }
    let with_port = rule_port.is_some() as u8;
    let name = host.to_string();
    if pattern == "*" {
        return Some((0, 0, with_port));
    }
    if let Some(suffix) = pattern.strip_prefix("*.") {
        let Host::Name(n) = host else { return None };
        return n
            .strip_suffix(suffix)
            .filter(|rest| rest.ends_with('.'))
            .map(|_| (1, suffix.len(), with_port));
    }
    (pattern == name).then_some((2 + with_port, 0, 0))
}

impl Policy {
    /// The verdict on a name (or address literal) before resolution.
    pub fn decide_host(&self, host: &Host, port: u16) -> Verdict {
        let mut best: Option<((u8, usize, u8), &Rule)> = None;
        for rule in &self.rules {
            let score = match (&rule.target, host) {
                (Target::Host { pattern, port: p }, _) => host_score(pattern, *p, host, port),
                // A CIDR rule speaks about an address literal like an exact rule, longer prefixes first.
                (Target::Cidr { cidr }, Host::Ip(ip)) => {
                    cidr.contains(*ip).then_some((2, cidr.prefix as usize, 0))
                }
                (Target::Cidr { .. }, Host::Name(_)) => None,
            };
            let Some(score) = score else { continue };
            let better = match &best {
                None => true,
                Some((s, r)) => score > *s || (score == *s && rule.action.rank() > r.action.rank()),
            };
            if better {
                best = Some((score, rule));
            }
        }
        match best {
            Some((score, rule)) => Verdict {
                action: rule.action,
                rule: rule.to_string(),
                exact: score.0 >= 2,
            },
            None => Verdict::default(self),
        }
    }

    /// The verdict on one address that `host` resolved to, given the verdict on `host`.
    /// `local` are the host machine's own interface addresses.
    pub fn decide_address(&self, host_verdict: &Verdict, ip: IpAddr, local: &[IpAddr]) -> Verdict {
        let ip = crate::host::canonical_ip(ip);
        if !host_verdict.allowed() {
            return host_verdict.clone();
        }
        // The longest CIDR rule containing the address; a block wins a tie.
        let mut cidr_rule: Option<&Rule> = None;
        for rule in &self.rules {
            if let Target::Cidr { cidr } = &rule.target {
                if cidr.contains(ip) {
                    let better = match cidr_rule {
                        None => true,
                        Some(Rule {
                            target: Target::Cidr { cidr: c },
                            action,
                        }) => {
                            cidr.prefix > c.prefix
                                || (cidr.prefix == c.prefix && rule.action.rank() > action.rank())
                        }
                        Some(_) => false,
                    };
                    if better {
                        cidr_rule = Some(rule);
                    }
                }
            }
        }
        if let Some(rule) = cidr_rule.filter(|r| r.action == Action::Block) {
            return Verdict {
                action: Action::Block,
                rule: rule.to_string(),
                exact: true,
            };
        }
        let range =
            special_range(ip).or_else(|| local.contains(&ip).then_some("this host's own address"));
        if let Some(range) = range {
            if host_verdict.exact {
                return host_verdict.clone();
            }
            if let Some(rule) = cidr_rule {
                return Verdict {
                    action: rule.action,
                    rule: rule.to_string(),
                    exact: true,
                };
            }
            return Verdict {
                action: Action::Block,
                rule: format!("<blocked range: {range}>"),
                exact: false,
            };
        }
        // A name no host rule named, at an address a CIDR rule names: the CIDR rule decides.
        match cidr_rule {
            Some(rule) if host_verdict.rule == "<default policy>" => Verdict {
                action: rule.action,
                rule: rule.to_string(),
                exact: true,
            },
            _ => host_verdict.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default: Default, rules: &[(&str, Action, &str)]) -> Policy {
        let mut p = Policy {
            default,
            rules: vec![],
        };
        for (kind, action, spec) in rules {
            p.add(if *kind == "host" {
                Rule::host(*action, spec).unwrap()
            } else {
                Rule::cidr(*action, spec).unwrap()
            });
        }
        p
    }

    fn decide(p: &Policy, host: &str, port: u16) -> (Action, String) {
        let v = p.decide_host(&normalize(host).unwrap(), port);
        (v.action, v.rule)
    }

    #[test]
    fn precedence_exact_port_then_exact_then_longest_wildcard_then_star_then_default() {
        let p = policy(
            Default::Deny,
            &[
                ("host", Action::Allow, "*"),
                ("host", Action::Block, "*.example.com"),
                ("host", Action::Allow, "*.api.example.com"),
                ("host", Action::Block, "v1.api.example.com"),
                ("host", Action::Allow, "v1.api.example.com:443"),
            ],
        );
        assert_eq!(
            decide(&p, "v1.api.example.com", 443),
            (Action::Allow, "allow-host v1.api.example.com:443".into())
        );
        assert_eq!(
            decide(&p, "v1.api.example.com", 80),
            (Action::Block, "block-host v1.api.example.com".into())
        );
        assert_eq!(
            decide(&p, "v2.api.example.com", 80),
            (Action::Allow, "allow-host *.api.example.com".into())
        );
        assert_eq!(
            decide(&p, "www.example.com", 80),
            (Action::Block, "block-host *.example.com".into())
        );
        // A wildcard covers subdomains only, not the apex.
        assert_eq!(
            decide(&p, "example.com", 80),
            (Action::Allow, "allow-host *".into())
        );
        assert_eq!(
            decide(&policy(Default::Deny, &[]), "x.org", 80),
            (Action::Block, "<default policy>".into())
        );
    }

    #[test]
    fn at_equal_specificity_a_block_wins() {
        let mut p = policy(Default::Allow, &[("host", Action::Allow, "*.a.com")]);
        p.rules.push(Rule::host(Action::Block, "*.a.com").unwrap());
        assert_eq!(decide(&p, "x.a.com", 1).0, Action::Block);
    }

    #[test]
    fn blocked_ranges_need_an_exact_rule_or_a_cidr_rule() {
        let local = ["192.0.2.10".parse().unwrap()];
        let p = policy(
            Default::Allow,
            &[
                ("host", Action::Allow, "*.corp.example"),
                ("host", Action::Allow, "db.corp.example"),
            ],
        );
        let addr = |p: &Policy, host: &str, ip: &str| {
            let hv = p.decide_host(&normalize(host).unwrap(), 443);
            let v = p.decide_address(&hv, ip.parse().unwrap(), &local);
            (v.action, v.rule)
        };
        // A wildcard-allowed name that resolves to loopback stays blocked.
        assert_eq!(
            addr(&p, "x.corp.example", "127.0.0.1"),
            (Action::Block, "<blocked range: loopback>".into())
        );
        assert_eq!(
            addr(&p, "x.corp.example", "::ffff:169.254.169.254"),
            (
                Action::Block,
                "<blocked range: link-local (cloud metadata)>".into()
            )
        );
        assert_eq!(
            addr(&p, "x.corp.example", "192.0.2.10"),
            (
                Action::Block,
                "<blocked range: this host's own address>".into()
            )
        );
        // An exact rule opens it.
        assert_eq!(
            addr(&p, "db.corp.example", "10.1.2.3"),
            (Action::Allow, "allow-host db.corp.example".into())
        );
        // So does a CIDR rule; a block CIDR closes even a public address.
        let p2 = policy(
            Default::Allow,
            &[
                ("cidr", Action::Allow, "10.1.0.0/16"),
                ("cidr", Action::Block, "203.0.113.0/24"),
            ],
        );
        assert_eq!(
            addr(&p2, "svc.internal", "10.1.2.3"),
            (Action::Allow, "allow-cidr 10.1.0.0/16".into())
        );
        assert_eq!(
            addr(&p2, "svc.internal", "10.2.0.1"),
            (Action::Block, "<blocked range: private (RFC 1918)>".into())
        );
        assert_eq!(
            addr(&p2, "www.example.org", "203.0.113.5"),
            (Action::Block, "block-cidr 203.0.113.0/24".into())
        );
    }

    #[test]
    fn localhost_opens_only_by_its_own_rule() {
        let allow_all = Policy::preset("allow-all").unwrap();
        let hv = allow_all.decide_host(&Host::Name("localhost".into()), 8080);
        assert!(!allow_all
            .decide_address(&hv, "127.0.0.1".parse().unwrap(), &[])
            .allowed());
        let one_port = policy(Default::Deny, &[("host", Action::Allow, "localhost:8080")]);
        for (port, want) in [(8080, true), (8081, false)] {
            let hv = one_port.decide_host(&Host::Name("localhost".into()), port);
            assert_eq!(
                one_port
                    .decide_address(&hv, "127.0.0.1".parse().unwrap(), &[])
                    .allowed(),
                want
            );
        }
    }

    #[test]
    fn ip_literals_meet_cidr_rules_and_presets_parse() {
        let p = policy(Default::Deny, &[("cidr", Action::Allow, "10.1.0.0/16")]);
        assert_eq!(
            decide(&p, "10.1.9.9", 22),
            (Action::Allow, "allow-cidr 10.1.0.0/16".into())
        );
        assert_eq!(
            decide(&p, "0x0a010909", 22),
            (Action::Allow, "allow-cidr 10.1.0.0/16".into())
        );
        let balanced = Policy::preset("balanced").unwrap();
        assert_eq!(balanced.rules.len(), BALANCED_HOSTS.len());
        assert_eq!(decide(&balanced, "pypi.org", 443).0, Action::Allow);
        assert_eq!(decide(&balanced, "evil.example", 443).0, Action::Block);
        assert!(Policy::preset("open").is_err());
        assert!(Rule::host(Action::Allow, "exa mple.com").is_err());
        assert!(Rule::cidr(Action::Allow, "10.0.0.0/33").is_err());
    }
}
