//! The HTTP plumbing every API surface shares: reading a body within its
//! limit, parsing JSON so that an error names the field, JSON and
//! server-sent-event responses, and errors in each surface's own shape.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub type Body = BoxBody<Bytes, Infallible>;

/// Request bodies larger than this get 413 (Docker Model Runner's limit).
pub const BODY_LIMIT: usize = 10 << 20;

/// The time a body may take when no door set one (a handler called
/// outside a connection, as in tests).
const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

tokio::task_local! {
    /// How long a request's body may take to arrive once its head has: set
    /// by the door serving the connection, so that a client sending a byte
    /// now and then cannot hold a request (and its connection) open.
    pub static BODY_TIMEOUT: Duration;
}

/// An error a client gets: a status and one line saying what to do.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(404, message)
    }
}

/// How a surface spells its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
    Ollama,
    Plain,
}

impl ApiError {
    pub fn body(&self, dialect: Dialect) -> Value {
        let kind = match self.status.as_u16() {
            400 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            404 => "not_found_error",
            503 => "overloaded_error",
            _ => "api_error",
        };
        match dialect {
            Dialect::OpenAi => {
                json!({"error": {"message": self.message, "type": kind, "code": self.status.as_u16()}})
            }
            Dialect::Anthropic => {
                json!({"type": "error", "error": {"type": kind, "message": self.message}})
            }
            Dialect::Ollama | Dialect::Plain => json!({"error": self.message}),
        }
    }

    pub fn response(&self, dialect: Dialect) -> Response<Body> {
        if dialect == Dialect::Plain {
            return text(self.status, format!("{}\n", self.message));
        }
        json_response(self.status, &self.body(dialect))
    }
}

pub async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, ApiError> {
    let limit = BODY_TIMEOUT
        .try_with(|d| *d)
        .unwrap_or(DEFAULT_BODY_TIMEOUT);
    let collected = tokio::time::timeout(limit, Limited::new(body, BODY_LIMIT).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                408,
                format!(
                    "the request body did not arrive within {limit:?} of its head ([models] header_timeout, MOAT_MODELS_HEADER_TIMEOUT)"
                ),
            )
        })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            413,
            format!(
                "the request body is over the limit of {} MiB",
                BODY_LIMIT >> 20
            ),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "reading the request body: {e}"
        ))),
    }
}

/// Parse a JSON body; an error names the field that is wrong.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if matches!(path.as_str(), "." | "?" | "") {
            ApiError::bad_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::bad_request(format!("invalid field `{path}`: {inner}"))
        }
    })
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn ok_json(value: &impl serde::Serialize) -> Response<Body> {
    json_response(StatusCode::OK, value)
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A body fed by a channel: the producer learns that the client went away
/// when its send fails, and stops (dropping the request cancels it).
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// A streaming response of `content_type`, and the sender that feeds it.
pub fn streaming(content_type: &'static str) -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    let mut resp = Response::new(ChannelBody { rx }.boxed());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (tx, resp)
}

/// One server-sent event carrying JSON (`event:` line when named).
pub fn sse(event: Option<&str>, data: &Value) -> Bytes {
    let data = serde_json::to_string(data).unwrap_or_default();
    match event {
        Some(name) => Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// One line of newline-delimited JSON.
pub fn ndjson(data: &Value) -> Bytes {
    let mut line = serde_json::to_vec(data).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        max_tokens: Option<u32>,
    }

    #[test]
    fn a_wrong_field_type_is_named() {
        let err = parse::<Req>(br#"{"model":"m","max_tokens":"ten"}"#).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(
            err.message
                .starts_with("invalid field `max_tokens`: invalid type: string \"ten\""),
            "{}",
            err.message
        );
        let err = parse::<Req>(b"{not json").unwrap_err();
        assert!(
            err.message.starts_with("invalid JSON body"),
            "{}",
            err.message
        );
        let err = parse::<Req>(br#"{"max_tokens":1}"#).unwrap_err();
        assert!(
            err.message.contains("missing field `model`"),
            "{}",
            err.message
        );
    }

    #[test]
    fn errors_take_each_surfaces_shape() {
        let e = ApiError::not_found("no model x");
        assert_eq!(
            e.body(Dialect::OpenAi),
            json!({"error": {"message": "no model x", "type": "not_found_error", "code": 404}})
        );
        assert_eq!(
            e.body(Dialect::Anthropic),
            json!({"type": "error", "error": {"type": "not_found_error", "message": "no model x"}})
        );
        assert_eq!(e.body(Dialect::Ollama), json!({"error": "no model x"}));
    }
}
