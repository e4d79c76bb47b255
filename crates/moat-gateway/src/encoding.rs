//! Compressed answers to credentialed requests. The gateway asks for
//! `identity` there (see `Credential::inject`), but a server may compress
//! all the same; an echo of the key in a gzip body would pass the masking
//! unseen and be one `gunzip` away inside the sandbox. So such a body is
//! inflated here, masked, and sent on uncompressed. A coding the gateway
//! cannot read is refused rather than passed on.

use std::io::Write;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use http::{header, HeaderMap};
use http_body::{Body, Frame, SizeHint};

/// Errors a body may end with, whatever made it.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Compressed input inflated per step: deflate expands at most about a
/// thousandfold, so one step yields at most about a MiB (no bombs in memory).
const STEP: usize = 1024;

/// A compression the gateway reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coding {
    Gzip,
    Deflate,
}

#[derive(Debug, thiserror::Error)]
#[error("the server answered in the encoding \"{0}\", which the gateway cannot check for keys; the answer was withheld (send the request again: the gateway asks for no encoding)")]
pub(crate) struct Unreadable(String);

/// The one coding of a response's body, from Content-Encoding and from
/// Transfer-Encoding (beyond `chunked`, which hyper undoes); `None` for none.
pub(crate) fn coding(headers: &HeaderMap) -> Result<Option<Coding>, Unreadable> {
    let mut found = None;
    for name in [header::CONTENT_ENCODING, header::TRANSFER_ENCODING] {
        for value in headers.get_all(&name) {
            let text = value
                .to_str()
                .map_err(|_| Unreadable(String::from_utf8_lossy(value.as_bytes()).into()))?;
            for token in text.split(',').map(|t| t.trim().to_ascii_lowercase()) {
                let this = match token.as_str() {
                    "" | "identity" | "chunked" => continue,
                    "gzip" | "x-gzip" => Coding::Gzip,
                    "deflate" => Coding::Deflate,
                    _ => return Err(Unreadable(token)),
                };
                // Layers multiply a bomb's reach; no server needs two.
                if found.replace(this).is_some() {
                    return Err(Unreadable(text.to_string()));
                }
            }
        }
    }
    Ok(found)
}

enum Inflater {
    Gzip(MultiGzDecoder<Vec<u8>>),
    /// HTTP's "deflate" is zlib by the standard and raw deflate from some
    /// servers: the first two bytes tell which. Until then, they wait here.
    Undecided(Vec<u8>),
    Zlib(ZlibDecoder<Vec<u8>>),
    Raw(DeflateDecoder<Vec<u8>>),
}

impl Inflater {
    fn new(coding: Coding) -> Inflater {
        match coding {
            Coding::Gzip => Inflater::Gzip(MultiGzDecoder::new(Vec::new())),
            Coding::Deflate => Inflater::Undecided(Vec::new()),
        }
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Inflater::Gzip(d) => d.write_all(data),
            Inflater::Zlib(d) => d.write_all(data),
            Inflater::Raw(d) => d.write_all(data),
            Inflater::Undecided(first) => {
                first.extend_from_slice(data);
                if first.len() < 2 {
                    return Ok(());
                }
                let (cmf, flg) = (first[0], first[1]);
                let zlib = cmf & 0x0f == 8 && ((u16::from(cmf) << 8) | u16::from(flg)) % 31 == 0;
                let first = std::mem::take(first);
                *self = if zlib {
                    Inflater::Zlib(ZlibDecoder::new(Vec::new()))
                } else {
                    Inflater::Raw(DeflateDecoder::new(Vec::new()))
                };
                self.write(&first)
            }
        }
    }

    /// What has been inflated so far.
    fn take(&mut self) -> Vec<u8> {
        match self {
            Inflater::Gzip(d) => std::mem::take(d.get_mut()),
            Inflater::Zlib(d) => std::mem::take(d.get_mut()),
            Inflater::Raw(d) => std::mem::take(d.get_mut()),
            Inflater::Undecided(_) => Vec::new(),
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Inflater::Gzip(d) => d.try_finish(),
            Inflater::Zlib(d) => d.try_finish(),
            Inflater::Raw(d) => d.try_finish(),
            Inflater::Undecided(first) if first.is_empty() => Ok(()),
            Inflater::Undecided(_) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the server's compressed answer is broken: {0}")]
struct Broken(std::io::Error);

/// A body inflated as it streams; trailers pass on after the data.
pub(crate) struct Decoded<B> {
    inner: B,
    inflater: Inflater,
    input: Bytes,
    /// Whether any compressed byte came: an empty body (HEAD, 204) is no error.
    fed: bool,
    done: bool,
    finished: bool,
    trailers: Option<HeaderMap>,
}

impl<B> Decoded<B> {
    pub(crate) fn new(inner: B, coding: Coding) -> Decoded<B> {
        Decoded {
            inner,
            inflater: Inflater::new(coding),
            input: Bytes::new(),
            fed: false,
            done: false,
            finished: false,
            trailers: None,
        }
    }
}

impl<B> Body for Decoded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if !this.input.is_empty() {
                let piece = this.input.split_to(STEP.min(this.input.len()));
                if let Err(e) = this.inflater.write(&piece) {
                    return Poll::Ready(Some(Err(Box::new(Broken(e)))));
                }
                let out = this.inflater.take();
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
                continue;
            }
            if this.done {
                if !this.finished {
                    this.finished = true;
                    if this.fed {
                        if let Err(e) = this.inflater.finish() {
                            return Poll::Ready(Some(Err(Box::new(Broken(e)))));
                        }
                    }
                    let out = this.inflater.take();
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.fed |= !data.is_empty();
                        this.input = data;
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http_body_util::BodyExt;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn codings_are_read_from_both_headers_and_unknown_ones_refused() {
        assert_eq!(coding(&headers(&[])).unwrap(), None);
        assert_eq!(
            coding(&headers(&[("content-encoding", "GZIP")])).unwrap(),
            Some(Coding::Gzip)
        );
        assert_eq!(
            coding(&headers(&[("transfer-encoding", "deflate, chunked")])).unwrap(),
            Some(Coding::Deflate)
        );
        for bad in [
            vec![("content-encoding", "br")],
            vec![("content-encoding", "zstd")],
            vec![("content-encoding", "gzip, gzip")],
            vec![("content-encoding", "gzip"), ("transfer-encoding", "gzip")],
        ] {
            assert!(coding(&headers(&bad)).is_err(), "{bad:?}");
        }
    }

    /// A body of one-byte frames: every boundary is crossed.
    struct Bytewise(std::vec::IntoIter<u8>);

    impl Body for Bytewise {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(
                self.get_mut()
                    .0
                    .next()
                    .map(|b| Ok(Frame::data(Bytes::from(vec![b])))),
            )
        }
    }

    fn inflate(coding: Coding, compressed: Vec<u8>) -> Vec<u8> {
        let body = Bytewise(compressed.into_iter());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            Decoded::new(body, coding)
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec()
        })
    }

    #[test]
    fn gzip_zlib_and_raw_deflate_inflate_across_frames() {
        use flate2::Compression;
        let text = b"echo: sk-secret-key ".repeat(500);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(&text).unwrap();
        assert_eq!(inflate(Coding::Gzip, gz.finish().unwrap()), text);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&text).unwrap();
        assert_eq!(inflate(Coding::Deflate, z.finish().unwrap()), text);
        let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), Compression::default());
        raw.write_all(&text).unwrap();
        assert_eq!(inflate(Coding::Deflate, raw.finish().unwrap()), text);
        assert_eq!(inflate(Coding::Gzip, Vec::new()), Vec::<u8>::new());
    }
}
