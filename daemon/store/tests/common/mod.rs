//! A fake model hub for the tests and the pull benchmark: the subset of the Hugging Face and
//! ModelScope HTTP APIs that llmd-store speaks, with injectable faults.
//!
//! Two listeners share one state: the "hub" (API, `resolve`, ModelScope) and the "LFS CDN"
//! that `resolve` redirects LFS files to, on another port so the client sees another origin.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use parking_lot::Mutex;
use sha1::Digest;

/// Content of a served file: in memory, or a file on disk (the benchmark's multi-GB file).
#[derive(Clone)]
pub enum Content {
    Mem(Bytes),
    Disk { path: PathBuf, len: u64, sha256: String },
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Mem(b) => b.len() as u64,
            Content::Disk { len, .. } => *len,
        }
    }
}

#[derive(Clone)]
pub struct FakeFile {
    pub path: String,
    pub content: Content,
    pub lfs: bool,
}

impl FakeFile {
    pub fn mem(path: &str, content: impl Into<Bytes>, lfs: bool) -> FakeFile {
        FakeFile { path: path.into(), content: Content::Mem(content.into()), lfs }
    }

    pub fn sha256(&self) -> String {
        match &self.content {
            Content::Mem(b) => hex::encode(sha2::Sha256::digest(b)),
            Content::Disk { sha256, .. } => sha256.clone(),
        }
    }

    pub fn git_sha1(&self) -> String {
        match &self.content {
            Content::Mem(b) => {
                let mut h = sha1::Sha1::new();
                h.update(format!("blob {}\0", b.len()).as_bytes());
                h.update(b);
                hex::encode(h.finalize())
            }
            // Disk files are always served as LFS files; the value only fills the `oid` field.
            Content::Disk { sha256, .. } => sha256[..40].to_string(),
        }
    }
}

#[derive(Clone)]
pub struct FakeRepo {
    pub commit: String,
    pub files: Vec<FakeFile>,
    /// Raw entries added to the tree/files listing as they are (a malicious listing).
    pub extra_entries: Vec<serde_json::Value>,
    /// Leave `oid`/`lfs` out of the tree listing, so the client must `HEAD` for the ETag.
    pub no_oids: bool,
}

impl FakeRepo {
    pub fn new(commit_seed: u8, files: Vec<FakeFile>) -> FakeRepo {
        FakeRepo { commit: format!("{commit_seed:02x}").repeat(20), files, extra_entries: vec![], no_oids: false }
    }
}

/// Faults, each consumed when it fires unless said otherwise. Keys are repository file paths.
#[derive(Default)]
pub struct Faults {
    /// Cut the connection after this many body bytes (counted from the start of the file).
    pub drop_after: HashMap<String, u64>,
    /// Answer with this status (and `Retry-After` seconds) instead of the file.
    pub status_once: HashMap<String, (u16, Option<u64>)>,
    /// Flip a byte of the body.
    pub corrupt_once: HashSet<String>,
    /// Flip a byte of the body every time (not consumed).
    pub corrupt_always: HashSet<String>,
    /// Sleep this long per 64 KiB chunk (not consumed).
    pub throttle: HashMap<String, Duration>,
}

/// One request the hub saw.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range_start: Option<u64>,
    pub authorization: bool,
    pub on_lfs_host: bool,
    /// The file whose body this request asked for.
    pub file: Option<String>,
    /// Body bytes sent for this request so far.
    pub sent: Arc<std::sync::atomic::AtomicU64>,
}

impl Logged {
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct HubState {
    pub hf: Mutex<HashMap<String, FakeRepo>>,
    pub ms: Mutex<HashMap<String, FakeRepo>>,
    pub gated: Mutex<HashSet<String>>,
    pub token: String,
    pub page_size: usize,
    pub faults: Mutex<Faults>,
    pub log: Mutex<Vec<Logged>>,
    /// Body bytes sent per file path.
    pub bytes_sent: Mutex<HashMap<String, u64>>,
    pub base: String,
    pub lfs_base: String,
}

pub struct FakeHub {
    pub state: Arc<HubState>,
    pub url: String,
    pub lfs_url: String,
}

impl FakeHub {
    /// Starts both listeners on 127.0.0.1 with a tree page size of 2 entries.
    pub async fn start() -> FakeHub {
        FakeHub::start_with_page_size(2).await
    }

    pub async fn start_with_page_size(page_size: usize) -> FakeHub {
        let hub = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
        let lfs = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind lfs");
        let url = format!("http://{}", hub.local_addr().expect("addr"));
        let lfs_url = format!("http://{}", lfs.local_addr().expect("addr"));
        let state = Arc::new(HubState {
            hf: Mutex::new(HashMap::new()),
            ms: Mutex::new(HashMap::new()),
            gated: Mutex::new(HashSet::new()),
            token: "good-token".into(),
            page_size,
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            bytes_sent: Mutex::new(HashMap::new()),
            base: url.clone(),
            lfs_base: lfs_url.clone(),
        });
        for (listener, on_lfs) in [(hub, false), (lfs, true)] {
            let app = Router::new().fallback(handle).with_state((state.clone(), on_lfs));
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
        }
        FakeHub { state, url, lfs_url }
    }

    pub fn add_hf(&self, repo: &str, r: FakeRepo) {
        self.state.hf.lock().insert(repo.into(), r);
    }

    pub fn add_ms(&self, repo: &str, r: FakeRepo) {
        self.state.ms.lock().insert(repo.into(), r);
    }

    pub fn log(&self) -> Vec<Logged> {
        self.state.log.lock().clone()
    }

    /// Requests for file bodies (GET on resolve, LFS or ModelScope download) of `file`.
    pub fn body_gets(&self, file: &str) -> Vec<Logged> {
        self.log().into_iter().filter(|l| l.method == "GET" && l.file.as_deref() == Some(file)).collect()
    }

    pub fn bytes_sent(&self, file: &str) -> u64 {
        self.state.bytes_sent.lock().get(file).copied().unwrap_or(0)
    }

    pub fn clear_log(&self) {
        self.state.log.lock().clear();
        self.state.bytes_sent.lock().clear();
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(&v.replace('+', " "))))
        .collect()
}

fn status(code: u16, error_code: Option<&str>) -> Response {
    let mut r = (StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), "error").into_response();
    if let Some(c) = error_code {
        r.headers_mut().insert("x-error-code", HeaderValue::from_str(c).unwrap());
    }
    r
}

fn json(v: serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

async fn handle(
    State((state, on_lfs)): State<(Arc<HubState>, bool)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let segs: Vec<String> = uri.path().trim_start_matches('/').split('/').map(decode).collect();
    let range_start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.trim_end_matches('-').parse::<u64>().ok());
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut entry = Logged {
        method: method.to_string(),
        path: uri.path().to_string(),
        range_start,
        authorization: authorization.is_some(),
        on_lfs_host: on_lfs,
        file: None,
        sent: Arc::default(),
    };
    let sent = entry.sent.clone();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let authorized = authorization.as_deref() == Some(&format!("Bearer {}", state.token));
    let resp = match s.as_slice() {
        ["api", "v1", "models", org, name, "repo", "files"] => {
            let repo = format!("{org}/{name}");
            match state.ms.lock().get(&repo).cloned() {
                None => json(serde_json::json!({"Code": 404, "Message": "model not found", "Success": false})),
                Some(r) => {
                    let mut files: Vec<serde_json::Value> = r
                        .files
                        .iter()
                        .map(|f| {
                            serde_json::json!({"Path": f.path, "Name": f.path.rsplit('/').next(), "Type": "blob",
                                "Size": f.content.len(), "Sha256": f.sha256(), "Revision": r.commit, "IsLFS": f.lfs})
                        })
                        .collect();
                    files.push(serde_json::json!({"Path": "sub", "Type": "tree", "Size": 0}));
                    files.extend(r.extra_entries.iter().cloned());
                    json(serde_json::json!({"Code": 200, "Data": {"Files": files}, "Success": true}))
                }
            }
        }
        ["api", "v1", "models", org, name, "repo"] => {
            let repo = format!("{org}/{name}");
            let q = query(&uri);
            let path = q.get("FilePath").cloned().unwrap_or_default();
            let file = state.ms.lock().get(&repo).and_then(|r| r.files.iter().find(|f| f.path == path).cloned());
            match file {
                None => status(404, None),
                Some(f) => {
                    entry.file = Some(f.path.clone());
                    serve(&state, &method, &f, range_start, HeaderMap::new(), sent).await
                }
            }
        }
        ["api", "models", org, name, "revision", rev] => {
            let repo = format!("{org}/{name}");
            match hf_repo(&state, &repo, authorized) {
                Err(r) => r,
                Ok(r) if *rev == "main" || *rev == r.commit => json(serde_json::json!({"id": repo, "sha": r.commit})),
                Ok(_) => status(404, Some("RevisionNotFound")),
            }
        }
        ["api", "models", org, name, "tree", rev] => {
            let repo = format!("{org}/{name}");
            match hf_repo(&state, &repo, authorized) {
                Err(r) => r,
                Ok(r) if *rev != r.commit && *rev != "main" => status(404, Some("RevisionNotFound")),
                Ok(r) => {
                    let mut entries: Vec<serde_json::Value> = vec![
                        serde_json::json!({"type": "directory", "path": "original", "oid": "0".repeat(40), "size": 0}),
                    ];
                    for f in &r.files {
                        let mut e = serde_json::json!({"type": "file", "path": f.path, "size": f.content.len()});
                        if !r.no_oids {
                            e["oid"] = f.git_sha1().into();
                            if f.lfs {
                                e["lfs"] =
                                    serde_json::json!({"oid": f.sha256(), "size": f.content.len(), "pointerSize": 134});
                            }
                        }
                        entries.push(e);
                    }
                    entries.extend(r.extra_entries.iter().cloned());
                    let cursor: usize = query(&uri).get("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
                    let end = (cursor + state.page_size).min(entries.len());
                    let page = serde_json::Value::Array(entries[cursor.min(end)..end].to_vec());
                    let mut resp = json(page);
                    if end < entries.len() {
                        let link = format!("<{}{}?recursive=true&cursor={end}>; rel=\"next\"", state.base, uri.path());
                        resp.headers_mut().insert(header::LINK, HeaderValue::from_str(&link).unwrap());
                    }
                    resp
                }
            }
        }
        [org, name, "resolve", rev, rest @ ..] if !on_lfs => {
            let repo = format!("{org}/{name}");
            let path = rest.join("/");
            match hf_repo(&state, &repo, authorized) {
                Err(r) => r,
                Ok(r) if *rev != r.commit && *rev != "main" => status(404, Some("RevisionNotFound")),
                Ok(r) => match r.files.iter().find(|f| f.path == path) {
                    None => status(404, Some("EntryNotFound")),
                    Some(f) => {
                        let mut h = HeaderMap::new();
                        h.insert("x-repo-commit", HeaderValue::from_str(&r.commit).unwrap());
                        if f.lfs {
                            let etag = format!("\"{}\"", f.sha256());
                            h.insert("x-linked-etag", HeaderValue::from_str(&etag).unwrap());
                            h.insert("x-linked-size", HeaderValue::from(f.content.len()));
                            h.insert(header::ETAG, HeaderValue::from_str(&etag).unwrap());
                            let loc = format!("{}/lfs/{repo}/{path}", state.lfs_base);
                            h.insert(header::LOCATION, HeaderValue::from_str(&loc).unwrap());
                            (StatusCode::FOUND, h).into_response()
                        } else {
                            h.insert(header::ETAG, HeaderValue::from_str(&format!("\"{}\"", f.git_sha1())).unwrap());
                            entry.file = Some(f.path.clone());
                            serve(&state, &method, f, range_start, h, sent).await
                        }
                    }
                },
            }
        }
        ["lfs", org, name, rest @ ..] if on_lfs => {
            let repo = format!("{org}/{name}");
            let path = rest.join("/");
            let file = state.hf.lock().get(&repo).and_then(|r| r.files.iter().find(|f| f.path == path).cloned());
            match file {
                None => status(404, None),
                Some(f) => {
                    entry.file = Some(f.path.clone());
                    serve(&state, &method, &f, range_start, HeaderMap::new(), sent).await
                }
            }
        }
        _ => status(404, None),
    };
    state.log.lock().push(entry);
    resp
}

// The error is the fake hub's HTTP answer itself, returned as is.
#[allow(clippy::result_large_err)]
fn hf_repo(state: &HubState, repo: &str, authorized: bool) -> Result<FakeRepo, Response> {
    if state.gated.lock().contains(repo) && !authorized {
        return Err(status(401, Some("GatedRepo")));
    }
    state.hf.lock().get(repo).cloned().ok_or_else(|| status(404, Some("RepoNotFound")))
}

const CHUNK: usize = 64 * 1024;

async fn serve(
    state: &Arc<HubState>,
    method: &Method,
    f: &FakeFile,
    range_start: Option<u64>,
    mut h: HeaderMap,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> Response {
    let len = f.content.len();
    let (drop_after, corrupt, throttle) = {
        let mut faults = state.faults.lock();
        if method == Method::GET
            && let Some((code, retry_after)) = faults.status_once.remove(&f.path)
        {
            let mut r = status(code, None);
            if let Some(s) = retry_after {
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            return r;
        }
        let get = method == Method::GET;
        (
            if get { faults.drop_after.remove(&f.path) } else { None },
            get && (faults.corrupt_once.remove(&f.path) || faults.corrupt_always.contains(&f.path)),
            faults.throttle.get(&f.path).copied(),
        )
    };
    let start = range_start.unwrap_or(0);
    if start > 0 && start >= len {
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes */{len}")).unwrap());
        return (StatusCode::RANGE_NOT_SATISFIABLE, h).into_response();
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let code = if start > 0 {
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes {start}-{}/{len}", len - 1)).unwrap());
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    if method == Method::HEAD {
        return (code, h).into_response();
    }
    let state = state.clone();
    let name = f.path.clone();
    let content = f.content.clone();
    let stream = async_stream(content, start, drop_after, corrupt, throttle, move |n| {
        *state.bytes_sent.lock().entry(name.clone()).or_default() += n;
        sent.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
    });
    (code, h, Body::from_stream(stream)).into_response()
}

/// The body as a stream of chunks from `start`, with the faults applied. A producer task
/// feeds a small channel, so a slow client applies back-pressure.
fn async_stream(
    content: Content,
    start: u64,
    drop_after: Option<u64>,
    corrupt: bool,
    throttle: Option<Duration>,
    count: impl Fn(u64) + Send + 'static,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    tokio::spawn(async move {
        let len = content.len();
        let mut pos = start;
        // Disk files are mapped, so chunks are zero-copy slices of the page cache (like a
        // static server's sendfile); the benchmark then measures the client, not the server.
        let (data, chunk) = match &content {
            Content::Mem(b) => (b.clone(), CHUNK as u64),
            Content::Disk { path, .. } => {
                let Ok(file) = std::fs::File::open(path) else { return };
                // SAFETY: the benchmark owns the file and does not modify it while serving.
                let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else { return };
                (Bytes::from_owner(map), 1u64 << 20)
            }
        };
        while pos < len {
            if drop_after.is_some_and(|limit| pos >= limit) {
                let _ = tx.send(Err(std::io::Error::other("injected drop"))).await;
                return;
            }
            if let Some(d) = throttle {
                tokio::time::sleep(d).await;
            }
            let mut end = (pos + chunk).min(len);
            if let Some(limit) = drop_after.filter(|&l| l > pos) {
                end = end.min(limit);
            }
            let mut bytes = data.slice(pos as usize..end as usize);
            let mid = len / 2;
            if corrupt && pos <= mid && mid < end {
                let mut v = bytes.to_vec();
                v[(mid - pos) as usize] ^= 0xff;
                bytes = Bytes::from(v);
            }
            count(bytes.len() as u64);
            if tx.send(Ok(bytes)).await.is_err() {
                return;
            }
            pos = end;
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}
