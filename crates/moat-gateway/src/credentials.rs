//! API keys the sandbox never holds. The service table is data: which hosts
//! a key is for and how it goes in a request. Inside a sandbox each key's
//! variable holds [`PLACEHOLDER`]; on the way out, over intercepted TLS to a
//! matching host only, the gateway drops every credential header the sandbox
//! sent and puts the real key in, and it replaces the key with the
//! placeholder in anything that comes back.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};

/// What the sandbox sees where a key would be.
pub const PLACEHOLDER: &str = "proxy-managed";

/// Request headers that carry credentials: all of them go before the real one goes in.
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "api-key",
    "proxy-authorization",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The name `moat secret set` takes.
    pub name: String,
    /// Host environment variables the daemon reads the key from, first found wins.
    pub env: Vec<String>,
    /// Exact host names the key is for.
    pub hosts: Vec<String>,
    /// The request header that carries it.
    pub header: String,
    /// The header's value: `{key}` stands for the key; `basic:USER` makes HTTP basic auth as USER.
    pub format: String,
}

fn svc(name: &str, env: &[&str], hosts: &[&str], header: &str, format: &str) -> Service {
    Service {
        name: name.into(),
        env: env.iter().map(|s| s.to_string()).collect(),
        hosts: hosts.iter().map(|s| s.to_string()).collect(),
        header: header.into(),
        format: format.into(),
    }
}

/// The services moat knows; the configuration file can add more.
pub fn builtin_services() -> Vec<Service> {
    vec![
        svc(
            "anthropic",
            &["ANTHROPIC_API_KEY"],
            &["api.anthropic.com"],
            "x-api-key",
            "{key}",
        ),
        svc(
            "openai",
            &["OPENAI_API_KEY"],
            &["api.openai.com"],
            "authorization",
            "Bearer {key}",
        ),
        svc(
            "gemini",
            &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
            &["generativelanguage.googleapis.com"],
            "x-goog-api-key",
            "{key}",
        ),
        svc(
            "github",
            &["GH_TOKEN", "GITHUB_TOKEN"],
            &["api.github.com"],
            "authorization",
            "Bearer {key}",
        ),
        // git over HTTPS takes the same token as basic auth.
        svc(
            "github",
            &["GH_TOKEN", "GITHUB_TOKEN"],
            &["github.com"],
            "authorization",
            "basic:x-access-token",
        ),
        svc(
            "mistral",
            &["MISTRAL_API_KEY"],
            &["api.mistral.ai"],
            "authorization",
            "Bearer {key}",
        ),
        svc(
            "groq",
            &["GROQ_API_KEY"],
            &["api.groq.com"],
            "authorization",
            "Bearer {key}",
        ),
        svc(
            "xai",
            &["XAI_API_KEY"],
            &["api.x.ai"],
            "authorization",
            "Bearer {key}",
        ),
    ]
}

/// A service with its key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential {
    pub service: Service,
    pub key: String,
}

impl std::fmt::Debug for Credential {
    // Never print a key, not even in a debug dump.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credential({})", self.service.name)
    }
}

impl Credential {
    fn header_value(&self) -> String {
        match self.service.format.strip_prefix("basic:") {
            Some(user) => format!(
                "Basic {}",
                base64(format!("{user}:{}", self.key).as_bytes())
            ),
            None => self.service.format.replace("{key}", &self.key),
        }
    }

    /// Drop every credential the sandbox sent and put the real one in. The
    /// request also asks for an answer the gateway can read: an echo of the
    /// key in a compressed body (the sandbox chooses `Accept-Encoding`) or
    /// split over ranged responses would pass the masking unseen.
    pub fn inject(&self, headers: &mut HeaderMap) {
        for h in CREDENTIAL_HEADERS {
            headers.remove(*h);
        }
        headers.remove(self.service.header.as_str());
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(self.service.header.as_bytes()),
            HeaderValue::from_str(&self.header_value()),
        ) {
            let mut value = value;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        headers.remove(http::header::RANGE);
        headers.remove(http::header::IF_RANGE);
    }

    /// Every form of the key that must never flow back, longest first (so
    /// that the header value is masked whole, not around the key inside
    /// it): the header value as sent, the bare base64 of basic auth, the key.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = vec![self.header_value(), self.key.clone()];
        if let Some(user) = self.service.format.strip_prefix("basic:") {
            out.push(base64(format!("{user}:{}", self.key).as_bytes()));
        }
        out.retain(|s| !s.is_empty());
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out.dedup();
        out
    }
}

/// The credential for `host`, if any.
pub fn for_host<'a>(creds: &'a [Credential], host: &str) -> Option<&'a Credential> {
    creds
        .iter()
        .find(|c| c.service.hosts.iter().any(|h| h == host))
}

/// Replace every secret in response headers with the placeholder. Values
/// are masked as bytes (a value need not be UTF-8), and names too (an
/// upstream may echo a header as a name; names are lower case on the wire
/// of HTTP/2 and in hyper, so they are compared in lower case).
pub fn redact_headers(headers: &mut HeaderMap, secrets: &[String]) {
    let lower: Vec<String> = secrets.iter().map(|s| s.to_ascii_lowercase()).collect();
    let named = headers
        .keys()
        .any(|k| mask(k.as_str().as_bytes(), &lower).is_some());
    if named {
        let old = std::mem::take(headers);
        let mut name = None;
        for (k, v) in old {
            // `into_iter` names only the first value of each header.
            if let Some(k) = k {
                let masked = mask(k.as_str().as_bytes(), &lower)
                    .and_then(|m| http::header::HeaderName::from_bytes(&m).ok());
                name = Some(masked.unwrap_or(k));
            }
            if let Some(n) = &name {
                headers.append(n.clone(), v);
            }
        }
    }
    for value in headers.values_mut() {
        if let Some(clean) = mask(value.as_bytes(), secrets) {
            // The placeholder is plain ASCII: what was valid stays valid.
            *value = HeaderValue::from_bytes(&clean)
                .unwrap_or_else(|_| HeaderValue::from_static(PLACEHOLDER));
        }
    }
}

/// `data` with every secret replaced by the placeholder; `None` when it holds none.
pub fn mask(data: &[u8], secrets: &[String]) -> Option<Vec<u8>> {
    let holds = secrets
        .iter()
        .any(|s| !s.is_empty() && data.windows(s.len()).any(|w| w == s.as_bytes()));
    holds.then(|| replace_all(data, secrets))
}

/// `data` with every secret, longest first, replaced by the placeholder.
fn replace_all(data: &[u8], secrets: &[String]) -> Vec<u8> {
    let mut out = data.to_vec();
    for s in secrets {
        let needle = s.as_bytes();
        if needle.is_empty() {
            continue;
        }
        let mut result = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(needle) {
                result.extend_from_slice(PLACEHOLDER.as_bytes());
                i += needle.len();
            } else {
                result.push(out[i]);
                i += 1;
            }
        }
        out = result;
    }
    out
}

/// A response body with every secret replaced, also across chunk boundaries:
/// it holds back the last `longest - 1` bytes of each chunk until the next.
/// Trailers are masked too, and go after what was held back.
pub struct Redacted<B> {
    inner: B,
    secrets: Vec<String>,
    held: BytesMut,
    done: bool,
    trailers: Option<HeaderMap>,
}

impl<B> Redacted<B> {
    pub fn new(inner: B, secrets: Vec<String>) -> Redacted<B> {
        Redacted {
            inner,
            secrets,
            held: BytesMut::new(),
            done: false,
            trailers: None,
        }
    }
    fn keep(&self) -> usize {
        self.secrets
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1)
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Redacted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                if !this.held.is_empty() {
                    let rest = this.held.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(replace_all(
                        &rest,
                        &this.secrets,
                    ))))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.held.extend_from_slice(&data);
                        let clean = replace_all(&this.held, &this.secrets);
                        let keep = this.keep().min(clean.len());
                        // What is held back may be the start of a secret the next chunk completes.
                        let (out, rest) = clean.split_at(clean.len() - keep);
                        let out = Bytes::copy_from_slice(out);
                        this.held = BytesMut::from(rest);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    // Trailers are headers too, and may echo the key; they end the body.
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            redact_headers(&mut trailers, &this.secrets);
                            this.trailers = Some(trailers);
                            this.done = true;
                        }
                    }
                },
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Standard base64 with padding, as basic auth writes it.
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn cred(name: &str, key: &str) -> Credential {
        Credential {
            service: builtin_services()
                .into_iter()
                .find(|s| s.name == name)
                .unwrap(),
            key: key.into(),
        }
    }

    #[test]
    fn injection_replaces_every_credential_header() {
        let c = cred("anthropic", "sk-real");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static(PLACEHOLDER));
        h.insert("authorization", HeaderValue::from_static("Bearer attacker"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        c.inject(&mut h);
        let mut got: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("accept".into(), "*/*".into()),
                // An answer the gateway can read for echoes of the key.
                ("accept-encoding".into(), "identity".into()),
                ("x-api-key".into(), "sk-real".into())
            ]
        );
        let g = Credential {
            service: builtin_services()
                .into_iter()
                .find(|s| s.hosts == ["github.com"])
                .unwrap(),
            key: "ghp_x".into(),
        };
        let mut h = HeaderMap::new();
        g.inject(&mut h);
        assert_eq!(h["authorization"], "Basic eC1hY2Nlc3MtdG9rZW46Z2hwX3g=");
        assert_eq!(format!("{g:?}"), "Credential(github)");
    }

    #[test]
    fn secrets_are_redacted_even_split_across_chunks() {
        let secrets = cred("openai", "sk-abcdef").secrets();
        let pieces = vec!["echo: Bearer sk-a", "bcdef and sk-", "abcdef!", ""];
        let body = Redacted::new(chunks(pieces), secrets.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt.block_on(async { body.collect().await.unwrap().to_bytes() });
        assert_eq!(
            String::from_utf8_lossy(&out),
            "echo: proxy-managed and proxy-managed!"
        );
        let mut h = HeaderMap::new();
        h.insert("x-echo", HeaderValue::from_static("Bearer sk-abcdef"));
        redact_headers(&mut h, &secrets);
        assert_eq!(h["x-echo"], PLACEHOLDER);
    }

    #[test]
    fn every_form_of_a_key_is_masked_in_header_bytes_and_names() {
        let g = Credential {
            service: builtin_services()
                .into_iter()
                .find(|s| s.hosts == ["github.com"])
                .unwrap(),
            key: "ghp_X".into(),
        };
        // The header value whole, the bare base64 in it, then the key.
        assert_eq!(
            g.secrets(),
            vec![
                "Basic eC1hY2Nlc3MtdG9rZW46Z2hwX1g=".to_string(),
                "eC1hY2Nlc3MtdG9rZW46Z2hwX1g=".to_string(),
                "ghp_X".to_string()
            ]
        );
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo",
            HeaderValue::from_bytes(b"\xffeC1hY2Nlc3MtdG9rZW46Z2hwX1g=\xfe").unwrap(),
        );
        h.append("x-ghp_x", HeaderValue::from_static("1"));
        h.append("x-ghp_x", HeaderValue::from_static("2"));
        redact_headers(&mut h, &g.secrets());
        assert_eq!(h["x-echo"].as_bytes(), b"\xffproxy-managed\xfe");
        let names: Vec<_> = h.get_all("x-proxy-managed").iter().collect();
        assert_eq!(names, ["1", "2"]);
        assert!(!h.contains_key("x-ghp_x"));
    }

    /// A body that yields the given chunks, one frame each.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn chunks(list: Vec<&'static str>) -> Chunks {
        Chunks(
            list.into_iter()
                .map(|c| Bytes::from_static(c.as_bytes()))
                .collect(),
        )
    }
}
