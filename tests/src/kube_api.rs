//! A Kubernetes API server stand-in: the list/watch HTTP protocol for Services,
//! EndpointSlices and Nodes, with real-format JSON, for testing `l3lb run --kubernetes`
//! where no real API server can run.
//!
//! What it does as a real API server does (and what kube-rs relies on):
//! - one global resourceVersion counter; every create, update and delete takes the next
//!   value, written into the object's `metadata.resourceVersion`;
//! - `GET <collection>` lists: `{"kind":"ServiceList","apiVersion":"v1","metadata":
//!   {"resourceVersion":"N"},"items":[…]}`, items without `kind`/`apiVersion` as the real
//!   server sends them; `limit` is honoured by returning everything at once with no
//!   `continue`, which the API allows (the watch cache does the same);
//! - `GET <collection>?watch=true&resourceVersion=N` streams newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":…}` with chunked encoding, every
//!   change after N, then live ones; `BOOKMARK`s (when `allowWatchBookmarks=true`) carry
//!   only the kind and the current resourceVersion; the stream ends after
//!   `timeoutSeconds`;
//! - a watch from a resourceVersion older than the compaction point gets HTTP 200 and a
//!   single `ERROR` event holding a `Status` with code 410, reason `Expired`, then the end
//!   of the stream, exactly as kube-apiserver answers;
//! - `POST /apis/events.k8s.io/v1/namespaces/NS/events` stores an Event (201);
//! - anything else: a `Status` with 404.
//!
//! Test controls: [`ApiServer::expire`] closes every watch and compacts history after
//! applying changes the watchers never see as events (they must relist);
//! [`ApiServer::down`] / [`ApiServer::up`] take the server off and back on its port.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::netns::Netns;

/// A watched collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Services.
    Service,
    /// discovery.k8s.io/v1 EndpointSlices.
    EndpointSlice,
    /// core/v1 Nodes (cluster-scoped).
    Node,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn of(object: &Value) -> Result<Kind> {
        let kind = object["kind"].as_str().unwrap_or_default();
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == kind)
            .with_context(|| format!("the stand-in does not serve kind {kind:?}"))
    }
}

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    verb: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch.
    generation: u64,
    up: bool,
    events: Vec<Value>,
    requests: Vec<String>,
    uid: u64,
    /// Every connection accepted, so `down` can close idle keep-alive ones too.
    conns: Vec<TcpStream>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running stand-in; dropping it stops it.
#[derive(Debug)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

fn key_of(kind: Kind, object: &Value) -> Result<(Kind, String, String)> {
    let name = object["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?
        .to_string();
    let namespace = match kind {
        Kind::Node => String::new(),
        _ => object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
    };
    Ok((kind, namespace, name))
}

/// RFC 3339 UTC timestamp of now, as the API server writes `creationTimestamp`.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A `Status` object as the API server sends for errors.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

impl ApiServer {
    /// Starts the stand-in on 127.0.0.1 (a free port) inside `ns`, where the agent runs.
    pub fn start_in(ns: &Netns) -> Result<ApiServer> {
        ApiServer::start_on(ns, SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts the stand-in on `bind` inside `ns` (e.g. 0.0.0.0:0 so agents in other
    /// namespaces reach it over the lab's fabric).
    pub fn start_on(ns: &Netns, bind: SocketAddr) -> Result<ApiServer> {
        let listener = ns.enter(move || TcpListener::bind(bind))??;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        shared.lock().up = true;
        let mut server = ApiServer {
            shared,
            addr,
            acceptor: None,
        };
        server.acceptor = Some(server.accept_loop(listener)?);
        Ok(server)
    }

    /// The server's URL, for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at the stand-in.
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_for(&self.url())
    }

    /// A kubeconfig that reaches the stand-in at `host` (its port stays the bound one).
    pub fn kubeconfig_via(&self, host: std::net::IpAddr) -> String {
        self.kubeconfig_for(&format!(
            "http://{}",
            SocketAddr::new(host, self.addr.port())
        ))
    }

    fn kubeconfig_for(&self, url: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
             users:\n- name: tester\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    \
             cluster: stand-in\n    user: tester\ncurrent-context: stand-in\n",
            url
        )
    }

    fn accept_loop(&self, listener: TcpListener) -> Result<JoinHandle<()>> {
        // Non-blocking accept polled every 20 ms, so `down` can stop it without a
        // connection to wake it.
        listener.set_nonblocking(true)?;
        let shared = self.shared.clone();
        Ok(std::thread::Builder::new()
            .name("kube-api".into())
            .spawn(move || {
                loop {
                    if !shared.lock().up {
                        return;
                    }
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            let _ = stream.set_nonblocking(false);
                            if let Ok(c) = stream.try_clone() {
                                shared.lock().conns.push(c);
                            }
                            let _ = std::thread::Builder::new()
                                .name("kube-api-conn".into())
                                .spawn(move || {
                                    let _ = serve_connection(&shared, stream);
                                });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?)
    }

    /// Creates or replaces an object (its `kind` picks the collection) and returns it as
    /// stored, with its new resourceVersion.
    pub fn apply(&self, object: Value) -> Result<Value> {
        let mut s = self.shared.lock();
        let stored = apply_locked(&mut s, object)?;
        self.shared.changed.notify_all();
        Ok(stored)
    }

    /// Deletes an object; an error if it does not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        let mut s = self.shared.lock();
        delete_locked(&mut s, kind, namespace, name)?;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Makes every open watch expire: `changes` are applied (watchers get no events for
    /// them), history up to now is compacted, and every watch is closed, so the next watch
    /// from an old resourceVersion gets `410 Gone` and the client must relist.
    pub fn expire(&self, changes: impl FnOnce(&mut Mutations<'_>) -> Result<()>) -> Result<()> {
        let mut s = self.shared.lock();
        s.generation += 1;
        changes(&mut Mutations { state: &mut s })?;
        s.compacted = s.rv;
        s.history.clear();
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Ends every open watch cleanly (as at the end of `timeoutSeconds`), keeping history:
    /// clients watch again from their last resourceVersion and miss nothing.
    pub fn close_watches(&self) {
        self.shared.lock().generation += 1;
        self.shared.changed.notify_all();
    }

    /// Takes the server off its port: new connections are refused, open ones closed.
    pub fn down(&mut self) -> Result<()> {
        {
            let mut s = self.shared.lock();
            s.up = false;
            s.generation += 1;
            for c in s.conns.drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
        if let Some(h) = self.acceptor.take() {
            h.join()
                .map_err(|_| anyhow::anyhow!("the stand-in's accept thread panicked"))?;
        }
        Ok(())
    }

    /// Puts the server back on the same port (inside `ns`), with the state it had.
    pub fn up(&mut self, ns: &Netns) -> Result<()> {
        let addr = self.addr;
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match ns.enter(move || TcpListener::bind(addr))? {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e).with_context(|| format!("binding {addr} again")),
            }
        };
        self.shared.lock().up = true;
        self.acceptor = Some(self.accept_loop(listener)?);
        Ok(())
    }

    /// Events posted so far (events.k8s.io/v1 objects as received).
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.clone()
    }

    /// Request lines served so far (`GET /api/v1/services?…`), in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

/// Changes applied inside [`ApiServer::expire`].
pub struct Mutations<'a> {
    state: &'a mut State,
}

impl Mutations<'_> {
    /// Creates or replaces an object.
    pub fn apply(&mut self, object: Value) -> Result<Value> {
        apply_locked(self.state, object)
    }

    /// Deletes an object.
    pub fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> Result<()> {
        delete_locked(self.state, kind, namespace, name)
    }
}

fn apply_locked(s: &mut State, mut object: Value) -> Result<Value> {
    let kind = Kind::of(&object)?;
    object["apiVersion"] = json!(kind.api_version());
    let key = key_of(kind, &object)?;
    s.rv += 1;
    let rv = s.rv;
    let verb = match s.objects.get(&key) {
        Some(old) => {
            // Identity and age stay with the object, as on a real update.
            object["metadata"]["uid"] = old["metadata"]["uid"].clone();
            object["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
            "MODIFIED"
        }
        None => {
            s.uid += 1;
            if object["metadata"]["uid"].is_null() {
                object["metadata"]["uid"] =
                    json!(format!("00000000-0000-4000-8000-{:012x}", s.uid));
            }
            if object["metadata"]["creationTimestamp"].is_null() {
                object["metadata"]["creationTimestamp"] = json!(now_rfc3339());
            }
            "ADDED"
        }
    };
    if kind != Kind::Node && object["metadata"]["namespace"].is_null() {
        object["metadata"]["namespace"] = json!("default");
    }
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    s.objects.insert(key, object.clone());
    s.history.push(Change {
        rv,
        kind,
        verb,
        object: object.clone(),
    });
    Ok(object)
}

fn delete_locked(s: &mut State, kind: Kind, namespace: &str, name: &str) -> Result<()> {
    let ns = if kind == Kind::Node { "" } else { namespace };
    let Some(mut object) = s.objects.remove(&(kind, ns.to_string(), name.to_string())) else {
        bail!("{} {namespace}/{name} does not exist", kind.name());
    };
    s.rv += 1;
    object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
    let rv = s.rv;
    s.history.push(Change {
        rv,
        kind,
        verb: "DELETED",
        object,
    });
    Ok(())
}

/// A parsed request: method, path, query parameters, body.
struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<(Request, String)>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let line = line.trim_end().to_string();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; content_length];
    reader.read_exact(&mut body)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), q),
        None => (target.clone(), ""),
    };
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), percent_decode(v)),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    Ok(Some((
        Request {
            method,
            path,
            query,
            body,
        },
        line,
    )))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(stream: &mut TcpStream, code: u16, reason: &str, body: &Value) -> Result<()> {
    let body = serde_json::to_vec(body)?;
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    stream.flush()?;
    Ok(())
}

fn serve_connection(shared: &Shared, stream: TcpStream) -> Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut stream = stream;
    // Keep-alive: one request after another until the client closes, a watch is cut short
    // (an error writing to it) or the server goes down. A watch that ends cleanly leaves
    // the connection usable, as with the real server: the client may send its next
    // request on it at once (closing here raced with that, and the failed request made
    // the agent relist).
    while let Some((req, line)) = read_request(&mut reader)? {
        let generation = {
            let mut s = shared.lock();
            if !s.up {
                break;
            }
            s.requests.push(line);
            s.generation
        };
        let kind = Kind::ALL.into_iter().find(|k| k.path() == req.path);
        match (req.method.as_str(), kind) {
            ("GET", Some(kind)) if req.query.get("watch").map(String::as_str) == Some("true") => {
                watch(shared, &mut stream, kind, &req, generation)?;
            }
            ("GET", Some(kind)) => {
                let s = shared.lock();
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((k, _, _), _)| *k == kind)
                    .map(|(_, o)| {
                        // List items come without kind and apiVersion from the real server.
                        let mut o = o.clone();
                        if let Some(m) = o.as_object_mut() {
                            m.remove("kind");
                            m.remove("apiVersion");
                        }
                        o
                    })
                    .collect();
                let list = json!({
                    "kind": format!("{}List", kind.name()),
                    "apiVersion": kind.api_version(),
                    "metadata": {"resourceVersion": s.rv.to_string()},
                    "items": items,
                });
                drop(s);
                respond(&mut stream, 200, "OK", &list)?;
            }
            ("POST", None)
                if req.path.starts_with("/apis/events.k8s.io/v1/namespaces/")
                    && req.path.ends_with("/events") =>
            {
                let mut event: Value = match serde_json::from_slice(&req.body) {
                    Ok(v) => v,
                    Err(e) => {
                        respond(
                            &mut stream,
                            400,
                            "Bad Request",
                            &status(400, "BadRequest", &e.to_string()),
                        )?;
                        continue;
                    }
                };
                let mut s = shared.lock();
                s.rv += 1;
                event["metadata"]["resourceVersion"] = json!(s.rv.to_string());
                event["metadata"]["creationTimestamp"] = json!(now_rfc3339());
                event["kind"] = json!("Event");
                event["apiVersion"] = json!("events.k8s.io/v1");
                s.events.push(event.clone());
                drop(s);
                respond(&mut stream, 201, "Created", &event)?;
            }
            _ => {
                let msg = format!(
                    "the server could not find the requested resource ({} {})",
                    req.method, req.path
                );
                respond(
                    &mut stream,
                    404,
                    "Not Found",
                    &status(404, "NotFound", &msg),
                )?;
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    Ok(())
}

fn chunk(stream: &mut TcpStream, event: &Value) -> Result<()> {
    let mut line = serde_json::to_vec(event)?;
    line.push(b'\n');
    write!(stream, "{:x}\r\n", line.len())?;
    stream.write_all(&line)?;
    stream.write_all(b"\r\n")?;
    stream.flush()?;
    Ok(())
}

fn watch(
    shared: &Shared,
    stream: &mut TcpStream,
    kind: Kind,
    req: &Request,
    generation: u64,
) -> Result<()> {
    let from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = req.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = req
        .query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    stream.flush()?;
    let end = Instant::now() + timeout;
    let mut sent = from;
    let mut s = shared.lock();
    if from != 0 && from < s.compacted {
        let err = status(
            410,
            "Expired",
            &format!("too old resource version: {from} ({})", s.compacted),
        );
        drop(s);
        chunk(stream, &json!({"type": "ERROR", "object": err}))?;
    } else {
        if from == 0 {
            // No resourceVersion: the real server starts with the current objects as
            // ADDED events ("get state and start at most recent").
            let current: Vec<Value> = s
                .objects
                .iter()
                .filter(|((k, _, _), _)| *k == kind)
                .map(|(_, o)| o.clone())
                .collect();
            sent = s.rv;
            drop(s);
            for mut object in current {
                object["kind"] = json!(kind.name());
                object["apiVersion"] = json!(kind.api_version());
                chunk(stream, &json!({"type": "ADDED", "object": object}))?;
            }
            s = shared.lock();
        }
        let mut last_bookmark = Instant::now();
        loop {
            if !s.up || s.generation != generation || Instant::now() >= end {
                break;
            }
            let pending: Vec<Change> = s
                .history
                .iter()
                .filter(|c| c.kind == kind && c.rv > sent)
                .cloned()
                .collect();
            let current = s.rv;
            if pending.is_empty() {
                let bookmark_due = bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1);
                if bookmark_due && current > sent {
                    drop(s);
                    // A bookmark says "you have seen everything up to here".
                    chunk(
                        stream,
                        &json!({"type": "BOOKMARK", "object": {
                            "kind": kind.name(), "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": current.to_string()}
                        }}),
                    )?;
                    sent = current;
                    last_bookmark = Instant::now();
                    s = shared.lock();
                    continue;
                }
                let (guard, _) = shared
                    .changed
                    .wait_timeout(s, Duration::from_millis(200))
                    .unwrap_or_else(PoisonError::into_inner);
                s = guard;
                continue;
            }
            drop(s);
            for c in pending {
                let mut object = c.object;
                object["kind"] = json!(kind.name());
                object["apiVersion"] = json!(kind.api_version());
                chunk(stream, &json!({"type": c.verb, "object": object}))?;
                sent = c.rv;
            }
            s = shared.lock();
        }
        drop(s);
    }
    stream.write_all(b"0\r\n\r\n")?;
    stream.flush()?;
    Ok(())
}
