//! Security rules of the real daemon: API keys on every `/v1` route and `/tokenize`,
//! `/detokenize`; secrets never in the logs; control-socket group rules for a second uid;
//! model names and paths that cannot leave the models folder; the HTTP server bound only
//! where configured.
//!
//! Socket mode 0660 with the control group and the refusal of a uid outside the group are in
//! `control_socket.rs` (`socket_is_0660_with_the_control_group`,
//! `another_uid_is_refused_mutating_methods`); D-Bus policy and caller-uid checks against a
//! real dbus-daemon with a second uid are in `dbus.rs`
//! (`another_uid_is_refused_mutating_methods_on_dbus`, `shipped_system_policy`).

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use llmd_e2e::{Daemon, DaemonOptions, bin, can_switch_uid, fixture_model, free_port, open_tempdir};
use llmd_proto::{LoadParams, Reply, Request};
use serde_json::{Value, json};

const KEY: &str = "sk-sec-4f1c9b7e2a6d";
const HF_TOKEN: &str = "hf_SecretTokenDoNotLog8d3e";

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

async fn load(daemon: &Daemon, name: &str) {
    let mut client = daemon.client().await;
    let params = LoadParams {
        source: fixture_model("qwen2").display().to_string(),
        name: Some(name.into()),
        ..Default::default()
    };
    match client.call(Request::Load(params), |_| {}).await {
        Ok(Reply::Loaded(_)) => {}
        other => panic!("load failed: {other:?}; log:\n{}", daemon.log_text()),
    }
}

/// Every authenticated route with a body that would succeed with the right key.
fn routes() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("GET", "/v1/models", None),
        (
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})),
        ),
        (
            "POST",
            "/v1/chat/completions",
            Some(
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true}),
            ),
        ),
        ("POST", "/v1/completions", Some(json!({"model": "m", "prompt": "hi", "max_tokens": 2}))),
        ("POST", "/tokenize", Some(json!({"model": "m", "prompt": "hi"}))),
        ("POST", "/detokenize", Some(json!({"model": "m", "tokens": [1, 2]}))),
    ]
}

async fn status(daemon: &Daemon, method: &str, path: &str, body: &Option<Value>, auth: Option<&str>) -> u16 {
    let mut req = match method {
        "GET" => http().get(daemon.url(path)),
        _ => http().post(daemon.url(path)).json(body.as_ref().unwrap()),
    };
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    req.send().await.expect("request").status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_api_route_enforces_the_key() {
    let daemon = Daemon::start_with(DaemonOptions {
        server_extra: format!("api_keys = [{KEY:?}]\nmetrics_require_auth = true"),
        ..Default::default()
    });
    load(&daemon, "m").await;
    let wrong = [
        None,
        Some("Bearer sk-wrong".to_string()),
        Some(format!("Bearer {}", &KEY[..KEY.len() - 1])), // a prefix of the key
        Some(format!("Bearer {KEY}x")),                    // the key plus a byte
        Some(format!("Basic {KEY}")),
        Some(KEY.to_string()),
        Some("Bearer ".to_string()),
    ];
    for (method, path, body) in routes() {
        for auth in &wrong {
            let s = status(&daemon, method, path, &body, auth.as_deref()).await;
            assert_eq!(s, 401, "{method} {path} with {auth:?} answered {s}");
        }
        let s = status(&daemon, method, path, &body, Some(&format!("Bearer {KEY}"))).await;
        assert_eq!(s, 200, "{method} {path} with the right key answered {s}");
    }
    // /metrics is configured to need the key; /health is not.
    assert_eq!(status(&daemon, "GET", "/metrics", &None, None).await, 401);
    assert_eq!(status(&daemon, "GET", "/metrics", &None, Some(&format!("Bearer {KEY}"))).await, 200);
    assert_eq!(status(&daemon, "GET", "/health", &None, None).await, 200);
    // An unknown route is not a way around auth either.
    let s = status(&daemon, "POST", "/v1/../v1/completions", &Some(json!({"model": "m", "prompt": "hi"})), None).await;
    assert!(s == 401 || s == 404, "path trick answered {s}");
}

/// A stub hub on loopback that answers 401 to everything (gated repo): the daemon sends the
/// token, gets refused at once (no retries) and reports the error. Returns its port.
fn refusing_hub() -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) && line != "\r\n" {
                line.clear();
            }
            let body = r#"{"error":"Access to this repo is restricted"}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\nx-error-code: GatedRepo\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_and_hub_tokens_never_reach_the_log() {
    let dir = open_tempdir();
    let key_file = dir.path().join("keys");
    std::fs::write(&key_file, "sk-from-file-93b1\n").unwrap();
    let hub_port = refusing_hub();
    let daemon = Daemon::start_with(DaemonOptions {
        server_extra: format!("api_keys = [{KEY:?}]\napi_key_file = {:?}", key_file.display().to_string()),
        extra_toml: String::new(),
        env: vec![("HF_TOKEN".into(), HF_TOKEN.into()), ("HF_ENDPOINT".into(), format!("http://127.0.0.1:{hub_port}"))],
        ..Default::default()
    });
    load(&daemon, "m").await;
    // Right and wrong keys, a pull that fails (with the token set), a SIGHUP reload.
    for auth in [format!("Bearer {KEY}"), "Bearer sk-from-file-93b1".into(), "Bearer sk-wrong-71aa".into()] {
        let _ = http().get(daemon.url("/v1/models")).header("authorization", &auth).send().await.unwrap();
        let _ = http()
            .post(daemon.url("/v1/chat/completions"))
            .header("authorization", &auth)
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
            .send()
            .await
            .unwrap();
    }
    let (code, _, err) = daemon.llmctl(&["pull", "hf:org/model"]);
    assert_ne!(code, 0, "a pull from a hub answering 401 succeeded");
    assert!(err.contains("gated"), "the pull did not reach the stub hub: {err}");
    assert!(!err.contains(HF_TOKEN), "llmctl printed the token: {err}");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = daemon.log_text();
    assert!(log.len() > 1000, "the debug log is suspiciously short:\n{log}");
    for secret in [KEY, "sk-from-file-93b1", "sk-wrong-71aa", HF_TOKEN] {
        assert!(!log.contains(secret), "secret {secret:?} appears in the log:\n{log}");
    }
}

/// `llmd-e2e-client socket <sock> <json>` as uid 65534 with the given primary gid and
/// supplementary groups: its stdout.
fn as_uid_65534(gid: u32, groups: Option<u32>, sock: &Path, request: &str) -> String {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", &format!("--regid={gid}")]);
    match groups {
        Some(g) => cmd.arg(format!("--groups={g}")),
        None => cmd.arg("--clear-groups"),
    };
    let out = cmd
        .arg("--")
        .arg(bin("llmd-e2e-client"))
        .args(["socket", sock.to_str().unwrap(), request])
        .env_clear()
        .output()
        .expect("setpriv");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn control_group_members_by_primary_or_supplementary_gid_may_mutate() {
    if !can_switch_uid() {
        eprintln!("SKIPPED control_group_members_by_primary_or_supplementary_gid_may_mutate: needs root and setpriv");
        return;
    }
    let daemon = Daemon::start();
    let group = nix::unistd::getgid().as_raw(); // the harness makes the control group the test's own
    let unload = r#"{"method":"unload","name":"absent"}"#;
    // In the group (primary or supplementary): past the socket mode and the peer check.
    for (gid, groups) in [(group, None), (65534, Some(group))] {
        let out = as_uid_65534(gid, groups, &daemon.socket, unload);
        assert!(out.starts_with("err not_found"), "gid {gid} groups {groups:?}: {out}");
    }
    // Outside it: the socket mode refuses the connection.
    let out = as_uid_65534(65534, None, &daemon.socket, unload);
    assert!(out.starts_with("err connect") && out.contains("permission denied"), "{out}");
    let log = daemon.log_text();
    assert!(log.contains("uid=65534"), "mutating calls are not logged with the caller's uid:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn names_and_paths_cannot_leave_the_models_dir() {
    let daemon = Daemon::start();
    let models = daemon.dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let sentinel = daemon.dir.path().join("sentinel");
    std::fs::write(&sentinel, "keep me").unwrap();
    std::fs::create_dir_all(models.join("models--org--victim")).unwrap();

    for target in
        ["../sentinel", "../../etc", "/etc", "..", "models--org--victim/../../sentinel", "hf:../../etc", "org/../../x"]
    {
        let (code, out, err) = daemon.llmctl(&["rm", target]);
        assert_ne!(code, 0, "rm {target} succeeded: {out}");
        assert!(!err.is_empty(), "rm {target} failed without a message");
    }
    for source in
        ["hf:../../etc", "hf:org/..", "ms:../etc/x", "hf:org/name@../../../x", "../../etc/passwd/..", "hf:/etc/x"]
    {
        let (code, out, err) = daemon.llmctl(&["pull", source]);
        assert_ne!(code, 0, "pull {source} succeeded: {out}");
        assert!(
            !err.contains("cannot reach") && !err.to_lowercase().contains("connect"),
            "pull {source} went to the network: {err}"
        );
    }
    let mut client = daemon.client().await;
    for (source, name) in
        [("hf:../../etc", None), ("ms:a/../../b", None), (fixture_model("qwen2").to_str().unwrap(), Some("../escape"))]
    {
        let params = LoadParams { source: source.into(), name: name.map(String::from), ..Default::default() };
        let r = client.call(Request::Load(params), |_| {}).await;
        if let (Some(n), Ok(Reply::Loaded(m))) = (name, &r) {
            // A served name is only a label: it must never become a path.
            assert_eq!(m.name, n);
            continue;
        }
        assert!(r.is_err(), "load {source} {name:?}: {r:?}");
    }
    assert_eq!(std::fs::read_to_string(&sentinel).unwrap(), "keep me");
    assert!(models.join("models--org--victim").exists());
    assert!(Path::new("/etc/passwd").exists());
    // Nothing was created beside the models folder.
    let mut beside: Vec<String> = std::fs::read_dir(daemon.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert!(
        beside.iter().all(|n| ["llmd.log", "llmd.sock", "llmd.toml", "models", "sentinel"].contains(&n.as_str())),
        "{beside:?}"
    );
}

/// A daemon started from a config of our own (the harness always listens on 127.0.0.1).
struct Own(Child);

impl Drop for Own {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_listening_on(dir: &Path, listen: &str) -> Own {
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let config = dir.join("llmd.toml");
    let text = Daemon::config_text(port, &dir.join("llmd.sock"), dir, "off", "", "", "")
        .replace(&format!("listen = \"127.0.0.1:{port}\""), &format!("listen = {listen:?}"));
    std::fs::write(&config, text).unwrap();
    let log = dir.join("llmd.log");
    let child = llmd_e2e::spawn_llmd(&config, dir, &log, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listening_sockets().iter().any(|(_, p)| *p == port) {
        assert!(
            Instant::now() < deadline,
            "llmd did not listen:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Own(child)
}

/// (IPv4 address, port) of every listening TCP socket, from /proc/net/tcp.
fn listening_sockets() -> Vec<(std::net::Ipv4Addr, u16)> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None; // not LISTEN
            }
            let (addr, port) = f[1].split_once(':')?;
            let a = u32::from_str_radix(addr, 16).ok()?;
            Some((std::net::Ipv4Addr::from(a.swap_bytes()), u16::from_str_radix(port, 16).ok()?))
        })
        .collect()
}

fn connects(ip: &str, port: u16) -> bool {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[test]
fn http_binds_only_where_configured() {
    // 127.0.0.1: the kernel's table shows that address, not the wildcard, and the machine's
    // other IPv4 addresses (if any) do not answer.
    let dir = open_tempdir();
    let port = free_port();
    let _d = start_listening_on(dir.path(), &format!("127.0.0.1:{port}"));
    let bound: Vec<_> = listening_sockets().into_iter().filter(|(_, p)| *p == port).collect();
    assert_eq!(bound, [(std::net::Ipv4Addr::LOCALHOST, port)]);
    assert!(connects("127.0.0.1", port));
    assert!(!connects("127.0.0.2", port), "127.0.0.2 reached a server bound to 127.0.0.1");
    let others: Vec<String> = nix::ifaddrs::getifaddrs()
        .unwrap()
        .filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip().to_string()))
        .filter(|ip| !ip.starts_with("127."))
        .collect();
    for ip in &others {
        assert!(!connects(ip, port), "{ip} reached a server bound to 127.0.0.1");
    }
    eprintln!("non-loopback addresses checked: {others:?}");

    // 127.0.0.2: 127.0.0.1 does not answer.
    let dir2 = open_tempdir();
    let port2 = free_port();
    let _d2 = start_listening_on(dir2.path(), &format!("127.0.0.2:{port2}"));
    assert!(connects("127.0.0.2", port2));
    assert!(!connects("127.0.0.1", port2), "127.0.0.1 reached a server bound to 127.0.0.2");
    let bound: Vec<_> = listening_sockets().into_iter().filter(|(_, p)| *p == port2).collect();
    assert_eq!(bound, [(std::net::Ipv4Addr::new(127, 0, 0, 2), port2)]);
}
