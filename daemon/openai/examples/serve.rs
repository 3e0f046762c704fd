//! Serves one model folder with the real engine behind `llmd_openai::router`, without the
//! daemon: for the Python SDK check and the HTTP benchmark (bench/README.md).
//!
//! ```text
//! cargo run -p llmd-openai --example serve -- --model-dir tests/fixtures/models/qwen3 \
//!     [--name qwen3] [--port 8000] [--api-key KEY] [--max-num-seqs 256]
//! cargo run -p llmd-openai --example serve -- --model-dir DIR --direct-bench 256,512,32,64
//! ```
//! `--direct-bench C,M,P,T` skips HTTP: M requests of about P prompt tokens and T output tokens,
//! C at a time, submitted straight to the engine; prints output tokens/s. Comparing it with
//! `llmd-loadgen` against the served model gives the HTTP layer's own cost.

use std::sync::Arc;
use std::time::Instant;

use llmd_engine::{EngineHandle, GenerateRequest, GenerationEvent, LoadOptions, SamplingParams};
use llmd_openai::{ApiKeys, ApiOptions, ApiState, ModelRegistry, Phase, ServedModel};

struct OneModel(ServedModel);

impl ModelRegistry for OneModel {
    fn get(&self, name: &str) -> Option<ServedModel> {
        (self.0.name() == name).then(|| self.0.clone())
    }
    fn list(&self) -> Vec<ServedModel> {
        vec![self.0.clone()]
    }
    fn phase(&self) -> Phase {
        Phase::Ready
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// Same prompt shape as llmd-loadgen: distinct per request so prefix caching does not help.
fn prompt(tokens: usize, seed: usize) -> String {
    const WORDS: [&str; 16] = [
        "apple", "river", "stone", "cloud", "green", "music", "table", "light", "ocean", "paper", "north", "glass",
        "tiger", "bread", "sound", "plant",
    ];
    let mut out = format!("Request {seed}:");
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(12345);
    for _ in 0..tokens.saturating_sub(3) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        out.push(' ');
        out.push_str(WORDS[(x >> 33) % WORDS.len()]);
    }
    out
}

/// User + system CPU seconds of this process (Linux, clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    if f.len() > 12 { (f[11] + f[12]) / 100.0 } else { 0.0 }
}

async fn direct_bench(engine: EngineHandle, spec: &str) {
    let nums: Vec<usize> = spec.split(',').map(|s| s.parse().expect("--direct-bench C,M,P,T")).collect();
    let [concurrency, requests, prompt_tokens, max_tokens] = nums[..] else { panic!("--direct-bench C,M,P,T") };
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let cpu0 = cpu_seconds();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (engine, next) = (engine.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut tokens = 0u64;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= requests {
                    return tokens;
                }
                let ids = engine.tokenizer().encode(&prompt(prompt_tokens, i), true).expect("encode");
                let sampling = SamplingParams {
                    temperature: 0.8,
                    max_tokens: max_tokens as u32,
                    ignore_eos: true,
                    ..Default::default()
                };
                let req = GenerateRequest { request_id: format!("direct-{i}"), prompt_tokens: ids, sampling, n: 1 };
                let mut stream = engine.submit(req.validate(engine.limits()).expect("valid")).expect("submit");
                while let Some(ev) = stream.next().await {
                    if let GenerationEvent::Usage(u) = ev {
                        tokens += u64::from(u.completion_tokens);
                    }
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!(
        "{{\"mode\":\"direct\",\"concurrency\":{concurrency},\"requests\":{requests},\"output_tokens\":{total},\"duration_s\":{secs:.3},\"output_tokens_per_s\":{:.1},\"cpu_s\":{cpu:.2}}}",
        total as f64 / secs
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = arg(&args, "--model-dir").expect("--model-dir DIR");
    let name = arg(&args, "--name").unwrap_or_else(|| {
        std::path::Path::new(&dir).file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or("model".into())
    });
    let mut opts = LoadOptions::new(&dir, &name);
    if let Some(n) = arg(&args, "--max-num-seqs") {
        opts.max_num_seqs = n.parse().expect("--max-num-seqs N");
    }
    opts.max_num_batched_tokens = opts.max_num_batched_tokens.max(opts.max_num_seqs);
    let engine = tokio::task::spawn_blocking(move || EngineHandle::load(opts, &mut |_| {}))
        .await
        .expect("load task")
        .expect("model loads");
    if let Some(spec) = arg(&args, "--direct-bench") {
        direct_bench(engine, &spec).await;
        return;
    }
    let keys = ApiKeys::new(arg(&args, "--api-key"));
    let state = ApiState::new(Arc::new(OneModel(ServedModel::from_engine(engine, None))), keys, ApiOptions::default());
    let port = arg(&args, "--port").unwrap_or_else(|| "8000".into());
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await.expect("bind");
    eprintln!("serving {name} on http://{}", listener.local_addr().expect("addr"));
    axum::serve(listener, llmd_openai::router(state)).await.expect("serve");
}
