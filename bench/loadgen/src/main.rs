//! `llmd-loadgen`: drives an OpenAI-compatible server with N concurrent streaming clients for
//! a fixed number of requests and reports output tokens/s, time to first token (TTFT),
//! inter-token latency (ITL) and end-to-end latency percentiles, and errors by status.
//!
//! Token timing is taken from the SSE stream as a client sees it: each chunk carrying text is
//! one arrival; the output token count comes from the final usage chunk
//! (`stream_options.include_usage`), falling back to the number of text chunks.
//!
//! Prompts are made of words. `--calibrate-prompt` sizes them in the served model's tokens
//! instead: before the run it asks the server's `POST /tokenize` how many tokens a prompt makes
//! and scales the word count until prompts average `--prompt-tokens` tokens. The prompt tokens
//! the server actually processed (`usage.prompt_tokens`) are reported either way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};

/// Which endpoint to drive.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Endpoint {
    /// POST /v1/chat/completions
    Chat,
    /// POST /v1/completions
    Completions,
}

/// Load generator for llmd's (or any) OpenAI API.
#[derive(Debug, Parser)]
#[command(name = "llmd-loadgen", version)]
struct Args {
    /// Base URL of the server, e.g. http://127.0.0.1:8000
    #[arg(long)]
    url: String,
    /// Served model name.
    #[arg(long)]
    model: String,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Total requests to send.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Prompt length in words: about one token each with real BPE vocabularies (the tiny
    /// test fixtures' 512-token vocabulary splits a word into ~3.4 tokens). With
    /// `--calibrate-prompt`, in the served model's tokens.
    #[arg(long, default_value_t = 32)]
    prompt_tokens: usize,
    /// Before the run, size prompts in tokens through the server's `POST /tokenize` so that
    /// they average `--prompt-tokens` tokens (within 0.5%, or 1 token).
    #[arg(long)]
    calibrate_prompt: bool,
    /// `max_tokens` per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sends `Authorization: Bearer <key>`.
    #[arg(long, env = "LLMD_API_KEY")]
    api_key: Option<String>,
    /// Endpoint to drive.
    #[arg(long, value_enum, default_value_t = Endpoint::Chat)]
    endpoint: Endpoint,
    /// Keep generating past EOS so every request yields `max_tokens` (vLLM's `ignore_eos`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ignore_eos: bool,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Stop starting new requests after this many seconds (requests in flight finish); the
    /// report counts only the requests started. Unset: run all `--requests`.
    #[arg(long)]
    max_duration_s: Option<f64>,
    /// Print the result as JSON (instead of the human report).
    #[arg(long)]
    json: bool,
    /// Also write the result as JSON to this file (the human report is still printed).
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Request i uses prompt seed `first_seed + i`. Runs against one server should use
    /// disjoint seed ranges, or the prefix cache serves the repeated prompts and the time to
    /// first token no longer includes the prefill.
    #[arg(long, default_value_t = 0)]
    first_seed: usize,
}

/// What one request measured.
#[derive(Debug, Default)]
struct Sample {
    ok: bool,
    /// Error class: HTTP status, `connect`, `stream`, `timeout`.
    error: Option<String>,
    ttft: Option<f64>,
    itl: Vec<f64>,
    e2e: f64,
    output_tokens: u64,
    /// `usage.prompt_tokens` of the final usage chunk.
    prompt_tokens: Option<u64>,
    /// SSE chunks that carried text (ITL samples are the gaps between them).
    text_chunks: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
struct Percentiles {
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
}

/// Smallest, mean and largest of a count over the requests.
#[derive(Debug, Serialize)]
struct CountStats {
    min: u64,
    mean: f64,
    max: u64,
}

/// The run's result (`--json`, `--json-out`).
#[derive(Debug, Serialize)]
struct Report {
    url: String,
    model: String,
    endpoint: String,
    concurrency: usize,
    /// Requests asked for (`--requests`).
    requests: usize,
    /// Requests started: fewer than `requests` when `--max-duration-s` stopped the run.
    started: usize,
    /// `--prompt-tokens` as given.
    prompt_tokens: usize,
    /// Words per prompt (after calibration, if any).
    prompt_words: usize,
    /// Prompt tokens the server counted (`usage.prompt_tokens`) over the successful requests.
    prompt_tokens_measured: Option<CountStats>,
    max_tokens: u32,
    ignore_eos: bool,
    succeeded: usize,
    errors: BTreeMap<String, usize>,
    duration_s: f64,
    output_tokens: u64,
    /// SSE chunks with text over the successful requests; below `output_tokens` when some
    /// chunks carried more than one token (then ITL gaps span several tokens).
    text_chunks: u64,
    output_tokens_per_s: f64,
    requests_per_s: f64,
    ttft: Option<Percentiles>,
    itl: Option<Percentiles>,
    /// Time per output token after the first, per request: (E2E − TTFT) / (tokens − 1).
    tpot: Option<Percentiles>,
    e2e: Option<Percentiles>,
}

fn percentiles(mut v: Vec<f64>) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] * 1000.0;
    Some(Percentiles {
        p50_ms: at(0.5),
        p90_ms: at(0.9),
        p99_ms: at(0.99),
        mean_ms: v.iter().sum::<f64>() / v.len() as f64 * 1000.0,
    })
}

/// A prompt of about `tokens` tokens; `seed` varies it so prefix caching does not turn the
/// benchmark into a cache benchmark.
fn make_prompt(tokens: usize, seed: usize) -> String {
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

/// Time per output token after the first, from the request's TTFT, end and token count.
fn tpot(s: &Sample) -> Option<f64> {
    let ttft = s.ttft?;
    (s.output_tokens > 1).then(|| (s.e2e - ttft) / (s.output_tokens - 1) as f64)
}

fn count_stats(v: &[u64]) -> Option<CountStats> {
    let (&min, &max) = (v.iter().min()?, v.iter().max()?);
    Some(CountStats { min, mean: v.iter().sum::<u64>() as f64 / v.len() as f64, max })
}

/// The next word count to try: scales `words` by `target / measured` tokens, at least 4 words
/// (the prompt's prefix takes three).
fn rescale_words(words: usize, target: usize, measured: f64) -> usize {
    if measured <= 0.0 {
        return words * 2;
    }
    ((words as f64 * target as f64 / measured).round() as usize).max(4)
}

/// Where the server's tokenizer is: `POST /tokenize` beside `/v1`.
fn tokenize_url(base: &str) -> String {
    format!("{}/tokenize", base.trim_end_matches('/'))
}

/// Mean token count of the prompts of `words` words for seeds 0..8, by `POST /tokenize`.
async fn mean_prompt_tokens(client: &reqwest::Client, args: &Args, words: usize) -> anyhow::Result<f64> {
    const SEEDS: usize = 8;
    let url = tokenize_url(&args.url);
    let mut total = 0u64;
    for seed in 0..SEEDS {
        let prompt = make_prompt(words, seed);
        let body = match args.endpoint {
            Endpoint::Chat => json!({"model": args.model, "messages": [{"role": "user", "content": prompt}]}),
            Endpoint::Completions => json!({"model": args.model, "prompt": prompt}),
        };
        let mut req = client.post(&url).json(&body);
        if let Some(k) = &args.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        let v: Value = resp.json().await.with_context(|| format!("POST {url}: reading the reply"))?;
        let Some(count) = v["count"].as_u64() else { bail!("POST {url}: {status}: no `count` in {v}") };
        total += count;
    }
    Ok(total as f64 / SEEDS as f64)
}

/// Words per prompt so that prompts average `--prompt-tokens` tokens of the served model.
async fn calibrate_words(client: &reqwest::Client, args: &Args) -> anyhow::Result<usize> {
    let target = args.prompt_tokens;
    let tolerance = (target as f64 * 0.005).max(1.0);
    let (mut words, mut best) = (target.max(4), (f64::INFINITY, target.max(4)));
    for _ in 0..8 {
        let measured = mean_prompt_tokens(client, args, words).await?;
        let miss = (measured - target as f64).abs();
        if miss < best.0 {
            best = (miss, words);
        }
        if miss <= tolerance {
            break;
        }
        let next = rescale_words(words, target, measured);
        if next == words {
            break;
        }
        words = next;
    }
    Ok(best.1)
}

fn body(args: &Args, words: usize, seed: usize) -> Value {
    let prompt = make_prompt(words, seed);
    let mut b = json!({
        "model": args.model,
        "max_tokens": args.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0.8,
        "ignore_eos": args.ignore_eos,
    });
    match args.endpoint {
        Endpoint::Chat => b["messages"] = json!([{"role": "user", "content": prompt}]),
        Endpoint::Completions => b["prompt"] = json!(prompt),
    }
    b
}

/// Whether an SSE chunk carries generated text (content, reasoning, tool calls or text).
fn has_text(chunk: &Value) -> bool {
    chunk["choices"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            let d = &c["delta"];
            let nonempty = |v: &Value| v.as_str().is_some_and(|s| !s.is_empty());
            nonempty(&c["text"])
                || nonempty(&d["content"])
                || nonempty(&d["reasoning_content"])
                || d["tool_calls"].is_array()
        })
    })
}

async fn one_request(client: &reqwest::Client, args: &Args, url: &str, words: usize, seed: usize) -> Sample {
    let body = body(args, words, seed);
    let start = Instant::now();
    let mut sample = Sample::default();
    let mut req = client.post(url).json(&body);
    if let Some(k) = &args.api_key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            sample.error = Some(if e.is_timeout() { "timeout".into() } else { "connect".into() });
            return sample;
        }
    };
    if !resp.status().is_success() {
        sample.error = Some(resp.status().as_u16().to_string());
        return sample;
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    let mut text_chunks = 0u64;
    let mut usage_tokens = None;
    let mut done = false;
    while let Some(next) = stream.next().await {
        let bytes = match next {
            Ok(b) => b,
            Err(e) => {
                sample.error = Some(if e.is_timeout() { "timeout".into() } else { "stream".into() });
                return sample;
            }
        };
        buf.extend_from_slice(&bytes);
        // SSE events end with a blank line.
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                    sample.error = Some("bad_json".into());
                    return sample;
                };
                if chunk.get("error").is_some() {
                    sample.error = Some("stream_error".into());
                    return sample;
                }
                if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(n);
                }
                if let Some(n) = chunk["usage"]["prompt_tokens"].as_u64() {
                    sample.prompt_tokens = Some(n);
                }
                if has_text(&chunk) {
                    let now = Instant::now();
                    match last {
                        None => sample.ttft = Some((now - start).as_secs_f64()),
                        Some(prev) => sample.itl.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                    text_chunks += 1;
                }
            }
        }
    }
    sample.e2e = start.elapsed().as_secs_f64();
    if !done {
        sample.error = Some("no_done".into());
        return sample;
    }
    sample.output_tokens = usage_tokens.unwrap_or(text_chunks);
    sample.text_chunks = text_chunks;
    sample.ok = true;
    sample
}

async fn run(args: Arc<Args>) -> anyhow::Result<Report> {
    if args.concurrency == 0 || args.requests == 0 {
        bail!("--concurrency and --requests must be >= 1");
    }
    if args.max_duration_s.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        bail!("--max-duration-s must be a positive number of seconds");
    }
    let path = match args.endpoint {
        Endpoint::Chat => "/v1/chat/completions",
        Endpoint::Completions => "/v1/completions",
    };
    let url = format!("{}{path}", args.url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_s))
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .context("building the HTTP client")?;
    let words = if args.calibrate_prompt { calibrate_words(&client, &args).await? } else { args.prompt_tokens };
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = args.max_duration_s.map(Duration::from_secs_f64);
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.min(args.requests) {
        let (client, args, url, next) = (client.clone(), args.clone(), url.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            loop {
                if deadline.is_some_and(|d| start.elapsed() >= d) {
                    break;
                }
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= args.requests {
                    break;
                }
                samples.push(one_request(&client, &args, &url, words, args.first_seed + i).await);
            }
            samples
        }));
    }
    let mut samples = Vec::with_capacity(args.requests);
    for w in workers {
        samples.extend(w.await.context("a client task panicked")?);
    }
    let duration = start.elapsed().as_secs_f64();
    let mut errors = BTreeMap::new();
    for s in &samples {
        if let Some(e) = &s.error {
            *errors.entry(e.clone()).or_insert(0) += 1;
        }
    }
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let output_tokens: u64 = ok.iter().map(|s| s.output_tokens).sum();
    let prompt_counts: Vec<u64> = ok.iter().filter_map(|s| s.prompt_tokens).collect();
    Ok(Report {
        url: args.url.clone(),
        model: args.model.clone(),
        endpoint: format!("{:?}", args.endpoint).to_lowercase(),
        concurrency: args.concurrency,
        requests: args.requests,
        started: samples.len(),
        prompt_tokens: args.prompt_tokens,
        prompt_words: words,
        prompt_tokens_measured: count_stats(&prompt_counts),
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        succeeded: ok.len(),
        errors,
        duration_s: duration,
        output_tokens,
        text_chunks: ok.iter().map(|s| s.text_chunks).sum(),
        output_tokens_per_s: output_tokens as f64 / duration,
        requests_per_s: ok.len() as f64 / duration,
        ttft: percentiles(ok.iter().filter_map(|s| s.ttft).collect()),
        itl: percentiles(ok.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        tpot: percentiles(ok.iter().filter_map(|s| tpot(s)).collect()),
        e2e: percentiles(ok.iter().map(|s| s.e2e).collect()),
    })
}

fn print_human(r: &Report) {
    println!("{} {} ({}), concurrency {}, {} requests", r.url, r.model, r.endpoint, r.concurrency, r.requests);
    if r.started < r.requests {
        println!("started        {} / {} (--max-duration-s reached)", r.started, r.requests);
    }
    println!("succeeded      {} / {}", r.succeeded, r.started);
    match &r.prompt_tokens_measured {
        Some(p) => println!(
            "prompt         {} words, {} tokens (min {}, max {}) as the server counted",
            r.prompt_words,
            p.mean.round(),
            p.min,
            p.max
        ),
        None => println!("prompt         {} words (the server sent no usage.prompt_tokens)", r.prompt_words),
    }
    if !r.errors.is_empty() {
        let errs: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        println!("errors         {}", errs.join(", "));
    }
    println!("duration       {:.2} s", r.duration_s);
    println!("output tokens  {} ({:.1} tok/s, {:.2} req/s)", r.output_tokens, r.output_tokens_per_s, r.requests_per_s);
    if r.text_chunks < r.output_tokens {
        println!("text chunks    {} (fewer than tokens: some tokens added no text of their own)", r.text_chunks);
    }
    for (name, p) in [("TTFT", &r.ttft), ("ITL", &r.itl), ("TPOT", &r.tpot), ("E2E", &r.e2e)] {
        if let Some(p) = p {
            println!(
                "{name:<14} p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  mean {:.1} ms",
                p.p50_ms, p.p90_ms, p.p99_ms, p.mean_ms
            );
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    let report = rt.block_on(run(args.clone()))?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{json}\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{json}");
    } else {
        print_human(&report);
    }
    if report.succeeded < report.started {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_ranks() {
        let p = percentiles((1..=100).map(|i| i as f64 / 1000.0).collect()).unwrap();
        assert!((p.p50_ms - 51.0).abs() < 1e-9 || (p.p50_ms - 50.0).abs() < 1e-9, "{}", p.p50_ms);
        assert!((p.p99_ms - 99.0).abs() < 1e-9, "{}", p.p99_ms);
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn prompts_have_the_requested_length_and_vary() {
        let a = make_prompt(40, 1);
        assert_eq!(a.split_whitespace().count(), 2 + 37);
        assert_ne!(a, make_prompt(40, 2));
    }

    #[test]
    fn word_counts_scale_towards_the_token_target() {
        // 512 words measured as 1768 tokens: about 148 words make 512 tokens.
        assert_eq!(rescale_words(512, 512, 1768.0), 148);
        assert_eq!(rescale_words(148, 512, 512.0), 148);
        assert_eq!(rescale_words(10, 1, 100.0), 4);
        assert_eq!(rescale_words(8, 512, 0.0), 16);
    }

    #[test]
    fn count_stats_cover_min_mean_max() {
        let s = count_stats(&[510, 512, 520]).unwrap();
        assert_eq!((s.min, s.max), (510, 520));
        assert!((s.mean - 514.0).abs() < 1e-9);
        assert!(count_stats(&[]).is_none());
        assert_eq!(tokenize_url("http://h:1/"), "http://h:1/tokenize");
        let s = Sample { ttft: Some(0.1), e2e: 2.6, output_tokens: 251, ..Sample::default() };
        assert!((tpot(&s).unwrap() - 0.01).abs() < 1e-12);
        assert!(tpot(&Sample { ttft: Some(0.1), e2e: 0.1, output_tokens: 1, ..Sample::default() }).is_none());
    }

    #[test]
    fn text_detection_covers_chat_and_completions() {
        assert!(has_text(&json!({"choices":[{"delta":{"content":"x"}}]})));
        assert!(!has_text(&json!({"choices":[{"delta":{"role":"assistant","content":""}}]})));
        assert!(has_text(&json!({"choices":[{"text":"y"}]})));
        assert!(!has_text(&json!({"choices":[],"usage":{"completion_tokens":3}})));
    }
}
