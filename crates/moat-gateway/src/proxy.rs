//! The forward proxy behind each sandbox's door: HTTP/1.1 with keep-alive on
//! both sides, and CONNECT tunnels. Every request is decided by the sandbox's
//! policy, resolved and checked here, dialled at exactly the checked
//! address, and logged.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::host::{normalize, split_host_port, Host};
use crate::log::{now_rfc3339, LogEntry, LogSink};
use crate::policy::{Policy, Verdict};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests whose head is larger than this get 431.
const MAX_HEAD: usize = 64 * 1024;

/// One sandbox's side of the gateway.
struct Gate {
    name: String,
    policy: RwLock<Policy>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// The gateway: its own runtime, and the sandboxes it serves.
pub struct Gateway {
    runtime: tokio::runtime::Runtime,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    sink: LogSink,
    local: Arc<Vec<IpAddr>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gateway {
    pub fn new(sink: LogSink) -> std::io::Result<Gateway> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moat-gateway")
            .enable_all()
            .build()?;
        Ok(Gateway {
            runtime,
            gates: Mutex::new(HashMap::new()),
            sink,
            local: Arc::new(crate::ranges::local_addresses()),
        })
    }

    /// Serve the sandbox `id` (called `name`) on `listener`, its door.
    pub fn attach(
        &self,
        id: &str,
        name: &str,
        policy: Policy,
        listener: std::net::TcpListener,
    ) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let gate = Arc::new(Gate {
            name: name.to_string(),
            policy: RwLock::new(policy),
            stop,
        });
        if let Some(old) = lock(&self.gates).insert(id.to_string(), Arc::clone(&gate)) {
            let _ = old.stop.send(true);
        }
        let sink = Arc::clone(&self.sink);
        let local = Arc::clone(&self.local);
        let _enter = self.runtime.enter();
        let listener = TcpListener::from_std(listener)?;
        self.runtime.spawn(async move {
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let conn = Conn { gate: Arc::clone(&gate), sink: Arc::clone(&sink), local: Arc::clone(&local), upstream: Arc::new(tokio::sync::Mutex::new(None)) };
                        let mut stopped = stopped.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = conn.serve(stream) => {}
                                _ = stopped.changed() => {}
                            }
                        });
                    }
                    _ = stopped.changed() => break,
                }
            }
        });
        Ok(())
    }

    /// Apply a new policy to a running sandbox: from its next request on.
    pub fn set_policy(&self, id: &str, policy: Policy) {
        if let Some(gate) = lock(&self.gates).get(id) {
            *gate.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
        }
    }

    /// Stop serving a sandbox; its open connections end.
    pub fn detach(&self, id: &str) {
        if let Some(gate) = lock(&self.gates).remove(id) {
            let _ = gate.stop.send(true);
        }
    }
}

/// An open upstream connection and the address it goes to.
type Upstream = (SocketAddr, SendRequest<Counted<Incoming>>);

/// One client connection through a door.
#[derive(Clone)]
struct Conn {
    gate: Arc<Gate>,
    sink: LogSink,
    local: Arc<Vec<IpAddr>>,
    /// The upstream connection of the last request, kept alive for the next.
    upstream: Arc<tokio::sync::Mutex<Option<Upstream>>>,
}

fn text_response(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Where a request wants to go.
struct Target {
    host: Host,
    port: u16,
}

fn request_target(req: &Request<Incoming>) -> Result<Target, String> {
    let authority = req.uri().authority().ok_or("no host in the request target: send absolute-form requests (http://host/path) or CONNECT host:port")?;
    let (host, port) =
        split_host_port(authority.as_str()).ok_or("bad host in the request target")?;
    let port = match (
        req.method() == Method::CONNECT,
        port,
        req.uri().scheme_str(),
    ) {
        (true, Some(p), _) => p,
        (true, None, _) => return Err("CONNECT needs host:port".into()),
        (false, Some(p), Some("http")) => p,
        (false, None, Some("http")) => 80,
        (false, _, _) => {
            return Err(
                "only http:// URLs go through the proxy in the clear; use CONNECT for https".into(),
            )
        }
    };
    let mut host = normalize(host).map_err(|e| e.to_string())?;
    // As in Docker's sandboxes: the host's name inside means the host's loopback.
    if host == Host::Name("host.docker.internal".into()) {
        host = Host::Name("localhost".into());
    }
    Ok(Target { host, port })
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP.iter().map(|s| s.to_string()).chain(named) {
        headers.remove(name.as_str());
    }
}

impl Conn {
    async fn serve(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let me = self.clone();
        let service = service_fn(move |req| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.handle(req).await) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await;
    }

    fn entry(
        &self,
        method: &str,
        target: &Target,
        path: Option<String>,
        verdict: &Verdict,
        status: u16,
    ) -> LogEntry {
        LogEntry {
            time: now_rfc3339(),
            sandbox: self.gate.name.clone(),
            method: method.to_string(),
            host: target.host.to_string(),
            port: target.port,
            path,
            rule: verdict.rule.clone(),
            decision: if verdict.allowed() {
                "allowed".into()
            } else {
                "blocked".into()
            },
            status,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let target = match request_target(&req) {
            Ok(t) => t,
            Err(why) => return text_response(StatusCode::BAD_REQUEST, format!("moat: {why}\n")),
        };
        let method = req.method().to_string();
        let path = (req.method() != Method::CONNECT).then(|| req.uri().path().to_string());
        let started = Instant::now();
        let (addr, verdict) = match self.admit(&target).await {
            Ok(ok) => ok,
            Err((verdict, resp)) => {
                (self.sink)(self.entry(&method, &target, path, &verdict, resp.status().as_u16()));
                return resp;
            }
        };
        if req.method() == Method::CONNECT {
            self.tunnel(req, target, addr, verdict, started).await
        } else {
            self.forward(req, target, addr, verdict, started).await
        }
    }

    /// Decide, resolve and check: the address to dial and the verdict, or the refusal.
    async fn admit(
        &self,
        target: &Target,
    ) -> Result<(SocketAddr, Verdict), (Verdict, Response<ProxyBody>)> {
        let policy = self
            .gate
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let host_verdict = policy.decide_host(&target.host, target.port);
        if !host_verdict.allowed() {
            let resp = self.forbidden(target, &host_verdict);
            return Err((host_verdict, resp));
        }
        let addrs: Vec<IpAddr> = match &target.host {
            Host::Ip(ip) => vec![*ip],
            Host::Name(n) if n == "localhost" => vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            Host::Name(n) => match tokio::net::lookup_host((n.as_str(), target.port)).await {
                Ok(found) => found.map(|a| a.ip()).collect(),
                Err(e) => {
                    let body = format!("moat: cannot resolve {n}: {e}\n");
                    return Err((host_verdict, text_response(StatusCode::BAD_GATEWAY, body)));
                }
            },
        };
        let mut refusal = None;
        for ip in addrs {
            let verdict = policy.decide_address(&host_verdict, ip, &self.local);
            if verdict.allowed() {
                return Ok((
                    SocketAddr::new(crate::host::canonical_ip(ip), target.port),
                    verdict,
                ));
            }
            refusal.get_or_insert(verdict);
        }
        let verdict = refusal.unwrap_or(host_verdict);
        let resp = self.forbidden(target, &verdict);
        Err((verdict, resp))
    }

    fn forbidden(&self, target: &Target, verdict: &Verdict) -> Response<ProxyBody> {
        let host = &target.host;
        let body = format!(
            "moat: {host}:{} is blocked for sandbox {} by rule {}.\nTo allow it: moat sandbox network proxy {} --allow-host {host}\n",
            target.port, self.gate.name, verdict.rule, self.gate.name
        );
        text_response(StatusCode::FORBIDDEN, body)
    }

    async fn dial(
        &self,
        target: &Target,
        addr: SocketAddr,
    ) -> Result<TcpStream, Response<ProxyBody>> {
        let failed = |why: String| {
            text_response(
                StatusCode::BAD_GATEWAY,
                format!(
                    "moat: cannot reach {}:{} ({addr}): {why}\n",
                    target.host, target.port
                ),
            )
        };
        match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                Ok(s)
            }
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(_) => Err(failed(format!(
                "no answer within {} s",
                DIAL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        target: Target,
        addr: SocketAddr,
        verdict: Verdict,
        started: Instant,
    ) -> Response<ProxyBody> {
        let mut upstream = match self.dial(&target, addr).await {
            Ok(s) => s,
            Err(resp) => {
                (self.sink)(self.entry("CONNECT", &target, None, &verdict, 502));
                return resp;
            }
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let mut entry = self.entry("CONNECT", &target, None, &verdict, 200);
        let sink = Arc::clone(&self.sink);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut client = TokioIo::new(upgraded);
                if let Ok((up, down)) =
                    tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                {
                    entry.bytes_up = up;
                    entry.bytes_down = down;
                }
            }
            entry.duration_ms = started.elapsed().as_millis() as u64;
            sink(entry);
        });
        Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        target: Target,
        addr: SocketAddr,
        verdict: Verdict,
        started: Instant,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        // The Host header, where the client sent one, must name the same place as the target.
        if let Some(h) = parts.headers.get(header::HOST) {
            let same = h
                .to_str()
                .ok()
                .and_then(split_host_port)
                .and_then(|(hh, p)| normalize(hh).ok().map(|n| (n, p.unwrap_or(80))))
                .is_some_and(|(n, p)| {
                    let n = if n == Host::Name("host.docker.internal".into()) {
                        Host::Name("localhost".into())
                    } else {
                        n
                    };
                    n == target.host && p == target.port
                });
            if !same {
                (self.sink)(self.entry(parts.method.as_str(), &target, Some(path), &verdict, 421));
                return text_response(
                    StatusCode::MISDIRECTED_REQUEST,
                    "moat: the Host header and the request target name different hosts\n".into(),
                );
            }
        }
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        parts.uri = match parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().parse::<Uri>())
        {
            Some(Ok(u)) => u,
            _ => Uri::from_static("/"),
        };
        strip_hop_by_hop(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, v);
            }
        }
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let method = parts.method.to_string();
        let req = Request::from_parts(
            parts,
            Counted {
                inner: body,
                count: Arc::clone(&up),
                guard: None,
            },
        );

        let mut cache = self.upstream.lock().await;
        let mut sender = match cache.take() {
            Some((a, s)) if a == addr && !s.is_closed() => s,
            _ => match self.dial(&target, addr).await {
                Ok(stream) => {
                    match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                        Ok((s, conn)) => {
                            tokio::spawn(conn);
                            s
                        }
                        Err(e) => return self.upstream_failed(&method, &target, path, &verdict, e),
                    }
                }
                Err(resp) => {
                    (self.sink)(self.entry(&method, &target, Some(path), &verdict, 502));
                    return resp;
                }
            },
        };
        if let Err(e) = sender.ready().await {
            return self.upstream_failed(&method, &target, path, &verdict, e);
        }
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => return self.upstream_failed(&method, &target, path, &verdict, e),
        };
        *cache = Some((addr, sender));
        drop(cache);
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let entry = self.entry(
            &method,
            &target,
            Some(path),
            &verdict,
            parts.status.as_u16(),
        );
        let guard = Arc::new(LogGuard {
            entry: Mutex::new(Some(entry)),
            up,
            down: Arc::clone(&down),
            started,
            sink: Arc::clone(&self.sink),
        });
        Response::from_parts(
            parts,
            Counted {
                inner: body,
                count: down,
                guard: Some(guard),
            }
            .boxed(),
        )
    }

    fn upstream_failed(
        &self,
        method: &str,
        target: &Target,
        path: String,
        verdict: &Verdict,
        e: hyper::Error,
    ) -> Response<ProxyBody> {
        (self.sink)(self.entry(method, target, Some(path), verdict, 502));
        text_response(
            StatusCode::BAD_GATEWAY,
            format!("moat: {}:{} failed: {e}\n", target.host, target.port),
        )
    }
}

/// Writes the log row of a request once its response body is done (or dropped).
struct LogGuard {
    entry: Mutex<Option<LogEntry>>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    started: Instant,
    sink: LogSink,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(mut e) = lock(&self.entry).take() {
            e.bytes_up = self.up.load(Ordering::Relaxed);
            e.bytes_down = self.down.load(Ordering::Relaxed);
            e.duration_ms = self.started.elapsed().as_millis() as u64;
            (self.sink)(e);
        }
    }
}

/// A body that counts the bytes that pass through it.
struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
    #[allow(dead_code)] // held for its Drop
    guard: Option<Arc<LogGuard>>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
