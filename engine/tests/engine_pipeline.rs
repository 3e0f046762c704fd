//! The engine's one-step pipeline (the host's text work of step N while step N+1 runs) with
//! the real CPU runner behind a wrapper that answers `launch` with `InFlight` and computes the
//! step in `collect`. Every request must give the same events as with the synchronous runner,
//! and every KV block must be free once the requests are over.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llmd_engine::{
    EngineHandle, FinishReason, GenerateRequest, GenerationEvent, LoadOptions, ModelFacts, SamplingParams,
};
use llmd_models::ModelError;
use llmd_models::runner::{ForwardBatch, KvCacheLayout, Launched, ModelRunner, RowOutput, RowRequest, StepLogits};

mod common;
use common::{fixture, kv_bytes, request, rt, submit, wait_idle};

/// (prompt, greedy continuation from HF transformers) of the fixture's `golden.json`.
fn golden(name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).expect("golden.json");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |x: &serde_json::Value| -> Vec<u32> {
        x.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
    };
    v["prompts"].as_array().unwrap().iter().map(|p| (ids(&p["ids"]), ids(&p["greedy"]))).collect()
}

/// How the wrapper answers.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// `launch` returns `InFlight` (false: every step comes back `Ready`, the synchronous engine).
    in_flight: bool,
    /// Steps with a full-logits row come back `Ready`, as the CUDA runner does.
    ready_for_logits: bool,
    /// The launch with this index (from 0) fails.
    fail_launch: Option<usize>,
    /// The step launched with this index fails in `collect`.
    fail_collect: Option<usize>,
}

/// The CPU runner behind the pipelined runner API. Any call while a step is in flight other
/// than `collect` breaks the contract and panics, which fails every request of the engine.
struct Pipelined {
    inner: Box<dyn ModelRunner>,
    mode: Mode,
    pending: Option<(usize, ForwardBatch, Vec<RowRequest>)>,
    launches: usize,
    /// Logits rows computed, shared with the test.
    rows: Arc<AtomicUsize>,
}

impl Pipelined {
    fn idle(&self, call: &str) {
        assert!(self.pending.is_none(), "runner contract: `{call}` while a step is in flight");
    }

    fn compute(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Vec<RowOutput>, ModelError> {
        let rows = self.inner.forward_sample(batch, requests)?;
        self.rows.fetch_add(rows.len(), Ordering::Relaxed);
        Ok(rows)
    }
}

impl ModelRunner for Pipelined {
    fn kv_layout(&self) -> KvCacheLayout {
        self.inner.kv_layout()
    }
    fn forward(&mut self, batch: &ForwardBatch) -> Result<StepLogits, ModelError> {
        self.idle("forward");
        self.inner.forward(batch)
    }
    fn forward_sample(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Vec<RowOutput>, ModelError> {
        self.idle("forward_sample");
        self.compute(batch, requests)
    }
    fn launch(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Launched, ModelError> {
        self.idle("launch");
        let step = self.launches;
        self.launches += 1;
        if self.mode.fail_launch == Some(step) {
            return Err(ModelError::Backend("injected launch failure".into()));
        }
        let logits = requests.iter().any(|r| matches!(r, RowRequest::Logits));
        if !self.mode.in_flight || (self.mode.ready_for_logits && logits) {
            return Ok(Launched::Ready(self.compute(batch, requests)?));
        }
        self.pending = Some((step, batch.clone(), requests.to_vec()));
        Ok(Launched::InFlight)
    }
    fn collect(&mut self) -> Result<Vec<RowOutput>, ModelError> {
        let (step, batch, requests) =
            self.pending.take().ok_or_else(|| ModelError::Backend("collect with no step in flight".into()))?;
        if self.mode.fail_collect == Some(step) {
            return Err(ModelError::Backend("injected collect failure".into()));
        }
        self.compute(&batch, &requests)
    }
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), ModelError> {
        self.idle("copy_block");
        self.inner.copy_block(src, dst)
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
}

struct Engine {
    h: EngineHandle,
    rows: Arc<AtomicUsize>,
}

/// The CPU runner of fixture `name` (256 KV blocks of 16 tokens) behind [`Pipelined`].
fn start(name: &str, mode: Mode) -> Engine {
    let mut opts = LoadOptions::new(fixture(name), name);
    opts.cpu_kv_cache_bytes = kv_bytes(name, 256, 16);
    let cfg = llmd_models::LoadConfig { kv_cache_bytes: opts.cpu_kv_cache_bytes, block_size: opts.block_size };
    let loaded = llmd_models::load_cpu(&opts.path, &cfg, &mut |_, _| {}).unwrap_or_else(|e| panic!("load {name}: {e}"));
    let facts = ModelFacts::of(&loaded, llmd_options::Backend::Cpu);
    let tokenizer = Arc::new(llmd_tokenizer::Tokenizer::from_dir(&opts.path).unwrap());
    let rows = Arc::new(AtomicUsize::new(0));
    let runner = Pipelined { inner: loaded.runner, mode, pending: None, launches: 0, rows: rows.clone() };
    let h = EngineHandle::start(Box::new(runner), tokenizer, facts, &opts).unwrap();
    Engine { h, rows }
}

fn pipelined() -> Mode {
    Mode { in_flight: true, ..Mode::default() }
}

fn sync() -> Mode {
    Mode::default()
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

fn seeded(seed: u64, max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(seed),
        max_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Every event of one request, checked for order (nothing after a choice's `Finished`, `Usage`
/// or `Error` last), with `Usage::queue_time` zeroed so that runs compare.
async fn events(mut s: llmd_engine::GenerationStream, n: usize) -> Vec<GenerationEvent> {
    let mut out = Vec::new();
    let mut finished = vec![false; n];
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), s.next()).await.expect("engine stalled") {
        match &ev {
            GenerationEvent::Token { index, .. } => assert!(!finished[*index as usize], "token after Finished"),
            GenerationEvent::Finished { index, .. } => {
                assert!(!std::mem::replace(&mut finished[*index as usize], true), "finished twice")
            }
            GenerationEvent::Usage(_) => assert!(finished.iter().all(|&f| f), "usage before every Finished"),
            GenerationEvent::Error(_) => {}
        }
        out.push(match ev {
            GenerationEvent::Usage(u) => GenerationEvent::Usage(llmd_engine::Usage { queue_time: Duration::ZERO, ..u }),
            other => other,
        });
    }
    out
}

/// Submits all requests at once (they share steps) and returns each one's events.
fn run_all(h: &EngineHandle, reqs: &[GenerateRequest]) -> Vec<Vec<GenerationEvent>> {
    let streams: Vec<_> = reqs.iter().map(|r| (r.n as usize, submit(h, r.clone()).unwrap())).collect();
    rt().block_on(futures::future::join_all(streams.into_iter().map(|(n, s)| events(s, n))))
}

/// Runs `reqs` together on a synchronous and on a pipelined engine of `model`; asserts equal
/// events, equal token counters and no KV block left in use. Returns the events and the
/// logits rows each runner computed (synchronous, pipelined).
fn same_as_sync(model: &str, mode: Mode, reqs: &[GenerateRequest]) -> (Vec<Vec<GenerationEvent>>, usize, usize) {
    let a = start(model, sync());
    let b = start(model, mode);
    let want = run_all(&a.h, reqs);
    let got = run_all(&b.h, reqs);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        // Logprobs may differ in the last bits with the batch a row ran in; the rest is exact.
        assert_eq!(logprobs_zeroed(w), logprobs_zeroed(g), "{model}: request {i} differs from the synchronous engine");
        for (a, b) in logprob_values(w).into_iter().zip(logprob_values(g)) {
            assert!((a - b).abs() < 1e-4, "{model}: request {i}: logprob {a} vs {b}");
        }
        assert!(matches!(w.last(), Some(GenerationEvent::Usage(_))), "request {i} ended with {:?}", w.last());
    }
    wait_idle(&a.h);
    wait_idle(&b.h);
    assert_eq!(a.h.stats().generation_tokens, b.h.stats().generation_tokens);
    (got, a.rows.load(Ordering::Relaxed), b.rows.load(Ordering::Relaxed))
}

fn logprobs_zeroed(evs: &[GenerationEvent]) -> Vec<GenerationEvent> {
    let mut evs = evs.to_vec();
    for e in &mut evs {
        if let GenerationEvent::Token { logprobs, .. } = e {
            for p in logprobs {
                p.chosen.logprob = 0.0;
                p.top.iter_mut().for_each(|t| t.logprob = 0.0);
            }
        }
    }
    evs
}

fn logprob_values(evs: &[GenerationEvent]) -> Vec<f32> {
    let mut out = Vec::new();
    for e in evs {
        if let GenerationEvent::Token { logprobs, .. } = e {
            for p in logprobs {
                out.push(p.chosen.logprob);
                out.extend(p.top.iter().map(|t| t.logprob));
            }
        }
    }
    out
}

fn tokens(evs: &[GenerationEvent], index: u32) -> Vec<u32> {
    evs.iter()
        .filter_map(|e| match e {
            GenerationEvent::Token { index: i, token_ids, .. } if *i == index => Some(token_ids.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

fn text(evs: &[GenerationEvent], index: u32) -> String {
    evs.iter()
        .filter_map(|e| match e {
            GenerationEvent::Token { index: i, text, .. } | GenerationEvent::Finished { index: i, text, .. }
                if *i == index =>
            {
                Some(text.as_str())
            }
            _ => None,
        })
        .collect()
}

fn finish(evs: &[GenerationEvent], index: u32) -> Option<FinishReason> {
    evs.iter().find_map(|e| match e {
        GenerationEvent::Finished { index: i, reason, .. } if *i == index => Some(*reason),
        _ => None,
    })
}

#[test]
fn greedy_pipelined_equals_sync_and_transformers() {
    for model in ["qwen2", "qwen3_moe"] {
        let g = golden(model);
        let mut reqs: Vec<_> = g.iter().map(|(p, want)| request(p, greedy(want.len() as u32), 1)).collect();
        reqs.push(request(&g[1].0, greedy(g[1].1.len() as u32), 3));
        let (got, sync_rows, pipe_rows) = same_as_sync(model, pipelined(), &reqs);
        for (evs, (_, want)) in got.iter().zip(&g) {
            assert_eq!(&tokens(evs, 0), want, "{model}: greedy tokens differ from transformers");
        }
        for c in 0..3 {
            assert_eq!(tokens(&got[2], c), g[1].1, "{model}: choice {c} of n = 3");
        }
        assert_eq!(sync_rows, pipe_rows, "nothing ends one step late without stop strings");
    }
}

#[test]
fn seeded_sampling_with_n_and_penalties_is_unchanged() {
    let g = golden("qwen3");
    let penalties = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.3,
        repetition_penalty: 1.2,
        top_k: Some(20),
        ..seeded(7, 14)
    };
    let reqs = vec![
        request(&g[0].0, seeded(1234, 12), 3),
        request(&g[1].0, penalties, 2),
        request(&g[0].0[..5], SamplingParams { min_p: 0.05, ..seeded(9, 10) }, 1),
    ];
    let (got, _, _) = same_as_sync("qwen3", pipelined(), &reqs);
    assert_ne!(tokens(&got[0], 0), tokens(&got[0], 1), "choices sample from their own streams");
}

#[test]
fn stop_strings_end_choices_one_step_late_and_free_every_block() {
    let model = "qwen2";
    let g = golden(model);
    let (prompt, want) = &g[0];
    let probe = start(model, sync());
    let full = probe.h.tokenizer().decode(want, true).unwrap();
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 8, "golden text too short: {full:?}");
    let stop = full[chars[4].0..chars[7].0].to_string();
    // Choice 0 of a seeded n = 3 request stops at a string of its own text; the others go on.
    let sampled = submit(&probe.h, request(&g[1].0, seeded(42, 16), 3)).unwrap();
    let sampled = rt().block_on(events(sampled, 3));
    let own = text(&sampled, 0);
    let own_chars: Vec<usize> = own.char_indices().map(|(i, _)| i).collect();
    assert!(own_chars.len() > 6, "sampled text too short: {own:?}");
    let own_stop = own[own_chars[3]..own_chars[5]].to_string();
    let last2 = chars[chars.len() - 2].0;
    let reqs = vec![
        request(prompt, SamplingParams { stop: vec![stop.clone()], ..greedy(want.len() as u32) }, 1),
        request(&g[1].0, SamplingParams { stop: vec![own_stop], ..seeded(42, 16) }, 3),
        // A stop string that starts but never completes: held back, released at `Length`.
        request(prompt, SamplingParams { stop: vec![format!("{}\u{7}never", &full[last2..])], ..greedy(16) }, 1),
        // The stop string is the whole text of the first token(s) at the step after the prompt.
        request(prompt, SamplingParams { stop: vec![full[..chars[1].0].to_string()], ..greedy(16) }, 2),
    ];
    let (got, sync_rows, pipe_rows) = same_as_sync(model, pipelined(), &reqs);
    assert_eq!(text(&got[0], 0), full[..full.find(&stop).unwrap()]);
    assert_eq!(finish(&got[0], 0), Some(FinishReason::Stop));
    assert_eq!(finish(&got[1], 0), Some(FinishReason::Stop));
    assert_eq!(text(&got[2], 0), full);
    assert_eq!(finish(&got[2], 0), Some(FinishReason::Length));
    assert_eq!(finish(&got[3], 1), Some(FinishReason::Stop));
    // Each choice a stop string ended had one more row computed in flight, then dropped.
    assert!(pipe_rows > sync_rows, "pipelined {pipe_rows} rows, synchronous {sync_rows}");
}

#[test]
fn max_tokens_and_stop_tokens_end_by_id_before_the_next_step() {
    let model = "llama";
    let g = golden(model);
    let (prompt, want) = &g[0];
    let reqs = vec![
        request(prompt, greedy(1), 2),
        request(prompt, greedy(5), 1),
        request(prompt, SamplingParams { stop_token_ids: vec![want[3]], ..greedy(16) }, 1),
        request(prompt, SamplingParams { stop_token_ids: vec![want[3]], min_tokens: 16, ..greedy(16) }, 1),
        request(&g[1].0, SamplingParams { stop_token_ids: vec![want[2]], ..seeded(3, 16) }, 2),
    ];
    let (got, sync_rows, pipe_rows) = same_as_sync(model, pipelined(), &reqs);
    assert_eq!(tokens(&got[0], 1), want[..1]);
    assert_eq!(tokens(&got[1], 0), want[..5]);
    let pos = want.iter().position(|&t| t == want[3]).unwrap();
    assert_eq!(tokens(&got[2], 0), want[..=pos]);
    assert_eq!(tokens(&got[3], 0).len(), 16);
    assert_eq!(sync_rows, pipe_rows, "ends by id take no extra row");
}

#[test]
fn logprobs_and_a_runner_mixing_ready_and_in_flight_steps() {
    let model = "llama_mha";
    let g = golden(model);
    let (prompt, want) = &g[0];
    let reqs = vec![
        request(prompt, SamplingParams { logprobs: Some(3), ..greedy(want.len() as u32) }, 1),
        request(&g[1].0, SamplingParams { logprobs: Some(2), ..seeded(5, 10) }, 2),
        request(&g[1].0, seeded(6, 14), 3),
        request(prompt, SamplingParams { stop: vec![" ".into(), "e".into()], ..seeded(8, 16) }, 2),
    ];
    for mode in [pipelined(), Mode { ready_for_logits: true, ..pipelined() }] {
        let (got, _, _) = same_as_sync(model, mode, &reqs);
        let lps: Vec<_> = got[0]
            .iter()
            .filter_map(|e| match e {
                GenerationEvent::Token { logprobs, .. } => Some(logprobs.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(lps.len(), want.len());
        for (lp, &tok) in lps.iter().zip(want) {
            assert_eq!(lp.chosen.token_id, tok);
            assert_eq!(lp.top.len(), 3);
        }
    }
}

#[test]
fn cancellation_mid_stream_frees_every_block() {
    let model = "llama";
    let g = golden(model);
    let e = start(model, pipelined());
    let other = submit(&e.h, request(&g[0].0, greedy(g[0].1.len() as u32), 1)).unwrap();
    let mut s = submit(&e.h, request(&g[1].0, greedy(200), 2)).unwrap();
    rt().block_on(async {
        for _ in 0..5 {
            let ev = s.next().await.unwrap();
            assert!(matches!(ev, GenerationEvent::Token { .. }), "{ev:?}");
        }
    });
    assert!(e.h.stats().kv_blocks_used > 0);
    drop(s);
    let evs = rt().block_on(events(other, 1));
    assert_eq!(tokens(&evs, 0), g[0].1, "the request beside the cancelled one is untouched");
    wait_idle(&e.h);
    // The engine goes on serving after the cancel.
    let again = run_all(&e.h, &[request(&g[1].0, greedy(g[1].1.len() as u32), 1)]);
    assert_eq!(tokens(&again[0], 0), g[1].1);
    wait_idle(&e.h);
}

#[test]
fn runner_errors_fail_the_requests_of_the_step_and_free_their_blocks() {
    let model = "llama";
    let g = golden(model);
    let (prompt, want) = &g[0];
    for mode in [Mode { fail_collect: Some(3), ..pipelined() }, Mode { fail_launch: Some(3), ..pipelined() }] {
        let e = start(model, mode);
        let evs = run_all(&e.h, &[request(prompt, greedy(16), 2)]).remove(0);
        match evs.last() {
            Some(GenerationEvent::Error(msg)) => assert!(msg.contains("injected"), "{msg}"),
            other => panic!("{mode:?}: expected an error, got {other:?}"),
        }
        assert!(!evs.iter().any(|e| matches!(e, GenerationEvent::Finished { .. })));
        wait_idle(&e.h);
        let evs = run_all(&e.h, &[request(prompt, greedy(16), 1)]).remove(0);
        assert_eq!(&tokens(&evs, 0), want, "{mode:?}: the engine serves on after the error");
        wait_idle(&e.h);
    }
}

#[test]
fn shutdown_drains_a_pipelined_engine() {
    let model = "llama";
    let g = golden(model);
    let (prompt, want) = &g[0];
    let e = start(model, pipelined());
    let s = submit(&e.h, request(prompt, greedy(16), 2)).unwrap();
    e.h.shutdown(Duration::from_secs(30));
    let evs = rt().block_on(events(s, 2));
    assert_eq!(&tokens(&evs, 0), want);
    assert_eq!(&tokens(&evs, 1), want);
    assert!(!e.h.is_alive());

    // A zero drain timeout aborts what is left, with `Finished` for every choice and `Usage`.
    let e = start(model, pipelined());
    let s = submit(&e.h, request(prompt, greedy(200), 2)).unwrap();
    e.h.shutdown(Duration::ZERO);
    let evs = rt().block_on(events(s, 2));
    assert!(matches!(evs.last(), Some(GenerationEvent::Usage(_))), "{:?}", evs.last());
}
