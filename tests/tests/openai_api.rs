//! The OpenAI HTTP API of the real daemon with a tiny model: load over the control socket,
//! then `/v1/models`, chat (plain and streamed), completions, tokenize, auth, `/metrics`,
//! `llmctl ps`/`list`, unload; and the official `openai` Python SDK against it.

use llmd_e2e::{Daemon, DaemonOptions, fixture_model};
use llmd_proto::{LoadParams, Reply, Request};
use serde_json::{Value, json};

const KEY: &str = "sk-e2e-test-key";

fn daemon_with_key() -> Daemon {
    Daemon::start_with(DaemonOptions { server_extra: format!("api_keys = [{KEY:?}]"), ..Default::default() })
}

async fn load(daemon: &Daemon, fixture: &str, name: &str) {
    let mut client = daemon.client().await;
    let params = LoadParams {
        source: fixture_model(fixture).display().to_string(),
        name: Some(name.into()),
        ..Default::default()
    };
    match client.call(Request::Load(params), |_| {}).await {
        Ok(Reply::Loaded(m)) => assert_eq!(m.name, name),
        other => panic!("load failed: {other:?}; log:\n{}", daemon.log_text()),
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(120)).build().unwrap()
}

async fn post(daemon: &Daemon, path: &str, body: Value) -> (u16, Value) {
    let r = http().post(daemon.url(path)).bearer_auth(KEY).json(&body).send().await.expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
}

/// The `data:` payloads of an SSE body, in order.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let data: Vec<&str> = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
            assert!(!data.is_empty(), "SSE block without data: {block:?}");
            data.join("\n")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_a_model_over_the_openai_api() {
    let daemon = daemon_with_key();
    // Ready without a model: /health says so with 503 (the harness waited for phase "ready").
    let (status, body) = llmd_e2e::http_get(daemon.port, "/health").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no_model"), "{body}");

    load(&daemon, "qwen2", "tiny").await;
    assert_eq!(llmd_e2e::http_get(daemon.port, "/health").unwrap().0, 200);

    // Auth: every /v1 route needs the key.
    let r = http().get(daemon.url("/v1/models")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let err: Value = r.json().await.unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");
    let r = http().get(daemon.url("/v1/models")).bearer_auth("sk-wrong").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http().post(daemon.url("/tokenize")).json(&json!({"prompt": "hi"})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http().get(daemon.url("/v1/models")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");
    assert!(models["data"][0]["max_model_len"].as_u64().unwrap() > 0, "{models}");

    // Non-streaming chat.
    let (status, chat) = post(
        &daemon,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["model"], "tiny");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert!(chat["choices"][0]["message"]["content"].is_string(), "{chat}");
    let finish = chat["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{chat}");
    let usage = &chat["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0, "{chat}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streaming chat with a usage chunk.
    let r = http()
        .post(daemon.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({
            "model": "tiny",
            "messages": [{"role": "user", "content": "Count to three"}],
            "max_tokens": 6,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.len() >= 3, "{chunks:?}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["id"], chunks[0]["id"], "one id per stream");
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "{}", chunks[0]);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]), "{usage_chunk}");
    assert!(usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{usage_chunk}");
    let finished: Vec<&Value> = chunks.iter().filter(|c| !c["choices"][0]["finish_reason"].is_null()).collect();
    assert_eq!(finished.len(), 1, "exactly one chunk carries finish_reason: {chunks:?}");
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    let deltas_with_usage = chunks[..chunks.len() - 1].iter().filter(|c| !c["usage"].is_null()).count();
    assert_eq!(deltas_with_usage, 0, "usage only in the last chunk");
    assert!(
        usage_chunk["usage"]["completion_tokens"].as_u64().unwrap() <= 6,
        "max_tokens respected; text {streamed:?}"
    );

    // Completions.
    let (status, done) =
        post(&daemon, "/v1/completions", json!({"model": "tiny", "prompt": "The sky is", "max_tokens": 4})).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["object"], "text_completion");
    assert!(done["choices"][0]["text"].is_string(), "{done}");
    assert!(done["usage"]["completion_tokens"].as_u64().unwrap() <= 4, "{done}");

    // Tokenize.
    let (status, tok) = post(&daemon, "/tokenize", json!({"model": "tiny", "prompt": "hello world"})).await;
    assert_eq!(status, 200, "{tok}");
    let tokens = tok["tokens"].as_array().unwrap();
    assert!(!tokens.is_empty());
    assert_eq!(tok["count"].as_u64().unwrap() as usize, tokens.len());

    // Errors: unknown model 404, bad parameter 400 naming it.
    let (status, err) = post(
        &daemon,
        "/v1/chat/completions",
        json!({"model": "ghost", "messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, 404, "{err}");
    let (status, err) = post(
        &daemon,
        "/v1/chat/completions",
        json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("temperature"), "{err}");

    // Metrics (no key needed by default): vLLM names under llmd:, labelled by model, plus
    // whatever GPU gauges this host has.
    let metrics = http().get(daemon.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await.unwrap();
    assert!(text.contains("llmd:"), "{text}");
    assert!(text.contains("model_name=\"tiny\""), "{text}");
    assert!(text.contains("llmd:num_requests_running"), "{text}");

    // llmctl through the real binary.
    let (code, out, err) = daemon.llmctl(&["ps", "--json"]);
    assert_eq!(code, 0, "{err}");
    let ps: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = ps["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tiny"], "{out}");
    let (code, out, err) = daemon.llmctl(&["ps"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tiny"), "{out}");
    // `list` shows the store; a model loaded from a folder is not in it.
    let (code, out, err) = daemon.llmctl(&["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["models"], json!([]), "{out}");
    let (code, out, err) = daemon.llmctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["models_loaded"], 1, "{out}");

    // Unload: the model is gone from the API.
    let (code, _, err) = daemon.llmctl(&["unload", "tiny"]);
    assert_eq!(code, 0, "{err}");
    let (status, err) =
        post(&daemon, "/v1/chat/completions", json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}))
            .await;
    assert_eq!(status, 404, "{err}");
    let (status, _) = llmd_e2e::http_get(daemon.port, "/health").unwrap();
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread")]
async fn reasoning_model_and_sighup_key_reload() {
    let key_file = llmd_e2e::open_tempdir();
    let keys = key_file.path().join("keys");
    std::fs::write(&keys, "sk-old\n").unwrap();
    let daemon = Daemon::start_with(DaemonOptions {
        server_extra: format!("api_key_file = {:?}", keys.display().to_string()),
        ..Default::default()
    });
    load(&daemon, "qwen3", "think").await;
    let models = |key: &'static str| {
        let url = daemon.url("/v1/models");
        async move { http().get(url).bearer_auth(key).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(models("sk-old").await, 200);
    assert_eq!(models("sk-new").await, 401);

    // The key file is re-read on SIGHUP without dropping the model.
    std::fs::write(&keys, "sk-new\n").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while models("sk-new").await != 200 {
        assert!(std::time::Instant::now() < deadline, "new key not accepted; log:\n{}", daemon.log_text());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(models("sk-old").await, 401);

    // A Qwen3 chat goes through its template; reasoning (if any) is split from the content.
    let r = http()
        .post(daemon.url("/v1/chat/completions"))
        .bearer_auth("sk-new")
        .json(&json!({"model": "think", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let chat: Value = r.json().await.unwrap();
    let msg = &chat["choices"][0]["message"];
    assert_eq!(msg["role"], "assistant");
    assert!(msg["content"].is_string() || msg["reasoning_content"].is_string(), "{chat}");
    for field in ["content", "reasoning_content"] {
        if let Some(text) = msg[field].as_str() {
            assert!(!text.contains("<think>") && !text.contains("</think>"), "{field} holds think tags: {chat}");
        }
    }
}

/// The official `openai` Python package against the daemon, from the tests' own venv (made on
/// first use, see `llmd_testenv::python`).
#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_drives_the_daemon() {
    // Before the daemon starts, so blocking here holds up nothing.
    let python = llmd_testenv::python();
    let daemon = daemon_with_key();
    load(&daemon, "qwen2", "tiny").await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_sdk_check.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(daemon.url(""))
        .args(["--api-key", KEY, "--model", "tiny"])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .await
        .expect("run the venv's python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai_sdk_check.py failed ({}):\n{stdout}\n{stderr}\nllmd log:\n{}",
        out.status,
        daemon.log_text()
    );
}
