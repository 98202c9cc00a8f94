//! A Kubernetes API server for tests, speaking the wire protocol a client such as kube-rs
//! uses for list and watch (no kube-apiserver binary is installable here). It serves core/v1
//! `services` and `nodes` over plain HTTP/1.1 on loopback, with threads, no async runtime:
//!
//! - `GET /api/v1/{services,nodes}`: a list with `metadata.resourceVersion`, paginated with
//!   `limit`/`continue` (pages come from one consistent snapshot, as etcd serves them; an
//!   unknown or compacted token is `410 Gone` with reason `Expired`);
//! - the same with `watch=true`: a chunked stream of `{"type":...,"object":...}` lines from the
//!   requested `resourceVersion` (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` when
//!   `allowWatchBookmarks=true`, and an `ERROR` event carrying a `Status` with code 410 when
//!   that version was compacted), closed after `timeoutSeconds`;
//! - `fieldSelector` on `metadata.name` / `metadata.namespace`; `/version`.
//!
//! Test controls: create/update/delete objects (each bumps the global resourceVersion),
//! compact the history (open watches get the 410 ERROR and the client must relist), drop every
//! open connection mid-stream, stop, and restart on the same port keeping the objects (as a
//! restarted kube-apiserver finds them in etcd).
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::{BufRead as _, BufReader, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The resources served, by their plural name.
const RESOURCES: [(&str, &str, bool); 2] = [("services", "Service", true), ("nodes", "Node", false)];

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: &'static str,
    kind: &'static str, // ADDED, MODIFIED, DELETED
    object: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// resource → "namespace/name" (or "name") → object
    objects: HashMap<&'static str, BTreeMap<String, Value>>,
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted_below: u64,
    /// Bumped to make open watches end with a 410 ERROR event.
    expire_epoch: u64,
    /// Bumped to make open connections drop without a proper end.
    drop_epoch: u64,
    /// List snapshots for continue tokens, by the resourceVersion they were taken at.
    snapshots: HashMap<u64, Arc<HashMap<&'static str, Vec<Value>>>>,
    requests: Vec<String>,
    next_uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    bookmark_every: Mutex<Duration>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running (or stopped) server. Dropping it stops it.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    accept: JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts on `127.0.0.1:0`.
    pub fn start() -> std::io::Result<FakeApiServer> {
        Self::start_on("127.0.0.1:0".parse().unwrap())
    }

    /// Starts on a given address (any free port with `:0`).
    pub fn start_on(addr: SocketAddr) -> std::io::Result<FakeApiServer> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store { rv: 1, next_uid: 1, ..Default::default() }),
            changed: Condvar::new(),
            bookmark_every: Mutex::new(Duration::from_secs(1)),
        });
        let mut server = FakeApiServer { shared, addr, running: None };
        server.listen(addr)?;
        Ok(server)
    }

    fn listen(&mut self, addr: SocketAddr) -> std::io::Result<()> {
        let listener = TcpListener::bind(addr)?;
        self.addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (shared, stop) = (self.shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("fake-apiserver".into())
                .spawn(move || accept_loop(listener, shared, stop))?
        };
        self.running = Some(Running { stop, accept });
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig pointing at this server, as YAML text.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    /// How often an idle watch that asked for bookmarks gets one (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_every.lock().unwrap() = every;
    }

    /// Stops listening and closes every connection; the objects are kept.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.store(true, Ordering::SeqCst);
            self.drop_connections();
            let _ = running.accept.join();
        }
    }

    /// Listens again on the same port, with the same objects and history.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        let addr = self.addr;
        // The port was ours a moment ago; retry briefly in case the kernel is slow to free it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.listen(addr) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline && e.kind() == std::io::ErrorKind::AddrInUse => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates or replaces an object (`kind` Service or Node); returns its resourceVersion.
    pub fn apply(&self, object: Value) -> u64 {
        let (resource, key) = resource_and_key(&object);
        let mut store = self.shared.lock();
        store.rv += 1;
        let rv = store.rv;
        let mut object = object;
        let previous = store.objects.entry(resource).or_default().get(&key).cloned();
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        let uid = match previous.as_ref().and_then(|p| p["metadata"]["uid"].as_str()) {
            Some(uid) => uid.to_owned(),
            None => {
                store.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012}", store.next_uid)
            }
        };
        let meta = object["metadata"].as_object_mut().unwrap();
        meta.insert("uid".into(), json!(uid));
        meta.entry("creationTimestamp").or_insert(json!("2026-11-22T00:00:00Z"));
        let kind = if previous.is_some() { "MODIFIED" } else { "ADDED" };
        store.objects.entry(resource).or_default().insert(key, object.clone());
        store.history.push_back(Change { rv, resource, kind, object });
        drop(store);
        self.shared.changed.notify_all();
        rv
    }

    /// Deletes `namespace/name` (Services) or `name` (Nodes); returns whether it existed.
    pub fn delete(&self, resource: &str, key: &str) -> bool {
        let resource = static_resource(resource);
        let mut store = self.shared.lock();
        let Some(mut object) = store.objects.entry(resource).or_default().remove(key) else {
            return false;
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        store.history.push_back(Change { rv, resource, kind: "DELETED", object });
        drop(store);
        self.shared.changed.notify_all();
        true
    }

    /// Forgets the history (as etcd compaction does): open watches end with a 410 ERROR event,
    /// and watching from any older resourceVersion is refused the same way.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.compacted_below = store.rv + 1;
        store.history.clear();
        store.snapshots.clear();
        store.expire_epoch += 1;
        drop(store);
        self.shared.changed.notify_all();
    }

    /// Cuts every open connection mid-stream (no final chunk), as a network failure would.
    pub fn drop_connections(&self) {
        self.shared.lock().drop_epoch += 1;
        self.shared.changed.notify_all();
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Number of objects of a resource.
    pub fn count(&self, resource: &str) -> usize {
        self.shared.lock().objects.get(static_resource(resource)).map_or(0, BTreeMap::len)
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn static_resource(resource: &str) -> &'static str {
    RESOURCES.iter().find(|r| r.0 == resource).unwrap_or_else(|| panic!("unknown resource {resource}")).0
}

fn resource_and_key(object: &Value) -> (&'static str, String) {
    let kind = object["kind"].as_str().expect("object needs a kind");
    let &(resource, _, namespaced) =
        RESOURCES.iter().find(|r| r.1 == kind).unwrap_or_else(|| panic!("kind {kind} is not served"));
    let name = object["metadata"]["name"].as_str().expect("object needs metadata.name");
    let key = if namespaced {
        format!("{}/{name}", object["metadata"]["namespace"].as_str().unwrap_or("default"))
    } else {
        name.to_owned()
    };
    (resource, key)
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let (shared, stop) = (shared.clone(), stop.clone());
                let _ = std::thread::Builder::new().name("fake-apiserver-conn".into()).spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    serve(stream, &shared, &stop);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

struct Request {
    method: String,
    path: String,
    query: HashMap<String, String>,
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    // Headers: nothing in them matters here (no body is read; GET only).
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        if header == "\r\n" || header == "\n" {
            break;
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Request { method, path: path.to_owned(), query })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One connection: requests until the client closes (keep-alive), or one watch stream.
fn serve(stream: TcpStream, shared: &Shared, stop: &AtomicBool) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    let drop_epoch = shared.lock().drop_epoch;
    // Drops are delivered to idle keep-alive connections too: a short read timeout lets the
    // loop notice them.
    let _ = out.set_read_timeout(Some(Duration::from_millis(100)));
    loop {
        if stop.load(Ordering::SeqCst) || shared.lock().drop_epoch != drop_epoch {
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
        // Peek for a request without consuming on timeout.
        match reader.fill_buf() {
            Ok([]) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        let _ = out.set_read_timeout(None);
        let Some(req) = read_request(&mut reader) else { return };
        let _ = out.set_read_timeout(Some(Duration::from_millis(100)));
        let query_text: Vec<String> = {
            let mut q: Vec<_> = req.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            q.sort();
            q
        };
        shared.lock().requests.push(format!("{} {}?{}", req.method, req.path, query_text.join("&")));
        if req.method != "GET" {
            respond(&mut out, 405, &status(405, "MethodNotAllowed", "only GET is served"));
            continue;
        }
        if req.path == "/version" {
            let body = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"});
            respond(&mut out, 200, &body);
            continue;
        }
        let Some(&(resource, kind, _)) = RESOURCES.iter().find(|r| req.path == format!("/api/v1/{}", r.0)) else {
            respond(&mut out, 404, &status(404, "NotFound", &format!("the server could not find {}", req.path)));
            continue;
        };
        let selector = match FieldSelector::parse(req.query.get("fieldSelector").map(String::as_str).unwrap_or("")) {
            Ok(s) => s,
            Err(msg) => {
                respond(&mut out, 400, &status(400, "BadRequest", &msg));
                continue;
            }
        };
        if matches!(req.query.get("watch").map(String::as_str), Some("true" | "1")) {
            watch(out, shared, stop, drop_epoch, resource, kind, &selector, &req.query);
            return;
        }
        let (code, body) = list(shared, resource, kind, &selector, &req.query);
        respond(&mut out, code, &body);
    }
}

fn respond(out: &mut TcpStream, code: u16, body: &Value) {
    let body = serde_json::to_vec(body).unwrap();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-cache, private\r\n\r\n",
        body.len()
    );
    let _ = out.write_all(head.as_bytes()).and_then(|_| out.write_all(&body)).and_then(|_| out.flush());
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

#[derive(Default)]
struct FieldSelector {
    name: Option<String>,
    namespace: Option<String>,
}

impl FieldSelector {
    fn parse(text: &str) -> Result<FieldSelector, String> {
        let mut sel = FieldSelector::default();
        for term in text.split(',').filter(|t| !t.is_empty()) {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("invalid field selector {term:?}"))?;
            match field {
                "metadata.name" => sel.name = Some(value.to_owned()),
                "metadata.namespace" => sel.namespace = Some(value.to_owned()),
                other => return Err(format!("field label not supported: {other}")),
            }
        }
        Ok(sel)
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        self.name.as_deref().is_none_or(|n| meta["name"].as_str() == Some(n))
            && self.namespace.as_deref().is_none_or(|n| meta["namespace"].as_str() == Some(n))
    }
}

fn list(
    shared: &Shared,
    resource: &'static str,
    kind: &str,
    selector: &FieldSelector,
    query: &HashMap<String, String>,
) -> (u16, Value) {
    let mut store = shared.lock();
    // A continue token names the snapshot (resourceVersion) and the offset into it.
    let (rv, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed =
                token.split_once(':').and_then(|(r, o)| Some((r.parse::<u64>().ok()?, o.parse::<usize>().ok()?)));
            match parsed {
                Some((rv, offset)) if store.snapshots.contains_key(&rv) => (rv, offset),
                _ => {
                    let msg = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.";
                    return (410, status(410, "Expired", msg));
                }
            }
        }
        None => {
            let rv = store.rv;
            if !store.snapshots.contains_key(&rv) {
                let all: HashMap<&'static str, Vec<Value>> =
                    store.objects.iter().map(|(r, objs)| (*r, objs.values().cloned().collect())).collect();
                // Keep a few snapshots only: the oldest go, and their tokens expire.
                if store.snapshots.len() >= 8 {
                    let oldest = *store.snapshots.keys().min().unwrap();
                    store.snapshots.remove(&oldest);
                }
                store.snapshots.insert(rv, Arc::new(all));
            }
            (rv, 0)
        }
    };
    let snapshot = store.snapshots[&rv].clone();
    drop(store);
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|&l| l > 0);
    let matching: Vec<&Value> = snapshot.get(resource).into_iter().flatten().filter(|o| selector.matches(o)).collect();
    let end = limit.map_or(matching.len(), |l| (offset + l).min(matching.len()));
    let items: Vec<Value> = matching[offset.min(end)..end].iter().map(|o| strip_type(o)).collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < matching.len() {
        metadata["continue"] = json!(format!("{rv}:{end}"));
        metadata["remainingItemCount"] = json!(matching.len() - end);
    }
    (200, json!({"kind": format!("{kind}List"), "apiVersion": "v1", "metadata": metadata, "items": items}))
}

/// List items carry no kind/apiVersion on the wire; watch event objects do.
fn strip_type(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

fn with_type(object: &Value, kind: &str) -> Value {
    let mut o = object.clone();
    o["kind"] = json!(kind);
    o["apiVersion"] = json!("v1");
    o
}

struct Chunked<'a>(&'a mut TcpStream);

impl Chunked<'_> {
    fn event(&mut self, kind: &str, object: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        line.push(b'\n');
        self.0.write_all(format!("{:x}\r\n", line.len()).as_bytes())?;
        self.0.write_all(&line)?;
        self.0.write_all(b"\r\n")?;
        self.0.flush()
    }

    fn end(&mut self) {
        let _ = self.0.write_all(b"0\r\n\r\n").and_then(|_| self.0.flush());
    }
}

#[allow(clippy::too_many_arguments)]
fn watch(
    mut out: TcpStream,
    shared: &Shared,
    stop: &AtomicBool,
    drop_epoch: u64,
    resource: &'static str,
    kind: &str,
    selector: &FieldSelector,
    query: &HashMap<String, String>,
) {
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let deadline = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(|t| Instant::now() + Duration::from_secs(t));
    let from = query.get("resourceVersion").map(String::as_str).unwrap_or("");
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache, private\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut stream = Chunked(&mut out);
    let mut store = shared.lock();
    let expire_epoch = store.expire_epoch;
    // "" and "0": start with the current state as ADDED events (the API's "any" semantics).
    let mut last = match from {
        "" | "0" => {
            let rv = store.rv;
            let current: Vec<Value> =
                store.objects.get(resource).into_iter().flat_map(|m| m.values().cloned()).collect();
            drop(store);
            for o in current.iter().filter(|o| selector.matches(o)) {
                if stream.event("ADDED", &with_type(o, kind)).is_err() {
                    return;
                }
            }
            store = shared.lock();
            rv
        }
        v => match v.parse::<u64>() {
            Ok(rv) if rv + 1 >= store.compacted_below => rv,
            _ => {
                let msg = format!("too old resource version: {v} ({})", store.compacted_below.saturating_sub(1));
                drop(store);
                let _ = stream.event("ERROR", &status(410, "Expired", &msg));
                stream.end();
                return;
            }
        },
    };
    let bookmark_every = *shared.bookmark_every.lock().unwrap();
    let mut last_sent = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) || store.drop_epoch != drop_epoch {
            drop(store);
            let _ = out.shutdown(Shutdown::Both); // no final chunk: a cut connection
            return;
        }
        if store.expire_epoch != expire_epoch {
            let msg = format!("too old resource version: {last} ({})", store.compacted_below.saturating_sub(1));
            drop(store);
            let _ = stream.event("ERROR", &status(410, "Expired", &msg));
            stream.end();
            return;
        }
        let pending: Vec<Change> = store
            .history
            .iter()
            .filter(|c| c.rv > last && c.resource == resource && selector.matches(&c.object))
            .cloned()
            .collect();
        let current_rv = store.rv;
        drop(store);
        for change in &pending {
            if stream.event(change.kind, &with_type(&change.object, kind)).is_err() {
                return;
            }
            last_sent = Instant::now();
        }
        last = last.max(current_rv);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stream.end();
            return;
        }
        if bookmarks && last_sent.elapsed() >= bookmark_every {
            let object = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": last.to_string()}});
            if stream.event("BOOKMARK", &object).is_err() {
                return;
            }
            last_sent = Instant::now();
        }
        store = shared.lock();
        if store.rv == last && store.expire_epoch == expire_epoch && store.drop_epoch == drop_epoch {
            store = shared.changed.wait_timeout(store, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    fn get(server: &FakeApiServer, target: &str) -> (u16, String) {
        let mut s = TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let code = text[9..12].parse().unwrap();
        (code, text.split_once("\r\n\r\n").unwrap().1.to_owned())
    }

    fn service(name: &str) -> Value {
        json!({"kind": "Service", "apiVersion": "v1", "metadata": {"namespace": "ns", "name": name}, "spec": {"clusterIP": "198.51.100.1"}})
    }

    #[test]
    fn list_paginates_from_one_snapshot_and_expired_tokens_are_410() {
        let server = FakeApiServer::start().unwrap();
        for n in ["a", "b", "c"] {
            server.apply(service(n));
        }
        let (code, body) = get(&server, "/api/v1/services?limit=2");
        assert_eq!(code, 200);
        let page: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page["items"].as_array().unwrap().len(), 2);
        assert!(page["items"][0].get("kind").is_none());
        let token = page["metadata"]["continue"].as_str().unwrap().to_owned();
        server.delete("services", "ns/c"); // later changes do not leak into the paginated list
        let (_, body) = get(&server, &format!("/api/v1/services?limit=2&continue={token}"));
        let page2: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page2["items"][0]["metadata"]["name"], "c");
        assert_eq!(page2["metadata"]["resourceVersion"], page["metadata"]["resourceVersion"]);
        server.compact();
        let (code, body) = get(&server, &format!("/api/v1/services?limit=2&continue={token}"));
        assert_eq!(code, 410, "{body}");
        assert!(body.contains("\"Expired\""));
    }

    #[test]
    fn watch_streams_changes_and_refuses_compacted_versions() {
        let server = FakeApiServer::start().unwrap();
        let rv = server.apply(service("a"));
        server.apply(service("a"));
        server.delete("services", "ns/a");
        let (code, body) = get(&server, &format!("/api/v1/services?watch=true&resourceVersion={rv}&timeoutSeconds=0"));
        assert_eq!(code, 200);
        let types: Vec<String> = body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok().filter(Value::is_object))
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(types, vec!["MODIFIED", "DELETED"], "{body}");
        server.compact();
        let (_, body) = get(&server, &format!("/api/v1/services?watch=1&resourceVersion={rv}"));
        assert!(body.contains("\"ERROR\"") && body.contains("\"code\":410"), "{body}");
        let (_, nodes) = get(&server, "/api/v1/nodes?fieldSelector=metadata.name%3Dn1&timeoutSeconds=1&watch=true");
        assert!(!nodes.contains("ADDED"));
        assert!(server.requests().iter().any(|r| r.contains("fieldSelector=metadata.name=n1")));
    }
}
