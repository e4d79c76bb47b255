//! The answer to a credentialed request, made safe to hand back: whatever
//! the upstream echoes of the key, in a header value or name, the status
//! line's reason phrase, the body (compressed or not) or its trailers, the
//! sandbox gets the placeholder instead.

use bytes::Bytes;
use http::header;
use http::response::Parts;
use http_body::Body;
use http_body_util::{combinators::BoxBody, BodyExt};
use hyper::ext::ReasonPhrase;

use crate::credentials::{mask, redact_headers, Redacted};
use crate::encoding::{coding, BoxError, Decoded, Unreadable};

/// Mask `parts` in place and wrap `body` so that it is masked as it
/// streams. Call it before hop-by-hop headers go: Transfer-Encoding may
/// name a compression too. A body the gateway cannot read is refused.
pub(crate) fn masked<B>(
    parts: &mut Parts,
    body: B,
    secrets: Vec<String>,
) -> Result<BoxBody<Bytes, BoxError>, Unreadable>
where
    B: Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let coding = coding(&parts.headers)?;
    redact_headers(&mut parts.headers, &secrets);
    // The length changes with every mask, and with inflating.
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Some(reason) = parts.extensions.get::<ReasonPhrase>() {
        if let Some(clean) = mask(reason.as_bytes(), &secrets) {
            match ReasonPhrase::try_from(clean) {
                Ok(r) => {
                    parts.extensions.insert(r);
                }
                Err(_) => {
                    parts.extensions.remove::<ReasonPhrase>();
                }
            }
        }
    }
    Ok(match coding {
        Some(c) => {
            // Sent on as it is now: plain.
            parts.headers.remove(header::CONTENT_ENCODING);
            parts.headers.remove(header::TRANSFER_ENCODING);
            Redacted::new(Decoded::new(body, c), secrets).boxed()
        }
        None => Redacted::new(body.map_err(Into::into), secrets).boxed(),
    })
}
