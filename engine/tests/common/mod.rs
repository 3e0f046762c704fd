//! Helpers shared by the engine's integration tests: fixture paths and KV sizes, requests, a
//! runtime, and waiting for an engine to go idle with every KV block free.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llmd_engine::{EngineError, EngineHandle, GenerateRequest, GenerationStream, SamplingParams};

/// A tiny checkpoint saved by transformers, under tests/fixtures/models.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
}

/// KV bytes for `blocks` blocks of `block_size` tokens of model `name` on the CPU (f32).
pub fn kv_bytes(name: &str, blocks: usize, block_size: usize) -> u64 {
    let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
    let c: serde_json::Value = serde_json::from_str(&text).unwrap();
    let layers = c["num_hidden_layers"].as_u64().unwrap() as usize;
    let heads = c["num_attention_heads"].as_u64().unwrap() as usize;
    let kv_heads = c["num_key_value_heads"].as_u64().map_or(heads, |x| x as usize);
    let head_dim = c["head_dim"].as_u64().map_or(c["hidden_size"].as_u64().unwrap() as usize / heads, |x| x as usize);
    (2 * layers * block_size * kv_heads * head_dim * 4 * blocks) as u64
}

pub fn request(prompt: &[u32], sampling: SamplingParams, n: u32) -> GenerateRequest {
    GenerateRequest { request_id: "t".into(), prompt_tokens: prompt.to_vec(), sampling, n }
}

/// Validates `req` against `h`'s limits and submits it, as the HTTP layer does.
pub fn submit(h: &EngineHandle, req: GenerateRequest) -> Result<GenerationStream, EngineError> {
    h.submit(req.validate(h.limits())?)
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Waits (up to 20 s) until nothing runs or waits and no KV block is in use.
pub fn wait_idle(h: &EngineHandle) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        let s = h.stats();
        if s.kv_blocks_used == 0 && s.running == 0 && s.waiting == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("engine not idle: {:?}", h.stats());
}
