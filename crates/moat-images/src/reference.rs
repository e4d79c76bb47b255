//! Image references: `NAME[:TAG][@sha256:HEX]`, where NAME may start with a
//! registry host and port (`localhost:5000/a/b`). Names only in lower case,
//! so that a name has one spelling in the index; tags, as Docker's, in either. As Docker reads them, the first
//! component is a registry when it has a `.` or a `:` or is `localhost`;
//! otherwise the name is local (or Docker Hub's, which is not reachable here).

use crate::error::ImageError;

/// A parsed image reference. `Display` gives `name:tag`, the form stored in
/// the index annotation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    pub name: String,
    pub tag: String,
    /// `sha256:<hex>`: the image by content; the tag is then ignored.
    pub digest: Option<String>,
}

const MAX_NAME: usize = 255;
const MAX_TAG: usize = 128;

impl Reference {
    /// Parses `name`, `name:tag` or `host:port/path:tag`; the tag defaults to `latest`.
    pub fn parse(s: &str) -> Result<Reference, ImageError> {
        let bad = |reason: &str| ImageError::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        let (s, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                if crate::oci::digest_hex(digest).is_none() {
                    return Err(bad(
                        "the part after '@' must be sha256:<64 lower-case hex digits>",
                    ));
                }
                (rest, Some(digest.to_string()))
            }
            None => (s, None),
        };
        // A colon after the last '/' separates the tag; one before it belongs
        // to a registry port.
        let last_slash = s.rfind('/');
        let (name, tag) = match s.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&s[..colon], &s[colon + 1..])
            }
            _ => (s, "latest"),
        };
        if let Some(c) = name
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '/' | '-' | ':'))
        {
            return Err(bad(&format!("character {c:?} is not allowed in the name")));
        }
        // Tags may have capitals, as Docker's do (`ai/smollm2:135M-Q4_1`).
        if let Some(c) = tag
            .chars()
            .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '_' | '-'))
        {
            return Err(bad(&format!("character {c:?} is not allowed in the tag")));
        }
        validate_name(name).map_err(|r| bad(&r))?;
        validate_tag(tag).map_err(|r| bad(&r))?;
        Ok(Reference {
            name: name.to_string(),
            tag: tag.to_string(),
            digest,
        })
    }

    /// The registry host (and port) the name starts with, if it names one.
    pub fn registry(&self) -> Option<&str> {
        let (first, rest) = self.name.split_once('/')?;
        let is_host = first.contains(['.', ':']) || first == "localhost";
        (is_host && !rest.is_empty()).then_some(first)
    }

    /// The repository path within the registry (`me/app` of `localhost:5000/me/app`).
    pub fn repository(&self) -> &str {
        match self.registry() {
            Some(host) => &self.name[host.len() + 1..],
            None => &self.name,
        }
    }
}

fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!("the name is longer than {MAX_NAME} characters"));
    }
    let components: Vec<&str> = name.split('/').collect();
    for (i, component) in components.iter().enumerate() {
        let mut part = *component;
        // Only the first component of a multi-component name may be a
        // registry `host:port`, and the port must be a number.
        if let Some((host, port)) = component.split_once(':') {
            if i != 0 || components.len() == 1 {
                return Err("a ':' in the name is only allowed as a registry port".into());
            }
            if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!("registry port {port:?} is not a number"));
            }
            part = host;
        }
        if part.is_empty() {
            return Err("the name has an empty path component".into());
        }
        let starts_ok = part.starts_with(|c: char| c.is_ascii_alphanumeric());
        let ends_ok = part.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !starts_ok || !ends_ok {
            return Err(format!(
                "path component {part:?} must start and end with a letter or digit"
            ));
        }
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("the tag after ':' is empty".into());
    }
    if tag.len() > MAX_TAG {
        return Err(format!("the tag is longer than {MAX_TAG} characters"));
    }
    if tag.starts_with(['.', '-']) {
        return Err("the tag must start with a letter, digit or '_'".into());
    }
    Ok(())
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.digest {
            Some(digest) => write!(f, "{}@{digest}", self.name),
            None => write!(f, "{}:{}", self.name, self.tag),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(name: &str, tag: &str) -> Reference {
        Reference {
            name: name.into(),
            tag: tag.into(),
            digest: None,
        }
    }

    #[test]
    fn finds_registries_and_digests() {
        let hex = "ab".repeat(32);
        let cases = [
            "localhost:5000/me/app:v1".to_string(),
            "registry.example.com/team/x".into(),
            "localhost/a".into(),
            "me/app".into(),
            "app".into(),
            format!("localhost:5000/me/app@sha256:{hex}"),
        ];
        let got: Vec<(Option<String>, String, String)> = cases
            .iter()
            .map(|s| {
                let r = Reference::parse(s).unwrap();
                (
                    r.registry().map(str::to_string),
                    r.repository().to_string(),
                    r.to_string(),
                )
            })
            .collect();
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            got,
            vec![
                (
                    some("localhost:5000"),
                    "me/app".into(),
                    "localhost:5000/me/app:v1".into()
                ),
                (
                    some("registry.example.com"),
                    "team/x".into(),
                    "registry.example.com/team/x:latest".into()
                ),
                (some("localhost"), "a".into(), "localhost/a:latest".into()),
                (None, "me/app".into(), "me/app:latest".into()),
                (None, "app".into(), "app:latest".into()),
                (
                    some("localhost:5000"),
                    "me/app".into(),
                    format!("localhost:5000/me/app@sha256:{hex}")
                ),
            ]
        );
        assert!(Reference::parse("a@sha256:12").is_err());
    }

    #[test]
    fn parses_good_references() {
        let inputs = [
            "shell",
            "moat/shell:v1",
            "localhost:5000/a/b:t",
            "localhost:5000/a/b",
            "registry.example.com/team/img_x:1.2.3-rc_1",
            "a:_x",
            "ai/smollm2:135M-Q4_1",
        ];
        let parsed: Vec<Reference> = inputs
            .iter()
            .map(|s| Reference::parse(s))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            parsed,
            vec![
                r("shell", "latest"),
                r("moat/shell", "v1"),
                r("localhost:5000/a/b", "t"),
                r("localhost:5000/a/b", "latest"),
                r("registry.example.com/team/img_x", "1.2.3-rc_1"),
                r("a", "_x"),
                r("ai/smollm2", "135M-Q4_1"),
            ]
        );
        let shown: Vec<String> = parsed.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "shell:latest",
                "moat/shell:v1",
                "localhost:5000/a/b:t",
                "localhost:5000/a/b:latest",
                "registry.example.com/team/img_x:1.2.3-rc_1",
                "a:_x",
                "ai/smollm2:135M-Q4_1",
            ]
        );
    }

    #[test]
    fn rejects_bad_references() {
        let bad = [
            "",
            "Shell",
            "shell:",
            ":tag",
            "a//b",
            "/a",
            "a/",
            "a b",
            "a@sha256:00",
            "a@",
            "a:b:c",
            "host:port/a",
            "a/b:5000/c",
            "-a",
            "a:.t",
            "a:-t",
            "café",
            "a:t/x",
            "a:t+x",
            "Me/app:v1",
        ];
        for s in bad {
            match Reference::parse(s) {
                Err(ImageError::InvalidReference { reference, .. }) => assert_eq!(reference, s),
                other => panic!("{s:?} gave {other:?}"),
            }
        }
        let long = "a".repeat(256);
        assert!(Reference::parse(&long).is_err());
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(Reference::parse(&long_tag).is_err());
    }
}
