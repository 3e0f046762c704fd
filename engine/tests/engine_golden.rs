//! The full engine (scheduler, KV manager, sampler, detokenizer, CPU runner) against the tiny
//! transformers checkpoints in `tests/fixtures/models/*`, whose `golden.json` holds greedy
//! continuations computed by HF transformers.

use std::time::{Duration, Instant};

use llmd_engine::{
    EngineError, EngineHandle, FinishReason, GenerateRequest, GenerationEvent, LoadOptions, ModelFacts, RequestLimits,
    SamplingParams, StopMatch, Usage,
};
use llmd_models::runner::{ForwardBatch, KvCacheLayout, ModelRunner, StepLogits};

mod common;
use common::{fixture, kv_bytes, request, rt, submit, wait_idle};

const MODELS: &[&str] = &["llama", "llama_mha", "llama_bias", "mistral", "qwen2", "qwen3", "qwen3_moe"];

struct Golden {
    prompts: Vec<(Vec<u32>, Vec<u32>)>,
}

fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).expect("golden.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
    };
    let prompts = v["prompts"].as_array().unwrap().iter().map(|p| (ids(&p["ids"]), ids(&p["greedy"]))).collect();
    Golden { prompts }
}

fn load(name: &str, tweak: impl FnOnce(&mut LoadOptions)) -> EngineHandle {
    let mut opts = LoadOptions::new(fixture(name), name);
    opts.cpu_kv_cache_bytes = kv_bytes(name, 256, 16);
    tweak(&mut opts);
    let mut phases = Vec::new();
    let h = EngineHandle::load(opts, &mut |p| phases.push(p.phase)).unwrap_or_else(|e| panic!("load {name}: {e}"));
    assert!(phases.contains(&"weights"));
    h
}

fn greedy_params(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

/// Everything a finished request produced, per choice.
#[derive(Debug, Default)]
struct Outcome {
    tokens: Vec<Vec<u32>>,
    texts: Vec<String>,
    /// Text released by `Finished` (held back until the end).
    tail: Vec<String>,
    finish: Vec<Option<(FinishReason, Option<StopMatch>)>>,
    logprobs: Vec<Vec<llmd_engine::PositionLogprobs>>,
    usage: Option<Usage>,
    error: Option<String>,
}

async fn collect(mut s: llmd_engine::GenerationStream, n: usize) -> Outcome {
    let mut o = Outcome {
        tokens: vec![Vec::new(); n],
        texts: vec![String::new(); n],
        tail: vec![String::new(); n],
        finish: vec![None; n],
        logprobs: vec![Vec::new(); n],
        ..Outcome::default()
    };
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), s.next()).await.expect("engine stalled") {
        match ev {
            GenerationEvent::Token { index, token_ids, text, logprobs } => {
                let i = index as usize;
                assert!(o.finish[i].is_none(), "token after finish");
                o.tokens[i].extend(token_ids);
                o.texts[i].push_str(&text);
                o.logprobs[i].extend(logprobs);
            }
            GenerationEvent::Finished { index, reason, text, stop } => {
                let i = index as usize;
                assert!(o.finish[i].is_none(), "finished twice");
                o.texts[i].push_str(&text);
                o.tail[i] = text;
                o.finish[i] = Some((reason, stop));
            }
            GenerationEvent::Usage(u) => o.usage = Some(u),
            GenerationEvent::Error(e) => o.error = Some(e),
        }
    }
    o
}

fn run(h: &EngineHandle, req: GenerateRequest) -> Outcome {
    let n = req.n as usize;
    let s = submit(h, req).unwrap();
    rt().block_on(collect(s, n))
}

/// Submits all requests at once so they share steps, and collects them concurrently.
fn run_batch(h: &EngineHandle, reqs: Vec<GenerateRequest>) -> Vec<Outcome> {
    let streams: Vec<_> = reqs.into_iter().map(|r| (r.n as usize, submit(h, r).unwrap())).collect();
    rt().block_on(async {
        let tasks: Vec<_> = streams.into_iter().map(|(n, s)| collect(s, n)).collect();
        futures::future::join_all(tasks).await
    })
}

#[test]
fn greedy_output_equals_transformers_golden_for_every_architecture() {
    for name in MODELS {
        let h = load(name, |_| {});
        let g = golden(name);
        let reqs = g.prompts.iter().map(|(p, want)| request(p, greedy_params(want.len() as u32), 1)).collect();
        for (out, (prompt, want)) in run_batch(&h, reqs).into_iter().zip(&g.prompts) {
            assert_eq!(out.error, None);
            assert_eq!(&out.tokens[0], want, "{name}: greedy tokens differ from transformers");
            assert_eq!(out.finish[0], Some((FinishReason::Length, None)));
            let full = h.tokenizer().decode(want, true).unwrap();
            assert_eq!(out.texts[0], full, "{name}: streamed text differs from a full decode");
            let u = out.usage.expect("usage");
            assert_eq!(u.prompt_tokens as usize, prompt.len());
            assert_eq!(u.completion_tokens as usize, want.len());
        }
        wait_idle(&h);
        h.shutdown(Duration::from_secs(5));
        assert!(!h.is_alive());
    }
}

#[test]
fn chunked_prefill_and_small_budget_keep_golden_output() {
    let h = load("qwen2", |o| {
        o.max_num_batched_tokens = 8;
        o.max_num_seqs = 4;
        o.block_size = 4;
        o.cpu_kv_cache_bytes = kv_bytes("qwen2", 256, 4);
    });
    let g = golden("qwen2");
    let reqs = g.prompts.iter().map(|(p, want)| request(p, greedy_params(want.len() as u32), 1)).collect();
    for (out, (_, want)) in run_batch(&h, reqs).into_iter().zip(&g.prompts) {
        assert_eq!(&out.tokens[0], want);
    }
}

#[test]
fn preemption_with_tiny_kv_cache_still_gives_golden_output() {
    // 16 blocks of 4 tokens: each request fits alone (at most 52 tokens), four together do not.
    let h = load("llama", |o| {
        o.block_size = 4;
        o.cpu_kv_cache_bytes = kv_bytes("llama", 16, 4);
    });
    assert_eq!(h.info().kv_blocks_total, 16);
    assert_eq!(h.info().max_model_len, 64, "max_model_len lowered to what the KV cache holds");
    let g = golden("llama");
    let mut reqs = Vec::new();
    let mut wants = Vec::new();
    for _ in 0..2 {
        for (p, want) in &g.prompts {
            reqs.push(request(p, greedy_params(want.len() as u32), 1));
            wants.push(want.clone());
        }
    }
    for (out, want) in run_batch(&h, reqs).into_iter().zip(wants) {
        assert_eq!(out.error, None);
        assert_eq!(out.tokens[0], want);
    }
    assert!(h.stats().preemptions > 0, "the cache was too small for all four: {:?}", h.stats());
    wait_idle(&h);
}

#[test]
fn same_seed_same_output_whatever_else_is_in_the_batch() {
    let h = load("qwen3", |_| {});
    let g = golden("qwen3");
    let (prompt, _) = &g.prompts[0];
    let sampled = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(1234),
        max_tokens: 12,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let alone = run(&h, request(prompt, sampled.clone(), 1));
    let mut reqs = vec![request(&g.prompts[1].0, SamplingParams { seed: None, ..sampled.clone() }, 2)];
    reqs.push(request(prompt, sampled.clone(), 1));
    reqs.push(request(&prompt[..5], SamplingParams { seed: Some(9), ..sampled.clone() }, 1));
    let batch = run_batch(&h, reqs);
    assert_eq!(alone.tokens[0], batch[1].tokens[0]);
    // Choice 0 of n = 2 with the same seed is the n = 1 result; choice 1 has its own stream.
    let two = run(&h, request(prompt, sampled.clone(), 2));
    assert_eq!(two.tokens[0], alone.tokens[0]);
    assert_ne!(two.tokens[1], two.tokens[0]);
    let other_seed = run(&h, request(prompt, SamplingParams { seed: Some(99), ..sampled }, 1));
    assert_ne!(other_seed.tokens[0], alone.tokens[0]);
}

#[test]
fn n_choices_share_the_prompt_blocks() {
    let h = load("mistral", |o| o.block_size = 4);
    let g = golden("mistral");
    let (prompt, want) = &g.prompts[1];
    let before = h.stats();
    let out = run(&h, request(prompt, greedy_params(want.len() as u32), 3));
    let after = h.stats();
    for i in 0..3 {
        assert_eq!(&out.tokens[i], want, "choice {i}");
    }
    // The prompt was admitted (and computed) once, then forked.
    assert_eq!(after.prefix_cache_queries - before.prefix_cache_queries, prompt.len() as u64);
    assert_eq!(after.prompt_tokens - before.prompt_tokens, prompt.len() as u64);
    assert_eq!(out.usage.unwrap().completion_tokens as usize, 3 * want.len());
    wait_idle(&h);
}

#[test]
fn prefix_cache_serves_a_repeated_prompt() {
    let h = load("qwen2", |o| o.block_size = 4);
    let g = golden("qwen2");
    let (prompt, want) = &g.prompts[1];
    let first = run(&h, request(prompt, greedy_params(want.len() as u32), 1));
    let second = run(&h, request(prompt, greedy_params(want.len() as u32), 1));
    assert_eq!(first.usage.unwrap().cached_tokens, 0);
    let cached = second.usage.unwrap().cached_tokens as usize;
    assert_eq!(cached, (prompt.len() - 1) / 4 * 4);
    assert_eq!(&second.tokens[0], want);
    assert!(h.stats().prefix_cache_hits >= cached as u64);
}

#[test]
fn cancellation_by_dropping_the_stream_frees_blocks() {
    let h = load("llama", |_| {});
    let g = golden("llama");
    let (prompt, _) = &g.prompts[1];
    let mut s =
        submit(&h, request(prompt, SamplingParams { max_tokens: 200, ignore_eos: true, ..greedy_params(200) }, 2))
            .unwrap();
    rt().block_on(async {
        let ev = s.next().await.unwrap();
        assert!(matches!(ev, GenerationEvent::Token { .. }), "{ev:?}");
    });
    assert!(h.stats().kv_blocks_used > 0);
    drop(s);
    wait_idle(&h);
    assert_eq!(h.stats().kv_blocks_used, 0);
}

#[test]
fn stop_strings_cut_the_text_and_hold_back_possible_prefixes() {
    let h = load("qwen2", |_| {});
    let g = golden("qwen2");
    let (prompt, want) = &g.prompts[0];
    let full = h.tokenizer().decode(want, true).unwrap();
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 8, "golden text too short: {full:?}");
    let cut = chars[4].0;
    let stop = full[cut..chars[7].0].to_string();
    let first = full.find(&stop).unwrap();
    let params = |stop: Vec<String>| SamplingParams { stop, ..greedy_params(want.len() as u32) };

    let out = run(&h, request(prompt, params(vec![stop.clone()]), 1));
    assert_eq!(out.texts[0], full[..first]);
    assert_eq!(out.finish[0], Some((FinishReason::Stop, Some(StopMatch::String(stop.clone())))));
    assert!(out.tokens[0].len() <= want.len());

    // A stop string whose start appears but that never completes: nothing is lost, and the
    // prefix at the very end is held back until `Finished`.
    let last2 = chars[chars.len() - 2].0;
    let never = format!("{}\u{7}never", &full[last2..]);
    let out = run(&h, request(prompt, params(vec![never, format!("{stop}\u{7}")]), 1));
    assert_eq!(out.texts[0], full);
    assert_eq!(out.finish[0], Some((FinishReason::Length, None)));
    // (The decoder may also flush bytes it held at the end: random weights emit broken UTF-8.)
    assert!(
        out.tail[0].ends_with(&full[last2..]),
        "the possible stop prefix is released at the end: {:?}",
        out.tail[0]
    );
}

#[test]
fn stop_token_and_eos_end_the_choice() {
    let h = load("llama", |_| {});
    let g = golden("llama");
    let (prompt, want) = &g.prompts[0];
    let stop_tok = want[3];
    let p = SamplingParams { stop_token_ids: vec![stop_tok], ..greedy_params(16) };
    let out = run(&h, request(prompt, p, 1));
    let pos = want.iter().position(|&t| t == stop_tok).unwrap();
    assert_eq!(out.tokens[0], want[..=pos]);
    assert_eq!(out.finish[0], Some((FinishReason::Stop, Some(StopMatch::Token(stop_tok)))));
    // min_tokens masks the stop token until reached.
    let p = SamplingParams { stop_token_ids: vec![stop_tok], min_tokens: 16, ..greedy_params(16) };
    let out = run(&h, request(prompt, p, 1));
    assert_eq!(out.tokens[0].len(), 16);
    assert!(!out.tokens[0].contains(&stop_tok));
}

#[test]
fn logprobs_come_with_every_position() {
    let h = load("llama_mha", |_| {});
    let g = golden("llama_mha");
    let (prompt, want) = &g.prompts[0];
    let out = run(&h, request(prompt, SamplingParams { logprobs: Some(3), ..greedy_params(want.len() as u32) }, 1));
    assert_eq!(out.logprobs[0].len(), want.len());
    for (lp, &tok) in out.logprobs[0].iter().zip(want) {
        assert_eq!(lp.chosen.token_id, tok);
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].token_id, tok, "greedy picks the most likely token");
        assert!(lp.chosen.logprob <= 0.0 && lp.top[1].logprob <= lp.top[0].logprob);
        assert!(!lp.chosen.bytes.is_empty() || h.tokenizer().is_special(tok));
    }
}

#[test]
fn bad_requests_are_refused_with_clear_errors() {
    let h = load("llama", |o| o.max_model_len = Some(40));
    let max = h.info().max_model_len;
    assert_eq!(max, 40);
    let long = vec![1u32; 30];
    match submit(&h, request(&long, greedy_params(11), 1)) {
        Err(e @ EngineError::PromptTooLong { prompt_tokens: 30, max_tokens: 11, max_model_len: 40 }) => {
            let msg = e.to_string();
            assert!(msg.contains("30") && msg.contains("11") && msg.contains("40"), "{msg}");
        }
        other => panic!("expected PromptTooLong, got {other:?}"),
    }
    assert!(matches!(submit(&h, request(&[], greedy_params(4), 1)), Err(EngineError::EmptyPrompt)));
    assert!(matches!(
        submit(&h, request(&[1, 100_000], greedy_params(4), 1)),
        Err(EngineError::TokenOutOfRange { token: 100_000, vocab_size: 508..=512 })
    ));
    assert!(
        matches!(submit(&h, request(&[1], greedy_params(4), 0)), Err(EngineError::InvalidParam(p)) if p.param == "n")
    );
    let bad_temp = SamplingParams { temperature: 3.0, ..greedy_params(4) };
    assert!(
        matches!(submit(&h, request(&[1], bad_temp, 1)), Err(EngineError::InvalidParam(p)) if p.param == "temperature")
    );
    let bad_stop = SamplingParams { stop_token_ids: vec![100_000], ..greedy_params(4) };
    match submit(&h, request(&[1], bad_stop, 1)) {
        Err(EngineError::InvalidParam(p)) => {
            assert_eq!(p.param, "stop_token_ids");
            assert!(p.message.contains("100000") && p.message.contains(&h.limits().vocab_size.to_string()), "{p}");
        }
        other => panic!("expected an invalid stop_token_ids, got {other:?}"),
    }
    // Validated for a larger model: refused, nothing queued.
    let larger = RequestLimits { max_model_len: 1000, ..h.limits() };
    let valid = request(&long, greedy_params(11), 1).validate(larger).unwrap();
    match h.submit(valid) {
        Err(e @ EngineError::LooserLimits { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("1000") && msg.contains("40"), "{msg}");
        }
        other => panic!("expected LooserLimits, got {other:?}"),
    }
    let tighter = RequestLimits { max_model_len: 20, ..h.limits() };
    let s = h.submit(request(&[1], greedy_params(4), 1).validate(tighter).unwrap()).unwrap();
    assert_eq!(rt().block_on(collect(s, 1)).error, None);
}

#[test]
fn queue_full_is_refused() {
    let h = load("llama", |o| {
        o.max_queue = 1;
        o.max_num_seqs = 1;
        o.max_num_batched_tokens = 1;
    });
    let g = golden("llama");
    let p = &g.prompts[1].0;
    // The first request occupies the only running slot for a while; the queue holds one more.
    let _a = submit(&h, request(p, greedy_params(100), 1)).unwrap();
    let mut refused = false;
    let mut keep = Vec::new();
    for _ in 0..4 {
        match submit(&h, request(p, greedy_params(100), 1)) {
            Ok(s) => keep.push(s),
            Err(EngineError::QueueFull { max_queue: 1, .. }) => refused = true,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused);
}

#[test]
fn shutdown_drains_then_refuses() {
    let h = load("llama", |_| {});
    let g = golden("llama");
    let (prompt, want) = &g.prompts[0];
    let s = submit(&h, request(prompt, greedy_params(16), 1)).unwrap();
    h.shutdown(Duration::from_secs(30));
    let out = rt().block_on(collect(s, 1));
    assert_eq!(&out.tokens[0], want, "in-flight request finished during the drain");
    assert!(matches!(submit(&h, request(prompt, greedy_params(4), 1)), Err(EngineError::ShuttingDown(_))));

    // A zero drain timeout aborts what is left.
    let h = load("llama", |_| {});
    let s = submit(&h, request(prompt, greedy_params(200), 1)).unwrap();
    h.shutdown(Duration::ZERO);
    let out = rt().block_on(collect(s, 1));
    assert!(matches!(out.finish[0], Some((FinishReason::Abort, None)) | Some((FinishReason::Length, None))));
    assert!(out.usage.is_some());
}

#[test]
fn heartbeat_beats_while_idle() {
    let h = load("llama", |_| {});
    std::thread::sleep(Duration::from_millis(2500));
    assert!(h.last_heartbeat().elapsed() < Duration::from_millis(1500), "{:?}", h.last_heartbeat().elapsed());
}

/// A runner that panics in `forward`, to check the engine thread's isolation.
struct PanickingRunner;

impl ModelRunner for PanickingRunner {
    fn kv_layout(&self) -> KvCacheLayout {
        KvCacheLayout { num_layers: 1, num_kv_heads: 1, head_dim: 1, block_size: 16, num_blocks: 64, dtype_bytes: 4 }
    }
    fn forward(&mut self, _batch: &ForwardBatch) -> Result<StepLogits, llmd_models::ModelError> {
        panic!("injected fault");
    }
    fn copy_block(&mut self, _src: u32, _dst: u32) -> Result<(), llmd_models::ModelError> {
        Ok(())
    }
    fn device_name(&self) -> String {
        "test".into()
    }
}

#[test]
fn a_panicking_engine_fails_its_requests_and_spares_the_others() {
    let good = load("llama", |_| {});
    let tok = good.tokenizer().clone();
    let facts = ModelFacts {
        architecture: "Test".into(),
        num_params: 0,
        dtype: llmd_options::Dtype::Float32,
        backend: llmd_options::Backend::Cpu,
        weight_bytes: 0,
        max_position_embeddings: 256,
        vocab_size: 512,
        eos_token_ids: vec![],
    };
    let bad =
        EngineHandle::start(Box::new(PanickingRunner), tok, facts, &LoadOptions::new("/nonexistent", "bad")).unwrap();
    let out = run(&bad, request(&[1, 2, 3], greedy_params(4), 1));
    assert!(out.error.as_deref().unwrap_or("").contains("injected fault"), "{:?}", out.error);
    let t = Instant::now();
    while bad.is_alive() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!bad.is_alive());
    assert!(matches!(submit(&bad, request(&[1], greedy_params(4), 1)), Err(EngineError::ShuttingDown(_))));
    // The other model keeps serving.
    let g = golden("llama");
    let (prompt, want) = &g.prompts[0];
    assert_eq!(&run(&good, request(prompt, greedy_params(16), 1)).tokens[0], want);
}

#[test]
fn cuda_without_the_feature_is_a_clear_error() {
    let mut opts = LoadOptions::new(fixture("llama"), "x");
    opts.device = llmd_options::Device::Cuda;
    let err = EngineHandle::load(opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("cuda"), "{err}");
}
