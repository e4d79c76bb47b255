//! The forward proxy behind each sandbox's door: HTTP/1.1 with keep-alive on
//! both sides, and CONNECT. Every request is decided by the sandbox's
//! policy, resolved and checked here, dialled at exactly the checked
//! address, and logged. CONNECT tunnels that carry TLS are intercepted with
//! the sandbox's CA (unless a bypass rule says otherwise), so that the
//! gateway sees each request, refuses domain fronting, and puts API keys in;
//! anything else is tunnelled as it is.
//!
//! Every wait a client controls has a timeout, and each sandbox may hold a
//! bounded number of connections (see limits.rs); a policy change reaches
//! open connections too: each request inside a keep-alive connection or an
//! intercepted tunnel is decided again, and a tunnel that is not
//! intercepted is closed when its host is blocked.

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
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::credentials::{for_host, Credential};
use crate::encoding::BoxError;
use crate::host::{normalize, split_host_port, Host};
use crate::limits::{Activity, Held, Limits, Slot, Slots};
use crate::log::{now_rfc3339, LogEntry, LogSink};
use crate::policy::{Action, Policy, Verdict};
use crate::tls::{CaPem, Leaves};

type ProxyBody = BoxBody<Bytes, BoxError>;

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests whose head is larger than this get 431.
const MAX_HEAD: usize = 64 * 1024;
/// How long the accept loop rests when the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Opens a connection in place of one to a port of the host's loopback:
/// the daemon hands such doors to a sandbox for services that must answer
/// it differently from the host's own processes (the model runner's
/// sandbox scope). Called off the gateway's reactor; it may block briefly.
pub type LoopbackDialer = Arc<dyn Fn() -> std::io::Result<std::net::TcpStream> + Send + Sync>;

/// One sandbox's side of the gateway.
struct Gate {
    name: String,
    policy: RwLock<Policy>,
    /// Told of every policy change, so that open tunnels look again at once.
    policy_changed: tokio::sync::watch::Sender<()>,
    /// Leaf certificates from the sandbox's CA; without a CA nothing is intercepted.
    leaves: Option<Arc<Leaves>>,
    stop: tokio::sync::watch::Sender<bool>,
    slots: Arc<Slots>,
    /// Ports of the host's loopback that lead elsewhere for this sandbox.
    loopback: HashMap<u16, LoopbackDialer>,
}

/// What every connection of every sandbox shares.
struct Shared {
    sink: LogSink,
    /// Names the gateway resolves itself (split-horizon set-ups, tests):
    /// an address, and optionally the port to dial instead.
    names: RwLock<HashMap<String, (IpAddr, Option<u16>)>>,
    local: Vec<IpAddr>,
    client_tls: Arc<rustls::ClientConfig>,
    credentials: RwLock<Arc<Vec<Credential>>>,
    limits: RwLock<Limits>,
}

impl Shared {
    fn limits(&self) -> Limits {
        *read(&self.limits)
    }
}

/// The gateway: its own runtime, and the sandboxes it serves.
pub struct Gateway {
    runtime: tokio::runtime::Runtime,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("cannot start the gateway's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot serve the door: {0}")]
    Door(std::io::Error),
}

impl Gateway {
    /// `extra_ca` are PEM files of CAs to trust upstream beyond the host's store.
    pub fn new(sink: LogSink, extra_ca: &[&std::path::Path]) -> Result<Gateway, GatewayError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("moat-gateway")
            .enable_all()
            .build()
            .map_err(GatewayError::Runtime)?;
        let shared = Shared {
            sink,
            local: crate::ranges::local_addresses(),
            client_tls: crate::tls::client_config(extra_ca)?,
            names: RwLock::new(HashMap::new()),
            credentials: RwLock::new(Arc::new(Vec::new())),
            limits: RwLock::new(Limits::default()),
        };
        Ok(Gateway {
            runtime,
            gates: Mutex::new(HashMap::new()),
            shared: Arc::new(shared),
        })
    }

    /// Every limit at once (timeouts, connections per sandbox); connections
    /// opened from now on get them.
    pub fn set_limits(&self, limits: Limits) {
        *self
            .shared
            .limits
            .write()
            .unwrap_or_else(|p| p.into_inner()) = limits;
    }

    pub fn limits(&self) -> Limits {
        self.shared.limits()
    }

    /// Serve the sandbox `id` (called `name`) on `listener`, its door.
    pub fn attach(
        &self,
        id: &str,
        name: &str,
        policy: Policy,
        ca: Option<&CaPem>,
        listener: std::net::TcpListener,
    ) -> Result<(), GatewayError> {
        self.attach_with(id, name, policy, ca, listener, HashMap::new())
    }

    /// [`Gateway::attach`], with ports of the host's loopback that lead to
    /// `loopback`'s dialers instead, once the policy allows them.
    pub fn attach_with(
        &self,
        id: &str,
        name: &str,
        policy: Policy,
        ca: Option<&CaPem>,
        listener: std::net::TcpListener,
        loopback: HashMap<u16, LoopbackDialer>,
    ) -> Result<(), GatewayError> {
        listener.set_nonblocking(true).map_err(GatewayError::Door)?;
        let leaves = ca.map(Leaves::new).transpose()?.map(Arc::new);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let gate = Arc::new(Gate {
            name: name.to_string(),
            policy: RwLock::new(policy),
            policy_changed: tokio::sync::watch::channel(()).0,
            leaves,
            stop,
            slots: Arc::new(Slots::default()),
            loopback,
        });
        if let Some(old) = lock(&self.gates).insert(id.to_string(), Arc::clone(&gate)) {
            let _ = old.stop.send(true);
        }
        let shared = Arc::clone(&self.shared);
        let _enter = self.runtime.enter();
        let listener = TcpListener::from_std(listener).map_err(GatewayError::Door)?;
        self.runtime
            .spawn(accept_loop(listener, gate, shared, stopped));
        Ok(())
    }

    /// Apply a new policy to a running sandbox: from its next request on,
    /// also inside open connections; open tunnels to a host it blocks close.
    pub fn set_policy(&self, id: &str, policy: Policy) {
        if let Some(gate) = lock(&self.gates).get(id) {
            *gate.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
            gate.policy_changed.send_replace(());
        }
    }

    /// Connections the sandbox `id` holds open through its door now.
    pub fn open_connections(&self, id: &str) -> usize {
        lock(&self.gates).get(id).map_or(0, |g| g.slots.open())
    }

    /// Names resolved to fixed addresses (and ports) instead of by DNS.
    pub fn set_static_names(&self, names: HashMap<String, (IpAddr, Option<u16>)>) {
        *self.shared.names.write().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// The keys to put in, for every sandbox.
    pub fn set_credentials(&self, credentials: Vec<Credential>) {
        *self
            .shared
            .credentials
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(credentials);
    }

    /// Stop serving a sandbox; its open connections end.
    pub fn detach(&self, id: &str) {
        if let Some(gate) = lock(&self.gates).remove(id) {
            let _ = gate.stop.send(true);
        }
    }
}

/// Serve a door until its sandbox is detached: each client within the
/// sandbox's connection cap, the rest closed at once.
async fn accept_loop(
    listener: TcpListener,
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut starved = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if crate::limits::out_of_resources(&e) => {
                // The pending connection stays queued; retrying at once would spin.
                if !std::mem::replace(&mut starved, true) {
                    tracing::warn!(
                        "gateway: door of {}: {e}; accepting again shortly",
                        gate.name
                    );
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
            Err(_) => continue,
        };
        starved = false;
        let limits = shared.limits();
        let Some(slot) = gate.slots.take(limits.max_connections, &gate.name) else {
            drop(stream);
            continue;
        };
        let conn = Conn::new(Arc::clone(&gate), Arc::clone(&shared), Arc::new(slot));
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn.serve(stream) => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

/// An open upstream connection and where it goes.
type Upstream = (SocketAddr, Sender);

/// An upstream connection: HTTP/1.1, or HTTP/2 where the server's ALPN chose it.
enum Sender {
    H1(SendRequest<Counted<Incoming>>),
    H2(hyper::client::conn::http2::SendRequest<Counted<Incoming>>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    async fn ready(&mut self) -> Result<(), hyper::Error> {
        match self {
            Sender::H1(s) => s.ready().await,
            Sender::H2(s) => s.ready().await,
        }
    }

    async fn send(
        &mut self,
        req: Request<Counted<Incoming>>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Sender::H1(s) => s.send_request(req).await,
            Sender::H2(s) => s.send_request(req).await,
        }
    }
}

/// One client connection through a door (or one intercepted tunnel).
#[derive(Clone)]
struct Conn {
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    /// The upstream connection of the last request, kept alive for the next.
    upstream: Arc<tokio::sync::Mutex<Option<Upstream>>>,
    /// The client's place under its sandbox's cap, held as long as the
    /// connection or a tunnel made of it lives.
    slot: Arc<Slot>,
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
#[derive(Clone)]
struct Target {
    host: Host,
    port: u16,
}

/// The host's name inside means the host's loopback, as in Docker's sandboxes.
fn loopback_alias(host: Host) -> Host {
    if host == Host::Name("host.docker.internal".into()) {
        Host::Name("localhost".into())
    } else {
        host
    }
}

fn request_target(req: &Request<Incoming>) -> Result<Target, String> {
    let authority = req
        .uri()
        .authority()
        .ok_or("no host in the request target: send absolute-form requests (http://host/path) or CONNECT host:port")?;
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
    Ok(Target {
        host: loopback_alias(normalize(host).map_err(|e| e.to_string())?),
        port,
    })
}

/// Whether the request names its host more than once: the first Host is the
/// one checked, and an upstream may read another.
fn duplicate_host(req: &Request<Incoming>) -> bool {
    req.headers().get_all(header::HOST).iter().nth(1).is_some()
}

fn duplicate_host_response() -> Response<ProxyBody> {
    text_response(
        StatusCode::BAD_REQUEST,
        "moat: a request must name its host once: send a single Host header\n".into(),
    )
}

/// Whether the Host header and the request target's authority (HTTP/2's
/// `:authority`), where present, name `target` (a missing port meaning `default_port`).
fn host_header_matches(req: &Request<Incoming>, target: &Target, default_port: u16) -> bool {
    let names = |value: &str| {
        split_host_port(value)
            .and_then(|(hh, p)| {
                normalize(hh)
                    .ok()
                    .map(|n| (loopback_alias(n), p.unwrap_or(default_port)))
            })
            .is_some_and(|(n, p)| n == target.host && p == target.port)
    };
    let header_ok = match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok().is_some_and(names),
        None => true,
    };
    let authority_ok =
        req.method() == Method::CONNECT || req.uri().authority().is_none_or(|a| names(a.as_str()));
    header_ok && authority_ok
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

/// How a request goes upstream.
struct Route {
    target: Target,
    addr: SocketAddr,
    verdict: Verdict,
    /// TLS to the upstream with this name, for intercepted requests.
    tls: Option<ServerName<'static>>,
}

impl Conn {
    fn new(gate: Arc<Gate>, shared: Arc<Shared>, slot: Arc<Slot>) -> Conn {
        Conn {
            gate,
            shared,
            upstream: Arc::new(tokio::sync::Mutex::new(None)),
            slot,
        }
    }

    fn sink(&self, entry: LogEntry) {
        (self.shared.sink)(entry)
    }

    async fn serve(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let limits = self.shared.limits();
        let activity = Activity::new();
        let me = self.clone();
        let watched = Arc::clone(&activity);
        let service = service_fn(move |req| {
            let me = me.clone();
            let busy = watched.busy();
            async move {
                Ok::<_, Infallible>(
                    me.handle(req)
                        .await
                        .map(|b| Held { inner: b, busy }.boxed()),
                )
            }
        });
        let conn = http1_server(&limits)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        // A keep-alive connection with nothing in flight for long is closed.
        tokio::select! {
            _ = conn => {}
            _ = crate::limits::idle(activity, limits.header_timeout, limits.idle_timeout) => {}
        }
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
                self.sink(self.entry(&method, &target, path, &verdict, resp.status().as_u16()));
                return resp;
            }
        };
        if duplicate_host(&req) {
            self.sink(self.entry(&method, &target, path, &verdict, 400));
            return duplicate_host_response();
        }
        if req.method() == Method::CONNECT {
            // A Host header on CONNECT names the target too; its port may go unsaid.
            if !host_header_matches(&req, &target, target.port) {
                self.sink(self.entry(&method, &target, path, &verdict, 421));
                return misdirected();
            }
            return self.tunnel(req, target, addr, verdict, started).await;
        }
        if !host_header_matches(&req, &target, 80) {
            self.sink(self.entry(&method, &target, path, &verdict, 421));
            return misdirected();
        }
        let route = Route {
            target,
            addr,
            verdict,
            tls: None,
        };
        self.forward_with(req, &route, None, None, started).await
    }

    /// Decide, resolve and check: the address to dial and the verdict, or the refusal.
    async fn admit(
        &self,
        target: &Target,
    ) -> Result<(SocketAddr, Verdict), (Verdict, Response<ProxyBody>)> {
        let policy = read(&self.gate.policy).clone();
        let host_verdict = policy.decide_host(&target.host, target.port);
        if !host_verdict.allowed() {
            let resp = self.forbidden(target, &host_verdict);
            return Err((host_verdict, resp));
        }
        let fixed = match &target.host {
            Host::Name(n) => read(&self.shared.names).get(n).copied(),
            Host::Ip(_) => None,
        };
        let addrs: Vec<IpAddr> = match &target.host {
            _ if fixed.is_some() => fixed.iter().map(|(ip, _)| *ip).collect(),
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
            let verdict = policy.decide_address(&host_verdict, ip, &self.shared.local);
            if verdict.allowed() {
                let port = fixed.and_then(|(_, p)| p).unwrap_or(target.port);
                return Ok((
                    SocketAddr::new(crate::host::canonical_ip(ip), port),
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
        if let Some(dialer) = addr
            .ip()
            .is_loopback()
            .then(|| self.gate.loopback.get(&addr.port()))
            .flatten()
        {
            return self.dial_instead(Arc::clone(dialer)).await.map_err(failed);
        }
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

    /// A connection from the daemon's dialer, in place of the host's loopback.
    async fn dial_instead(&self, dialer: LoopbackDialer) -> Result<TcpStream, String> {
        let dialed =
            tokio::time::timeout(DIAL_TIMEOUT, tokio::task::spawn_blocking(move || dialer()))
                .await
                .map_err(|_| format!("no answer within {} s", DIAL_TIMEOUT.as_secs()))?
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        dialed.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = TcpStream::from_std(dialed).map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Resolves when a tunnel to `target` at `addr` must close: its sandbox
    /// was detached, or a policy change now refuses the host or the address.
    fn tunnel_end(
        &self,
        target: &Target,
        addr: SocketAddr,
    ) -> impl std::future::Future<Output = ()> {
        let gate = Arc::clone(&self.gate);
        let shared = Arc::clone(&self.shared);
        let target = target.clone();
        let mut changed = gate.policy_changed.subscribe();
        let mut stopped = gate.stop.subscribe();
        async move {
            let stop = stopped.wait_for(|stop| *stop);
            tokio::pin!(stop);
            // Looked at once first: the policy may have changed since the tunnel was admitted.
            while still_allowed(&gate, &shared.local, &target, addr) {
                tokio::select! {
                    c = changed.changed() => if c.is_err() { return },
                    _ = &mut stop => return,
                }
            }
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
        let upstream = match self.dial(&target, addr).await {
            Ok(s) => s,
            Err(resp) => {
                self.sink(self.entry("CONNECT", &target, None, &verdict, 502));
                return resp;
            }
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            // Back to the plain socket (and what hyper had read past the CONNECT head),
            // so that a tunnel can splice without copying through user space.
            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                return;
            };
            let (client, pending) = (parts.io.into_inner(), parts.read_buf);
            // Peek at the first byte: a TLS handshake starts with 0x16. A server
            // that speaks first (SMTP, a database) means this is no TLS client.
            // A client speaks first at once (a TLS hello) or the server does:
            // a tunnel where neither says anything within the head timeout closes.
            let tls = match pending.first() {
                Some(b) => *b == 0x16,
                None => {
                    let mut first = [0u8; 1];
                    let idle = me.shared.limits().header_timeout;
                    tokio::select! {
                        peeked = client.peek(&mut first) => matches!(peeked, Ok(1)) && first[0] == 0x16,
                        _ = upstream.readable() => false,
                        _ = tokio::time::sleep(idle) => {
                            let mut entry = me.entry("CONNECT", &target, None, &verdict, 200);
                            entry.duration_ms = started.elapsed().as_millis() as u64;
                            me.sink(entry);
                            return;
                        }
                    }
                }
            };
            let leaves = me
                .gate
                .leaves
                .clone()
                .filter(|_| verdict.action != Action::Bypass);
            match leaves {
                Some(leaves) if tls => {
                    let client = Prefixed {
                        prefix: pending.to_vec(),
                        inner: client,
                    };
                    me.intercept(
                        client,
                        upstream,
                        leaves,
                        Route {
                            target,
                            addr,
                            verdict,
                            tls: None,
                        },
                    )
                    .await
                }
                _ => {
                    me.pipe(client, &pending, upstream, (target, addr), verdict, started)
                        .await
                }
            }
        });
        Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    /// Bytes both ways, untouched: bypassed hosts and what is not TLS.
    async fn pipe(
        &self,
        client: TcpStream,
        pending: &[u8],
        upstream: TcpStream,
        (target, addr): (Target, SocketAddr),
        verdict: Verdict,
        started: Instant,
    ) {
        let mut entry = self.entry("CONNECT", &target, None, &verdict, 200);
        let sent = if pending.is_empty() {
            Ok(())
        } else {
            write_all(&upstream, pending).await
        };
        // The kernel moves the bytes (see tunnel.rs): a tunnel carries bulk data.
        if sent.is_ok() {
            let idle = self.shared.limits().tunnel_idle_timeout;
            let end = self.tunnel_end(&target, addr);
            if let Ok((up, down)) = crate::tunnel::relay(client, upstream, idle, end).await {
                entry.bytes_up = pending.len() as u64 + up;
                entry.bytes_down = down;
            }
        }
        entry.duration_ms = started.elapsed().as_millis() as u64;
        self.sink(entry);
    }

    /// Terminate the client's TLS with a leaf from the sandbox's CA and serve
    /// its requests one by one, each decided, logged and sent on over TLS.
    async fn intercept(
        &self,
        client: Prefixed<TcpStream>,
        upstream: TcpStream,
        leaves: Arc<Leaves>,
        mut route: Route,
    ) {
        let name = match &route.target.host {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        };
        let Ok(config) = crate::tls::server_config(&leaves, &name) else {
            return;
        };
        let limits = self.shared.limits();
        // A client that starts a handshake and stalls holds nothing for long.
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(client);
        let Ok(Ok(tls)) = tokio::time::timeout(limits.tls_handshake_timeout, accept).await else {
            self.sink(self.entry("CONNECT", &route.target, None, &route.verdict, 400));
            return;
        };
        // The name in the TLS handshake must be the CONNECT target: no domain fronting.
        let sni_ok = tls.get_ref().1.server_name().is_none_or(|sni| {
            normalize(sni).ok().map(loopback_alias) == Some(route.target.host.clone())
        });
        route.tls = ServerName::try_from(name).ok();
        let inner = self.clone_fresh();
        let route = Arc::new(route);
        let first = Arc::new(Mutex::new(Some(upstream)));
        let activity = Activity::new();
        let watched = Arc::clone(&activity);
        let service = service_fn(move |req: Request<Incoming>| {
            let inner = inner.clone();
            let route = Arc::clone(&route);
            let first = Arc::clone(&first);
            let busy = watched.busy();
            async move {
                let resp = inner.handle_intercepted(req, &route, sni_ok, &first).await;
                Ok::<_, Infallible>(resp.map(|b| Held { inner: b, busy }.boxed()))
            }
        });
        let serve = async move {
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
            } else {
                let _ = http1_server(&limits)
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            }
        };
        // HTTP/2 has no head timeout of its own: the first request must come
        // within the head timeout, the next ones within the idle timeout.
        let mut stopped = self.gate.stop.subscribe();
        tokio::select! {
            _ = serve => {}
            _ = crate::limits::idle(activity, limits.header_timeout, limits.idle_timeout) => {}
            _ = stopped.wait_for(|stop| *stop) => {}
        }
    }

    /// A connection of the same client with no upstream connection yet.
    fn clone_fresh(&self) -> Conn {
        Conn::new(
            Arc::clone(&self.gate),
            Arc::clone(&self.shared),
            Arc::clone(&self.slot),
        )
    }

    async fn handle_intercepted(
        &self,
        req: Request<Incoming>,
        route: &Route,
        sni_ok: bool,
        first: &Mutex<Option<TcpStream>>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        if duplicate_host(&req) {
            self.sink(self.entry(&method, &route.target, Some(path), &route.verdict, 400));
            return duplicate_host_response();
        }
        if !sni_ok || !host_header_matches(&req, &route.target, 443) {
            self.sink(self.entry(&method, &route.target, Some(path), &route.verdict, 421));
            return misdirected();
        }
        // A policy change applies to the next request, also inside a tunnel:
        // the host, and the address it was dialled at (a CIDR rule).
        let verdict = {
            let policy = read(&self.gate.policy);
            let host = policy.decide_host(&route.target.host, route.target.port);
            match host.allowed() {
                true => policy.decide_address(&host, route.addr.ip(), &self.shared.local),
                false => host,
            }
        };
        if !verdict.allowed() {
            self.sink(self.entry(&method, &route.target, Some(path), &verdict, 403));
            return self.forbidden(&route.target, &verdict);
        }
        let credential = match &route.target.host {
            Host::Name(n) => for_host(&read(&self.shared.credentials), n).cloned(),
            Host::Ip(_) => None,
        };
        let pre_dialed = lock(first).take();
        self.forward_with(req, route, credential.as_ref(), pre_dialed, started)
            .await
    }

    /// Send a request on (plain or over TLS), keeping the upstream connection
    /// for the next request; with a credential, put the key in and keep it
    /// from flowing back.
    async fn forward_with(
        &self,
        req: Request<Incoming>,
        route: &Route,
        credential: Option<&Credential>,
        pre_dialed: Option<TcpStream>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        let method = parts.method.to_string();
        let authority = match parts.uri.authority() {
            Some(a) => a.as_str().to_string(),
            None => route.target.host.to_string(),
        };
        parts.uri = match parts
            .uri
            .path_and_query()
            .map(|pq| pq.as_str().parse::<Uri>())
        {
            Some(Ok(u)) => u,
            _ => Uri::from_static("/"),
        };
        strip_hop_by_hop(&mut parts.headers);
        // Upstream connections speak HTTP/1.1, whatever the client spoke.
        parts.version = http::Version::HTTP_11;
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(&authority) {
                parts.headers.insert(header::HOST, v);
            }
        }
        if let Some(c) = credential {
            c.inject(&mut parts.headers);
        }
        let up = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicU64::new(0));
        let failed = |me: &Conn, why: String| {
            me.sink(me.entry(
                &method,
                &route.target,
                Some(path.clone()),
                &route.verdict,
                502,
            ));
            text_response(
                StatusCode::BAD_GATEWAY,
                format!("moat: {}:{}: {why}\n", route.target.host, route.target.port),
            )
        };

        let mut cache = self.upstream.lock().await;
        let mut sender = match cache.take() {
            Some((a, s)) if a == route.addr && !s.is_closed() => s,
            _ => {
                let stream = match pre_dialed {
                    Some(s) => s,
                    None => match self.dial(&route.target, route.addr).await {
                        Ok(s) => s,
                        Err(resp) => {
                            self.sink(self.entry(
                                &method,
                                &route.target,
                                Some(path),
                                &route.verdict,
                                502,
                            ));
                            return resp;
                        }
                    },
                };
                let handshake = match &route.tls {
                    None => hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .map(|(s, c)| {
                            tokio::spawn(c);
                            Sender::H1(s)
                        }),
                    Some(name) => {
                        let connector =
                            tokio_rustls::TlsConnector::from(Arc::clone(&self.shared.client_tls));
                        let limit = self.shared.limits().tls_handshake_timeout;
                        let connected =
                            tokio::time::timeout(limit, connector.connect(name.clone(), stream))
                                .await
                                .unwrap_or_else(|_| {
                                    Err(std::io::Error::new(
                                        std::io::ErrorKind::TimedOut,
                                        format!("no handshake within {} s", limit.as_secs()),
                                    ))
                                });
                        match connected {
                            Ok(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                hyper::client::conn::http2::handshake(
                                    hyper_util::rt::TokioExecutor::new(),
                                    TokioIo::new(tls),
                                )
                                .await
                                .map(|(s, c)| {
                                    tokio::spawn(c);
                                    Sender::H2(s)
                                })
                            }
                            Ok(tls) => hyper::client::conn::http1::handshake(TokioIo::new(tls))
                                .await
                                .map(|(s, c)| {
                                    tokio::spawn(c);
                                    Sender::H1(s)
                                }),
                            Err(e) => {
                                return failed(self, format!("TLS with the server failed: {e}"))
                            }
                        }
                    }
                };
                match handshake {
                    Ok(s) => s,
                    Err(e) => return failed(self, e.to_string()),
                }
            }
        };
        if let Err(e) = sender.ready().await {
            return failed(self, e.to_string());
        }
        if let Sender::H2(_) = sender {
            // HTTP/2 names the host in :authority, from an absolute target.
            parts.version = http::Version::HTTP_2;
            let pq = parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            if let Ok(uri) = format!("https://{authority}{pq}").parse::<Uri>() {
                parts.uri = uri;
            }
            parts.headers.remove(header::HOST);
        }
        let req = Request::from_parts(
            parts,
            Counted {
                inner: body,
                count: Arc::clone(&up),
                guard: None,
            },
        );
        let resp = match sender.send(req).await {
            Ok(r) => r,
            Err(e) => return failed(self, e.to_string()),
        };
        *cache = Some((route.addr, sender));
        drop(cache);
        let (mut parts, body) = resp.into_parts();
        let entry = self.entry(
            &method,
            &route.target,
            Some(path),
            &route.verdict,
            parts.status.as_u16(),
        );
        let guard = Arc::new(LogGuard {
            entry: Mutex::new(Some(entry)),
            up,
            down: Arc::clone(&down),
            started,
            sink: Arc::clone(&self.shared.sink),
        });
        let counted = Counted {
            inner: body,
            count: down,
            guard: Some(guard),
        };
        match credential {
            // Whatever echoes the key back gets the placeholder.
            Some(c) => match crate::echo::masked(&mut parts, counted, c.secrets()) {
                Ok(body) => {
                    strip_hop_by_hop(&mut parts.headers);
                    Response::from_parts(parts, body)
                }
                Err(why) => text_response(
                    StatusCode::BAD_GATEWAY,
                    format!("moat: {}: {why}\n", route.target.host),
                ),
            },
            None => {
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, counted.map_err(Into::into).boxed())
            }
        }
    }
}

/// Whether the current policy still lets the sandbox reach `target` at `addr`.
fn still_allowed(gate: &Gate, local: &[IpAddr], target: &Target, addr: SocketAddr) -> bool {
    let policy = read(&gate.policy);
    let host = policy.decide_host(&target.host, target.port);
    host.allowed() && policy.decide_address(&host, addr.ip(), local).allowed()
}

/// A stream with bytes already read from it put back in front.
struct Prefixed<T> {
    prefix: Vec<u8>,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
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
    /// Held for its Drop: the log row is written when the body goes.
    #[allow(dead_code)]
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

async fn write_all(to: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Builder for the proxy's HTTP/1.1 server side: every request's head,
/// the first and each next on a keep-alive connection, within the timeout.
fn http1_server(limits: &Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD);
    b
}

fn misdirected() -> Response<ProxyBody> {
    text_response(
        StatusCode::MISDIRECTED_REQUEST,
        "moat: the Host header, the TLS server name and the CONNECT target must name the same host\n".into(),
    )
}
