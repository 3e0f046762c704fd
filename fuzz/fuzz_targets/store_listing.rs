//! Hub listing responses through llmd-store's real client. The listing parsers are private
//! (`hf::HfApi::list_files`, `ms::MsApi::list_files` deserialize inside the HTTP call), so the
//! fuzz bytes are served as the listing by a loopback stub hub and `Store::pull` fetches them:
//! first byte even → Hugging Face tree API (`/api/models/o/m/tree/<sha>`), odd → ModelScope
//! (`/api/v1/models/o/m/repo/files`). Every other path answers 404, so a pull ends after the
//! listing. The pull must end with Ok or an error, never a panic; no file may be created
//! outside the models folder (names such as `../x` in a listing are the attack).
#![no_main]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use llmd_proto::PullParams;
use llmd_store::{RetryPolicy, Store, StoreConfig};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct Hub {
    port: u16,
    listing: Arc<Mutex<Vec<u8>>>,
}

fn respond(stream: &mut std::net::TcpStream, status: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-repo-commit: {COMMIT}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn hub() -> &'static Hub {
    static HUB: OnceLock<Hub> = OnceLock::new();
    HUB.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stub hub");
        let port = listener.local_addr().expect("addr").port();
        let listing = Arc::new(Mutex::new(Vec::new()));
        let served = listing.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut content_length = 0usize;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).map(|n| n == 0).unwrap_or(true) || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        content_length = v.trim().parse().unwrap_or(0);
                    }
                }
                let _ = reader.by_ref().take(content_length as u64).read_to_end(&mut Vec::new());
                let path = line.split_whitespace().nth(1).unwrap_or("");
                if path.starts_with("/api/models/o/m/revision/") {
                    respond(&mut stream, "200 OK", format!("{{\"sha\":\"{COMMIT}\"}}").as_bytes());
                } else if path.starts_with(&format!("/api/models/o/m/tree/{COMMIT}"))
                    || path.starts_with("/api/v1/models/o/m/repo/files")
                {
                    let body = served.lock().expect("listing").clone();
                    respond(&mut stream, "200 OK", &body);
                } else {
                    respond(&mut stream, "404 Not Found", b"{\"error\":\"not found\"}");
                }
            }
        });
        Hub { port, listing }
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, listing)) = data.split_first() else { return };
    let hub = hub();
    *hub.listing.lock().expect("listing") = listing.to_vec();
    let outer = tempfile::tempdir().expect("tempdir");
    let models = outer.path().join("models");
    let mut cfg = StoreConfig::new(&models);
    cfg.hf_endpoint = format!("http://127.0.0.1:{}", hub.port);
    cfg.modelscope_endpoint = format!("http://127.0.0.1:{}", hub.port);
    cfg.retry =
        RetryPolicy { max_attempts: 1, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(1) };
    cfg.disk_reserve_bytes = 0;
    let store = Store::new(cfg).expect("store");
    let source = if pick & 1 == 0 { "hf:o/m" } else { "ms:o/m" };
    let params = PullParams { source: source.into(), revision: None, include: Vec::new(), exclude: Vec::new() };
    let result =
        runtime().block_on(async { tokio::time::timeout(Duration::from_secs(20), store.pull(&params, |_| {})).await });
    assert!(result.is_ok(), "pull of a fuzzed listing did not end within 20 s");
    // Nothing outside the models folder.
    for entry in std::fs::read_dir(outer.path()).expect("read outer") {
        let name = entry.expect("entry").file_name();
        assert_eq!(name, "models", "the pull created {:?} outside the models folder", name);
    }
});
