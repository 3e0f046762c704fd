//! Faults against the real `llmd` binary, each bounded to seconds: kill -9 during a load then
//! restart, corrupted and truncated safetensors, KV exhaustion (preemption, not failure), a
//! model whose KV cache cannot fit, slowloris on HTTP, a flood on the control socket, a
//! 100 MB request body, and a SIGHUP with a config that does not parse.
//!
//! kill -9 during a pull is covered by llmd-store's own test
//! (`daemon/store/tests/kill_resume.rs`, `kill_9_mid_download_then_pull_again_resumes`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use llmd_e2e::{Daemon, DaemonOptions, fixture_model};
use llmd_proto::{ErrorCode, LoadParams, Reply, Request, ServerFrame};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

async fn load(daemon: &Daemon, source: &Path, name: &str) -> Result<Reply, llmd_proto::ClientError> {
    let mut client = daemon.client().await;
    let params = LoadParams { source: source.display().to_string(), name: Some(name.into()), ..Default::default() };
    client.call(Request::Load(params), |_| {}).await
}

async fn load_ok(daemon: &Daemon, source: &Path, name: &str) {
    match load(daemon, source, name).await {
        Ok(Reply::Loaded(m)) => assert_eq!(m.name, name),
        other => panic!("load of {name} failed: {other:?}; log:\n{}", daemon.log_text()),
    }
}

/// The error message of a load that must fail.
async fn load_err(daemon: &Daemon, source: &Path, name: &str) -> String {
    match load(daemon, source, name).await {
        Err(llmd_proto::ClientError::Remote(e)) => e.message,
        other => panic!("load of {name} should fail, got {other:?}"),
    }
}

async fn chat(daemon: &Daemon, model: &str, max_tokens: u32) -> (u16, Value) {
    let body =
        json!({"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens});
    let r = http().post(daemon.url("/v1/chat/completions")).json(&body).send().await.expect("POST chat");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A copy of a fixture model folder that a test may damage.
fn copy_fixture(name: &str, into: &Path) -> PathBuf {
    let dst = into.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture_model(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_load_then_restart_and_load_again() {
    let dir = llmd_e2e::open_tempdir();
    let socket = dir.path().join("llmd.sock");
    let mut first = Daemon::start_with(DaemonOptions { socket: Some(socket.clone()), ..Default::default() });
    let pid = first.pid();
    // Kill at the first progress frame of the load: the load is then certainly in flight.
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    let mut client = first.client().await;
    let params = LoadParams {
        source: fixture_model("qwen3").display().to_string(),
        name: Some("m".into()),
        ..Default::default()
    };
    let result = client
        .call(Request::Load(params), move |_| {
            if !k.swap(true, Ordering::SeqCst) {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
            }
        })
        .await;
    assert!(killed.load(Ordering::SeqCst), "the load sent no progress frame before {result:?}");
    assert!(result.is_err(), "a killed daemon answered the load: {result:?}");
    let status = first.wait_exit(Duration::from_secs(10));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));

    // A new daemon on the same socket path replaces the stale socket, loads and serves.
    let second = Daemon::start_with(DaemonOptions { socket: Some(socket), ..Default::default() });
    load_ok(&second, &fixture_model("qwen3"), "m").await;
    let (status, body) = chat(&second, "m", 4).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_and_truncated_safetensors_are_refused_and_others_keep_serving() {
    let daemon = Daemon::start();
    load_ok(&daemon, &fixture_model("qwen2"), "good").await;
    let scratch = llmd_e2e::open_tempdir();

    // Truncated: the second half of the file is gone.
    let truncated = copy_fixture("llama", &scratch.path().join("t"));
    let file = truncated.join("model.safetensors");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();
    let msg = load_err(&daemon, &truncated, "truncated").await;
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "unclear error: {msg}");

    // Corrupted: the JSON header is overwritten with garbage.
    let corrupted = copy_fixture("llama", &scratch.path().join("c"));
    let file = corrupted.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    for b in &mut bytes[8..64] {
        *b = 0xff;
    }
    std::fs::write(&file, &bytes).unwrap();
    let msg = load_err(&daemon, &corrupted, "corrupted").await;
    assert!(msg.contains("model.safetensors") && msg.contains("corrupt"), "unclear error: {msg}");
    eprintln!("corrupted: {msg}");

    // A header length of 2^64-1: refused before any allocation.
    let huge = copy_fixture("llama", &scratch.path().join("h"));
    let file = huge.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let msg = load_err(&daemon, &huge, "huge").await;
    assert!(msg.contains("header length"), "unclear error: {msg}");

    // The daemon is up and the good model unaffected.
    let (status, body) = chat(&daemon, "good", 4).await;
    assert_eq!(status, 200, "{body}");
    let (code, out, _) = daemon.llmctl(&["ps", "--json"]);
    assert_eq!(code, 0);
    let ps: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = ps["models"].as_array().unwrap().iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(names, ["good"], "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_kv_blocks_preempts_and_every_request_completes() {
    // llama_mha fixture: 2 layers x 4 KV heads x 16 dims x (K+V) x 4 bytes = 1 KiB a token.
    // The smallest budget (1 MiB) holds 1024 tokens; 8 requests of ~8 + 200 tokens need ~1700.
    let daemon = Daemon::start_with(DaemonOptions {
        extra_toml: "[engine]\ncpu_kv_cache_bytes = 1048576\n".into(),
        ..Default::default()
    });
    load_ok(&daemon, &fixture_model("llama_mha"), "m").await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let url = daemon.url("/v1/completions");
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "m", "prompt": format!("request number {i} says"), "max_tokens": 200,
                              "ignore_eos": true, "temperature": 0});
            let r = http().post(url).json(&body).send().await.expect("POST");
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
        assert_eq!(body["usage"]["completion_tokens"], 200, "{body}");
    }
    let (_, metrics) = llmd_e2e::http_get(daemon.port, "/metrics").unwrap();
    assert!(metric(&metrics, "llmd:num_preemptions") > 0.0, "no preemption counted:\n{metrics}");
    assert_eq!(metric(&metrics, "llmd:kv_cache_usage_perc"), 0.0, "KV blocks still used:\n{metrics}");
}

/// Writes a Qwen2 checkpoint (zeros, bf16) with 3 layers of 32 KV heads of 16 dims: its KV
/// cache needs 2 x 3 x 32 x 16 x 4 = 12 KiB a token, 1.5 MiB a block of 128 tokens.
fn wide_qwen2(dir: &Path) -> PathBuf {
    let (vocab, hidden, inter, layers) = (576usize, 512usize, 128usize, 3usize);
    let dst = dir.join("wide");
    std::fs::create_dir_all(&dst).unwrap();
    let src = fixture_model("qwen2");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["hidden_size"] = json!(hidden);
    cfg["num_attention_heads"] = json!(32);
    cfg["num_key_value_heads"] = json!(32);
    cfg["num_hidden_layers"] = json!(layers);
    cfg["intermediate_size"] = json!(inter);
    cfg["torch_dtype"] = json!("bfloat16");
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden]), ("model.norm.weight".into(), vec![hidden])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![hidden]),
            ("post_attention_layernorm.weight", vec![hidden]),
            ("mlp.down_proj.weight", vec![hidden, inter]),
            ("mlp.gate_proj.weight", vec![inter, hidden]),
            ("mlp.up_proj.weight", vec![inter, hidden]),
            ("self_attn.q_proj.weight", vec![hidden, hidden]),
            ("self_attn.k_proj.weight", vec![hidden, hidden]),
            ("self_attn.v_proj.weight", vec![hidden, hidden]),
            ("self_attn.o_proj.weight", vec![hidden, hidden]),
            ("self_attn.q_proj.bias", vec![hidden]),
            ("self_attn.k_proj.bias", vec![hidden]),
            ("self_attn.v_proj.bias", vec![hidden]),
        ] {
            tensors.push((format!("{p}.{n}"), s));
        }
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(name.clone(), json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut head = Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut file = std::fs::File::create(dst.join("model.safetensors")).unwrap();
    file.write_all(&(head.len() as u64).to_le_bytes()).unwrap();
    file.write_all(&head).unwrap();
    file.write_all(&vec![0u8; offset]).unwrap();
    dst
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_that_cannot_fit_is_refused_with_numbers_and_others_keep_serving() {
    // 1 MiB of KV cache in blocks of 128 tokens: a qwen2 fixture block (64 KiB) fits, a block
    // of the wide model (1.5 MiB) does not.
    let daemon = Daemon::start_with(DaemonOptions {
        extra_toml: "[engine]\ncpu_kv_cache_bytes = 1048576\nblock_size = 128\n".into(),
        ..Default::default()
    });
    load_ok(&daemon, &fixture_model("qwen2"), "small").await;
    let scratch = llmd_e2e::open_tempdir();
    let wide = wide_qwen2(scratch.path());
    let msg = load_err(&daemon, &wide, "big").await;
    assert!(msg.contains("1048576") && msg.contains("1572864"), "error does not name the numbers: {msg}");
    let (status, body) = chat(&daemon, "small", 2).await;
    assert_eq!(status, 200, "{body}");
    let (_, out, _) = daemon.llmctl(&["ps", "--json"]);
    assert!(!out.contains("\"big\""), "{out}");
}

/// A client that sends its headers one byte at a time is cut off by the listener's header
/// read timeout (20 s, hyper's `header_read_timeout`; found missing by this test first).
#[test]
fn slowloris_headers_are_cut_off() {
    let daemon = Daemon::start();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", daemon.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n").unwrap();
    let started = Instant::now();
    let limit = Duration::from_secs(40);
    let header =
        b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut i = 0;
    let mut buf = [0u8; 512];
    let closed_after = loop {
        assert!(
            started.elapsed() < limit,
            "a client sending one header byte every 500 ms still holds its connection after {limit:?}: \
             the HTTP server has no header read timeout"
        );
        if s.write_all(&header[i % header.len()..i % header.len() + 1]).is_err() {
            break started.elapsed();
        }
        i += 1;
        match s.read(&mut buf) {
            Ok(0) => break started.elapsed(),
            Ok(_) => break started.elapsed(), // an error status (408) before closing also counts
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break started.elapsed(),
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!("slowloris connection cut after {closed_after:?} ({i} header bytes sent)");
    assert!(closed_after >= Duration::from_secs(5), "cut after {closed_after:?}: before any timeout could act?");
    assert_eq!(llmd_e2e::http_get_status(daemon.port, "/health"), Some(503));
}

#[tokio::test(flavor = "multi_thread")]
async fn control_socket_flood_is_capped_and_the_daemon_keeps_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let daemon =
        Daemon::start_with(DaemonOptions { control_extra: "max_connections = 16".into(), ..Default::default() });
    let fds_before = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid())).unwrap().count();
    let mut held = Vec::new();
    let (mut refused, mut failed) = (0, 0);
    for _ in 0..400 {
        match tokio::net::UnixStream::connect(&daemon.socket).await {
            Ok(s) => held.push(s),
            Err(_) => failed += 1,
        }
    }
    // Beyond the cap, each connection gets a typed refusal and is closed.
    for s in held.iter_mut().skip(16) {
        let mut len = [0u8; 4];
        if tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut len)).await.is_ok_and(|r| r.is_ok()) {
            let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
            s.read_exact(&mut buf).await.unwrap();
            match serde_json::from_slice::<ServerFrame>(&buf).unwrap() {
                ServerFrame::Error { error, .. } => {
                    assert_eq!(error.code, ErrorCode::Unavailable);
                    refused += 1;
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
    assert_eq!(failed, 0, "connect() itself failed {failed} times");
    assert_eq!(refused, 400 - 16, "connections over the cap of 16 were not all refused");
    // While the 16 slots are held, HTTP still answers.
    assert_eq!(llmd_e2e::http_get_status(daemon.port, "/health"), Some(503));
    // Garbage on every held slot, then close all: the slots come back and nothing leaks.
    for s in held.iter_mut().take(16) {
        let _ = s.write_all(&[0xff; 64]).await;
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        if let Ok(c) = llmd_proto::Client::connect(&daemon.socket, "llmd", "faults").await {
            break c;
        }
        assert!(Instant::now() < deadline, "the control socket did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(matches!(client.call(Request::Status, |_| {}).await, Ok(Reply::Status(_))));
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_after = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid())).unwrap().count();
    assert!(fds_after <= fds_before + 2, "file descriptors leaked: {fds_before} before, {fds_after} after");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_100_mb_body_gets_413() {
    let daemon = Daemon::start();
    load_ok(&daemon, &fixture_model("qwen2"), "m").await;
    let body = vec![b' '; 100 << 20];
    let started = Instant::now();
    let r = http()
        .post(daemon.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the server closed the connection instead of answering 413");
    assert_eq!(r.status().as_u16(), 413);
    let err: Value = r.json().await.unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("bytes"), "{err}");
    eprintln!("413 after {:?}", started.elapsed());
    // Still serving.
    let (status, body) = chat(&daemon, "m", 2).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_with_a_config_that_does_not_parse_keeps_the_old_one() {
    let daemon =
        Daemon::start_with(DaemonOptions { server_extra: "api_keys = [\"sk-old\"]".into(), ..Default::default() });
    load_ok(&daemon, &fixture_model("qwen2"), "m").await;
    let good = std::fs::read_to_string(&daemon.config).unwrap();
    std::fs::write(&daemon.config, good.replace("sk-old", "sk-new").replace("[storage]", "[storage\nbroken = "))
        .unwrap();
    daemon.signal(Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("reload failed, keeping the previous configuration") {
        assert!(Instant::now() < deadline, "no reload error logged:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = http().get(daemon.url("/v1/models")).bearer_auth("sk-old").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "the old key stopped working");
    let r = http().get(daemon.url("/v1/models")).bearer_auth("sk-new").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "the key of the broken file was applied");
}
