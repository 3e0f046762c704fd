//! The router over loopback in front of the real engine, on the tiny Qwen3 fixture
//! (tests/fixtures/models/qwen3, random weights, reference numbers in golden.json).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Registry, serve, sse_data};
use llmd_engine::{EngineHandle, LoadOptions};
use llmd_openai::{ApiKeys, ApiOptions, ApiState, ServedModel};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models").join(name)
}

fn load(name: &str, tweak: impl FnOnce(&mut LoadOptions)) -> EngineHandle {
    let mut opts = LoadOptions::new(fixture(name), name);
    opts.cpu_kv_cache_bytes = 64 << 20;
    tweak(&mut opts);
    EngineHandle::load(opts, &mut |_| {}).expect("fixture loads")
}

/// One engine shared by the tests of this file (each test has its own runtime and server).
fn qwen3() -> &'static EngineHandle {
    static ENGINE: OnceLock<EngineHandle> = OnceLock::new();
    ENGINE.get_or_init(|| load("qwen3", |_| {}))
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("qwen3").join("golden.json")).unwrap()).unwrap()
}

async fn server_for(engine: &EngineHandle) -> String {
    let model = ServedModel::from_engine(engine.clone(), None);
    serve(ApiState::new(Registry::new(vec![model]), ApiKeys::default(), ApiOptions::default())).await
}

async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{base}{path}")).json(&body).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn wait_idle(engine: &EngineHandle) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "engine still busy: {s:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tokenize_matches_golden_ids_and_detokenize_round_trips() {
    let base = server_for(qwen3()).await;
    let g = golden();
    let prompt = &g["prompts"][0];
    let (status, v) = post(&base, "/tokenize", json!({"model": "qwen3", "prompt": prompt["text"]})).await;
    assert_eq!(status, 200);
    assert_eq!(v["tokens"], prompt["ids"]);
    assert_eq!(v["max_model_len"], 256);
    let (_, v) = post(&base, "/detokenize", json!({"model": "qwen3", "tokens": prompt["ids"]})).await;
    assert_eq!(v["prompt"], prompt["text"]);
}

#[tokio::test]
async fn greedy_completion_follows_the_golden_tokens_in_every_prompt_form() {
    let base = server_for(qwen3()).await;
    let g = golden();
    let p = &g["prompts"][0];
    let n_new = g["new_tokens"].as_u64().unwrap();
    let (_, expected) = post(&base, "/detokenize", json!({"model": "qwen3", "tokens": p["greedy"]})).await;
    let expected = expected["prompt"].as_str().unwrap().to_string();
    let common = json!({"model": "qwen3", "temperature": 0, "max_tokens": n_new, "ignore_eos": true});
    let with = |prompt: Value| {
        let mut b = common.clone();
        b["prompt"] = prompt;
        b
    };
    for prompt in [p["text"].clone(), p["ids"].clone()] {
        let (status, v) = post(&base, "/v1/completions", with(prompt.clone())).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], expected, "prompt {prompt}");
        assert_eq!(v["usage"]["completion_tokens"], n_new);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    let (_, v) = post(&base, "/v1/completions", with(json!([p["text"], p["text"]]))).await;
    let texts: Vec<&str> = v["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts, vec![expected.as_str(); 2]);
    let (_, v) = post(&base, "/v1/completions", with(json!([p["ids"], p["ids"]]))).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["completion_tokens"], 2 * n_new);
    wait_idle(qwen3()).await;
}

#[tokio::test]
async fn chat_streaming_and_non_streaming_agree() {
    let base = server_for(qwen3()).await;
    let messages = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]);
    let body = json!({"model": "qwen3", "messages": messages, "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": 2});
    let (status, v) = post(&base, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["logprobs"]["content"][0]["top_logprobs"].as_array().unwrap().len(), 2);
    let (_, tok) = post(&base, "/tokenize", json!({"model": "qwen3", "messages": messages})).await;
    assert_eq!(v["usage"]["prompt_tokens"], tok["count"], "prompt = rendered template");
    let n_out = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&n_out));

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = reqwest::Client::new().post(format!("{base}/v1/chat/completions")).json(&sbody).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let data = sse_data(&r.text().await.unwrap());
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let field = |f: &str| chunks.iter().filter_map(|c| c["choices"][0]["delta"][f].as_str()).collect::<String>();
    let msg = &choice["message"];
    assert_eq!(field("content"), msg["content"].as_str().unwrap_or(""));
    assert_eq!(field("reasoning_content"), msg["reasoning_content"].as_str().unwrap_or(""));
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, &choice["finish_reason"]);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], n_out);
    wait_idle(qwen3()).await;
}

#[tokio::test]
async fn prompt_over_max_model_len_is_400_naming_both_numbers() {
    let base = server_for(qwen3()).await;
    let (status, v) = post(
        &base,
        "/v1/chat/completions",
        json!({"model": "qwen3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}),
    )
    .await;
    assert_eq!(status, 400);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("300") && msg.contains("256"), "{msg}");
    assert_eq!(v["error"]["param"], "max_tokens");
    let long = "word ".repeat(400);
    let (status, v) = post(&base, "/v1/completions", json!({"model": "qwen3", "prompt": long})).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("256"));
}

#[tokio::test]
async fn client_disconnect_frees_the_sequence_and_its_blocks() {
    let engine = load("qwen3", |_| {});
    let base = server_for(&engine).await;
    let body = json!({"model": "qwen3", "prompt": "The quick brown fox", "max_tokens": 230, "ignore_eos": true, "stream": true});
    let mut r = reqwest::Client::new().post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.chunk().await.unwrap().expect("a first chunk");
    let s = engine.stats();
    assert_eq!(s.running, 1, "{s:?}");
    assert!(s.kv_blocks_used > 0, "{s:?}");
    drop(r);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0 {
            // Cancelled well before its 230 tokens.
            assert!(s.generation_tokens < 230, "{s:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not cancelled: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn full_queue_is_429() {
    let engine = load("qwen3", |o| {
        o.max_num_seqs = 1;
        o.max_queue = 1;
    });
    let base = server_for(&engine).await;
    let body = json!({"model": "qwen3", "prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let c = reqwest::Client::new();
    let mut first = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    first.chunk().await.unwrap();
    // The first runs, the second waits in the queue of one, the third is refused.
    let second = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(second.status().as_u16(), 200);
    let third = c.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(third.status().as_u16(), 429);
    let v: Value = third.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    drop((first, second));
}

#[tokio::test]
async fn metrics_count_engine_tokens() {
    let base = server_for(qwen3()).await;
    post(&base, "/v1/completions", json!({"model": "qwen3", "prompt": "abc", "max_tokens": 3, "ignore_eos": true}))
        .await;
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    let value = |name: &str| -> f64 {
        let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("llmd:generation_tokens_total{model_name=\"qwen3\"}") >= 3.0);
    assert!(value("llmd:prompt_tokens_total{model_name=\"qwen3\"}") >= 1.0);
    assert!(value("llmd:prefix_cache_queries_total{model_name=\"qwen3\"}") >= 1.0);
    assert!(value("llmd:request_success_total{model_name=\"qwen3\",finished_reason=\"length\"}") >= 1.0);
}
