//! The engine thread and its handle.
//!
//! [`EngineHandle`] is a cheap `Clone` handle to one model. One `std::thread` per model (the
//! actor) owns the runner, the [`Scheduler`] and its block manager, the samplers and the
//! detokenizers; handles talk to it over a channel and read live counters from shared atomics.
//! Each request's events come back on its own [`GenerationStream`]; dropping the stream
//! cancels the request and frees its KV blocks before the next step.
//!
//! Steps are pipelined one deep: while the runner computes step N+1 ([`Launched::InFlight`]),
//! the thread detokenizes step N's tokens, scans them for stop strings and sends their events.
//! What needs only token ids (sampler state, forks, ends by id or length) runs before N+1 is
//! scheduled; a choice a stop string ends keeps its blocks until N+1 is collected. See
//! `Engine::iteration` and `docs/architecture.md`.
//!
//! A panic inside the engine thread is caught: in-flight requests get
//! [`GenerationEvent::Error`], the handle is marked dead (new submissions are refused with
//! [`EngineError::ShuttingDown`]) and the process goes on.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llmd_models::ModelError;
use llmd_models::runner::{Launched, ModelRunner, RowOutput, RowRequest};
use llmd_tokenizer::{IncrementalDecoder, Tokenizer};
use tokio::sync::mpsc as tokio_mpsc;

use crate::error::EngineError;
use crate::kv::BlockManager;
use crate::request::{
    FinishReason, GenerateRequest, GenerationEvent, InvalidParam, MAX_N, PositionLogprobs, SamplingParams, StopMatch,
    TokenLogprob, Usage,
};
use crate::sampler::{Sampled, SeqSampler};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerOutput, SeqId};

/// How to load a model. Built by the daemon from config / `llmctl load`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// HF-format folder (config.json, safetensors, tokenizer.json, ...).
    pub path: PathBuf,
    /// Name clients use in the `model` field.
    pub served_name: String,
    /// Where it came from, for `llmctl ps` (`hf:org/name`, a path...).
    pub source: String,
    /// Caps the model's `max_position_embeddings`; None keeps it. The engine lowers it further
    /// (with a warning) when the KV cache cannot hold that many tokens.
    pub max_model_len: Option<u32>,
    /// "auto", "bfloat16", "float16" or "float32". The CPU backend computes in f32 whatever this says,
    /// but keeps the checkpoint's dtype in memory where it can.
    pub dtype: String,
    /// "auto", "cpu" or "cuda".
    pub device: String,
    /// KV cache budget in bytes on the CPU.
    pub cpu_kv_cache_bytes: u64,
    /// Fraction of free GPU memory to use (GPU backends only).
    pub gpu_memory_utilization: f32,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens per forward step (decodes plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Tokens per KV block (16 by default).
    pub block_size: usize,
    /// Waiting requests beyond this are refused with `EngineError::QueueFull`.
    pub max_queue: usize,
    /// Reuse KV blocks of identical prompt prefixes across requests.
    pub enable_prefix_caching: bool,
    /// GPU indices chosen by placement (CUDA device numbers, PCI bus order); empty means GPU 0.
    /// Several GPUs serve the model tensor-parallel, one rank per GPU.
    pub gpus: Vec<u32>,
    /// Tensor parallel: sum decode-sized steps through GPU peer memory where every pair of GPUs
    /// has peer access (false: NCCL for every all-reduce).
    pub peer_all_reduce: bool,
}

impl LoadOptions {
    /// Defaults suited to a CPU run of a small model.
    pub fn new(path: impl Into<PathBuf>, served_name: impl Into<String>) -> Self {
        let path = path.into();
        LoadOptions {
            source: path.display().to_string(),
            path,
            served_name: served_name.into(),
            max_model_len: None,
            dtype: "auto".into(),
            device: "auto".into(),
            cpu_kv_cache_bytes: 512 << 20,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            max_queue: 1024,
            enable_prefix_caching: true,
            gpus: Vec::new(),
            peer_all_reduce: true,
        }
    }

    /// Range checks; the error names the option and the limit.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad =
            |message: String| Err(EngineError::Model(ModelError::Config { file: "load options".into(), message }));
        if self.max_num_seqs == 0 {
            return bad("`max_num_seqs` must be >= 1".into());
        }
        if self.max_num_batched_tokens < self.max_num_seqs {
            return bad(format!(
                "`max_num_batched_tokens` ({}) must be >= `max_num_seqs` ({}) so that every running sequence can decode each step",
                self.max_num_batched_tokens, self.max_num_seqs
            ));
        }
        if self.block_size == 0 || self.block_size > 4096 {
            return bad(format!("`block_size` must be in 1..=4096, got {}", self.block_size));
        }
        if self.max_queue == 0 {
            return bad("`max_queue` must be >= 1".into());
        }
        if self.max_model_len == Some(0) {
            return bad("`max_model_len` must be >= 1".into());
        }
        if !matches!(self.dtype.as_str(), "auto" | "bfloat16" | "float16" | "float32") {
            return bad(format!("`dtype` must be auto, bfloat16, float16 or float32, got `{}`", self.dtype));
        }
        Ok(())
    }
}

/// Static facts about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub served_name: String,
    pub source: String,
    /// HF `architectures[0]`, e.g. "Qwen2ForCausalLM".
    pub architecture: String,
    pub num_params: u64,
    pub dtype: String,
    pub device: String,
    /// Longest prompt + completion, in tokens.
    pub max_model_len: u32,
    /// Width of the logits (the model's `vocab_size`).
    pub vocab_size: usize,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub kv_block_size: u32,
    pub kv_blocks_total: u32,
    /// Unix seconds when loading finished.
    pub loaded_at: u64,
}

/// Live counters and gauges, cheap to read (atomics), for `llmctl ps` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStats {
    /// Sequences running (holding KV blocks).
    pub running: usize,
    /// Requests not started yet plus preempted sequences waiting to resume.
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    /// Prompt tokens looked up in the prefix cache (counted at each admission).
    pub prefix_cache_queries: u64,
    /// Of those, tokens served from the cache.
    pub prefix_cache_hits: u64,
    pub preemptions: u64,
    /// Prompt tokens of started requests.
    pub prompt_tokens: u64,
    /// Tokens generated, over all choices.
    pub generation_tokens: u64,
}

/// Loading progress: `phase` is "tokenizer", "weights" or "kv_cache"; `done` of `total` units
/// (tensors for "weights").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProgress {
    pub phase: &'static str,
    pub done: u64,
    pub total: u64,
}

/// What a backend loader reports about the model it built, for [`EngineHandle::start`].
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub architecture: String,
    pub num_params: u64,
    pub dtype: String,
    pub weight_bytes: u64,
    pub max_position_embeddings: usize,
    /// Logits width.
    pub vocab_size: usize,
    /// End-of-sequence ids from the model's configs (the tokenizer's are added).
    pub eos_token_ids: Vec<u32>,
}

impl ModelFacts {
    /// The facts of a model a backend loaded (its runner goes to [`EngineHandle::start`]).
    pub fn of(loaded: &llmd_models::LoadedModel) -> ModelFacts {
        ModelFacts {
            architecture: loaded.config.architecture.clone(),
            num_params: loaded.num_params,
            dtype: loaded.dtype.clone(),
            weight_bytes: loaded.weight_bytes,
            max_position_embeddings: loaded.max_position_embeddings,
            vocab_size: loaded.vocab_size,
            eos_token_ids: loaded.eos_token_ids.clone(),
        }
    }
}

enum Command {
    Submit { key: u64, req: GenerateRequest, tx: tokio_mpsc::UnboundedSender<GenerationEvent>, at: Instant },
    Cancel(u64),
    Shutdown { deadline: Instant },
}

#[derive(Default)]
struct Counters {
    running: AtomicUsize,
    /// Submitted, not yet scheduled once (includes commands still in the channel).
    unstarted: AtomicUsize,
    preempted_waiting: AtomicUsize,
    kv_used: AtomicUsize,
    prefix_queries: AtomicU64,
    prefix_hits: AtomicU64,
    preemptions: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
}

struct Shared {
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    counters: Counters,
    /// Milliseconds since `epoch` of the engine loop's last beat.
    heartbeat_ms: AtomicU64,
    epoch: Instant,
    accepting: AtomicBool,
    alive: AtomicBool,
    next_key: AtomicU64,
    max_queue: usize,
    /// Prompt ids must be below this (model and tokenizer vocabularies).
    id_limit: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    fn beat(&self) {
        self.heartbeat_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Cloneable handle to one loaded model's engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("model", &self.shared.info.served_name).finish()
    }
}

impl EngineHandle {
    /// Loads the model folder of `opts` and starts its engine thread. Blocking (seconds to
    /// minutes): call it from `spawn_blocking`. Device "cpu" uses the llmd-models CPU backend;
    /// "cuda" the llmd-cuda backend (GPU 0), which needs a build with the `cuda` feature;
    /// "auto" picks CUDA when built with it and a GPU is usable, else the CPU.
    pub fn load(opts: LoadOptions, progress: &mut dyn FnMut(LoadProgress)) -> Result<EngineHandle, EngineError> {
        opts.validate()?;
        let use_cuda = match opts.device.as_str() {
            "cpu" => false,
            "auto" => cuda_usable(&opts.path),
            "cuda" => {
                if !cfg!(feature = "cuda") {
                    return Err(EngineError::Model(ModelError::Backend(
                        "device \"cuda\" needs an llmd built with the `cuda` feature; use device \"cpu\"".into(),
                    )));
                }
                true
            }
            other => {
                return Err(EngineError::Model(ModelError::Config {
                    file: "load options".into(),
                    message: format!("`device` must be auto, cpu or cuda, got `{other}`"),
                }));
            }
        };
        progress(LoadProgress { phase: "tokenizer", done: 0, total: 1 });
        let tokenizer = Tokenizer::from_dir(&opts.path).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        progress(LoadProgress { phase: "tokenizer", done: 1, total: 1 });
        let mut weights = |done: usize, total: usize| {
            progress(LoadProgress { phase: "weights", done: done as u64, total: total as u64 })
        };
        let loaded = if use_cuda {
            load_cuda(&opts, &mut weights)?
        } else {
            let cfg = llmd_models::LoadConfig { kv_cache_bytes: opts.cpu_kv_cache_bytes, block_size: opts.block_size };
            llmd_models::load_cpu(&opts.path, &cfg, &mut weights)?
        };
        let facts = ModelFacts::of(&loaded);
        let layout = loaded.runner.kv_layout();
        progress(LoadProgress { phase: "kv_cache", done: layout.num_blocks as u64, total: layout.num_blocks as u64 });
        Self::start(loaded.runner, Arc::new(tokenizer), facts, &opts)
    }

    /// Starts an engine thread over an already built runner (any backend, or a test double).
    pub fn start(
        runner: Box<dyn ModelRunner>,
        tokenizer: Arc<Tokenizer>,
        facts: ModelFacts,
        opts: &LoadOptions,
    ) -> Result<EngineHandle, EngineError> {
        opts.validate()?;
        let layout = runner.kv_layout();
        if layout.block_size != opts.block_size || layout.num_blocks == 0 {
            return Err(EngineError::Model(ModelError::Config {
                file: "load options".into(),
                message: format!(
                    "runner KV layout ({} blocks of {} tokens) does not match `block_size` {}",
                    layout.num_blocks, layout.block_size, opts.block_size
                ),
            }));
        }
        let kv_tokens = layout.num_blocks * layout.block_size;
        let wanted = opts
            .max_model_len
            .map_or(facts.max_position_embeddings, |m| (m as usize).min(facts.max_position_embeddings));
        let max_model_len = wanted.min(kv_tokens).min(u32::MAX as usize) as u32;
        if (max_model_len as usize) < wanted {
            tracing::warn!(
                model = %opts.served_name,
                wanted,
                kv_tokens,
                "KV cache holds fewer tokens than the context length; max_model_len lowered to fit"
            );
        }
        let mut eos = facts.eos_token_ids.clone();
        for &id in tokenizer.eos_token_ids() {
            if !eos.contains(&id) {
                eos.push(id);
            }
        }
        let info = ModelInfo {
            served_name: opts.served_name.clone(),
            source: opts.source.clone(),
            architecture: facts.architecture.clone(),
            num_params: facts.num_params,
            dtype: facts.dtype.clone(),
            device: runner.device_name(),
            max_model_len,
            vocab_size: facts.vocab_size,
            weight_bytes: facts.weight_bytes,
            kv_cache_bytes: (layout.bytes_per_block() * layout.num_blocks) as u64,
            kv_block_size: layout.block_size as u32,
            kv_blocks_total: layout.num_blocks as u32,
            loaded_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let shared = Arc::new(Shared {
            id_limit: facts.vocab_size.min(tokenizer.vocab_size()),
            info,
            tokenizer: Arc::clone(&tokenizer),
            counters: Counters::default(),
            heartbeat_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            accepting: AtomicBool::new(true),
            alive: AtomicBool::new(true),
            next_key: AtomicU64::new(1),
            max_queue: opts.max_queue,
            thread: Mutex::new(None),
        });
        let sched = Scheduler::new(
            SchedulerConfig { max_num_seqs: opts.max_num_seqs, max_num_batched_tokens: opts.max_num_batched_tokens },
            BlockManager::new(layout.num_blocks, layout.block_size, opts.enable_prefix_caching),
        );
        let (tx, rx) = mpsc::channel();
        let engine = Engine {
            runner,
            sched,
            tokenizer,
            eos,
            sample_width: facts.vocab_size.min(shared.tokenizer.vocab_size()),
            requests: HashMap::new(),
            shared: Arc::clone(&shared),
            shutdown_deadline: None,
            in_flight: None,
            texts: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("llmd-engine-{}", opts.served_name))
            .spawn(move || engine.run(rx))
            .map_err(|e| EngineError::Model(ModelError::Backend(format!("cannot start the engine thread: {e}"))))?;
        *shared.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(EngineHandle { shared, tx })
    }

    /// Static facts about the model.
    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// The model's tokenizer (encode, decode, chat template).
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.shared.tokenizer
    }

    /// Live counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        EngineStats {
            running: c.running.load(Ordering::Relaxed),
            waiting: c.unstarted.load(Ordering::Relaxed) + c.preempted_waiting.load(Ordering::Relaxed),
            kv_blocks_used: c.kv_used.load(Ordering::Relaxed),
            kv_blocks_total: self.shared.info.kv_blocks_total as usize,
            prefix_cache_queries: c.prefix_queries.load(Ordering::Relaxed),
            prefix_cache_hits: c.prefix_hits.load(Ordering::Relaxed),
            preemptions: c.preemptions.load(Ordering::Relaxed),
            prompt_tokens: c.prompt_tokens.load(Ordering::Relaxed),
            generation_tokens: c.generation_tokens.load(Ordering::Relaxed),
        }
    }

    /// When the engine loop last ran; it beats at least once a second even when idle.
    pub fn last_heartbeat(&self) -> Instant {
        self.shared.epoch + Duration::from_millis(self.shared.heartbeat_ms.load(Ordering::Relaxed))
    }

    /// False once the engine thread stopped (shut down, or died of a panic).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Relaxed)
    }

    /// Validates and queues a request. Errors: invalid parameters, `n` out of 1..=[`MAX_N`],
    /// empty prompt, token ids outside the vocabulary, prompt + `max_tokens` beyond
    /// `max_model_len`, full queue, engine shutting down or dead.
    pub fn submit(&self, req: GenerateRequest) -> Result<GenerationStream, EngineError> {
        let name = &self.shared.info.served_name;
        if !self.shared.accepting.load(Ordering::Acquire) || !self.is_alive() {
            return Err(EngineError::ShuttingDown(name.clone()));
        }
        req.sampling.validate()?;
        if req.n == 0 || req.n > MAX_N {
            return Err(InvalidParam {
                param: "n",
                message: format!("`n` must be between 1 and {MAX_N}, got {}", req.n),
            }
            .into());
        }
        if req.prompt_tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&token) = req.prompt_tokens.iter().find(|&&t| t as usize >= self.shared.id_limit) {
            return Err(EngineError::TokenOutOfRange { token, vocab_size: self.shared.id_limit });
        }
        let max_model_len = self.shared.info.max_model_len;
        if req.prompt_tokens.len() as u64 + u64::from(req.sampling.max_tokens) > u64::from(max_model_len) {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: req.prompt_tokens.len(),
                max_tokens: req.sampling.max_tokens,
                max_model_len,
            });
        }
        let counters = &self.shared.counters;
        let max_queue = self.shared.max_queue;
        if counters
            .unstarted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w < max_queue).then_some(w + 1))
            .is_err()
        {
            return Err(EngineError::QueueFull { model: name.clone(), max_queue });
        }
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = tokio_mpsc::unbounded_channel();
        if self.tx.send(Command::Submit { key, req, tx: etx, at: Instant::now() }).is_err() {
            counters.unstarted.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::ShuttingDown(name.clone()));
        }
        Ok(GenerationStream { rx: erx, key, cancel: self.tx.clone(), done: false })
    }

    /// Stops accepting requests, lets in-flight ones finish for up to `drain_timeout`, aborts
    /// the rest (their streams get `Finished { reason: Abort }` and `Usage`), and joins the
    /// engine thread. Blocking: call it from `spawn_blocking`. Later calls return at once.
    pub fn shutdown(&self, drain_timeout: Duration) {
        self.shared.accepting.store(false, Ordering::Release);
        let _ = self.tx.send(Command::Shutdown { deadline: Instant::now() + drain_timeout });
        let thread = self.shared.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The events of one request. `next().await` yields them in order and `None` after the last
/// (`Usage` or `Error`). Also a `futures::Stream`. Dropping it early cancels the request.
#[derive(Debug)]
pub struct GenerationStream {
    rx: tokio_mpsc::UnboundedReceiver<GenerationEvent>,
    key: u64,
    cancel: mpsc::Sender<Command>,
    done: bool,
}

impl std::fmt::Debug for Command {
    // Manual: the request's prompt would flood logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Submit { key, .. } => write!(f, "Submit({key})"),
            Command::Cancel(key) => write!(f, "Cancel({key})"),
            Command::Shutdown { .. } => write!(f, "Shutdown"),
        }
    }
}

impl GenerationStream {
    /// The next event; `None` once the request is over.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<GenerationEvent>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                if matches!(ev, GenerationEvent::Usage(_) | GenerationEvent::Error(_)) {
                    self.done = true;
                }
                Poll::Ready(Some(ev))
            }
            Poll::Ready(None) => {
                // The engine went away without closing the request (it stopped or died).
                self.done = true;
                Poll::Ready(Some(GenerationEvent::Error("the engine stopped before the request finished".into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl futures::Stream for GenerationStream {
    type Item = GenerationEvent;
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<GenerationEvent>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cancel.send(Command::Cancel(self.key));
        }
    }
}

/// Text state of one choice: detokenizer plus held-back text that may start a stop string.
struct Choice {
    sampler: SeqSampler,
    decoder: IncrementalDecoder,
    /// Decoded but not yet emitted: a suffix that may be the start of a stop string.
    held: String,
    done: bool,
}

struct Request {
    tx: tokio_mpsc::UnboundedSender<GenerationEvent>,
    params: SamplingParams,
    prompt_len: usize,
    submitted: Instant,
    started: bool,
    queue_time: Duration,
    cached_tokens: usize,
    completion_tokens: u32,
    choices: Vec<Choice>,
    unfinished: u32,
}

impl Request {
    fn send(&self, ev: GenerationEvent) {
        // A closed receiver means the client left; the Cancel it sent is on its way.
        let _ = self.tx.send(ev);
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: self.completion_tokens,
            cached_tokens: self.cached_tokens as u32,
            queue_time: self.queue_time,
        }
    }
}

struct Engine {
    runner: Box<dyn ModelRunner>,
    sched: Scheduler,
    tokenizer: Arc<Tokenizer>,
    eos: Vec<u32>,
    /// Logits beyond this are never sampled: ids the tokenizer cannot decode (padded embeddings).
    sample_width: usize,
    requests: HashMap<u64, Request>,
    shared: Arc<Shared>,
    shutdown_deadline: Option<Instant>,
    /// The step the runner is computing while the host does the text of the previous one.
    in_flight: Option<Flight>,
    /// The text half of the last collected step's tokens, not emitted yet (phase 2).
    texts: Vec<TokenText>,
}

/// A step launched with [`Launched::InFlight`] and not collected yet.
struct Flight {
    out: SchedulerOutput,
    /// When `launch` was called, and when it returned.
    launched: Instant,
    launch_returned: Instant,
    /// Scheduler releases put off because this step still uses the sequences' blocks; applied
    /// once it is collected.
    releases: Vec<Release>,
}

/// A scheduler mutation that frees KV blocks.
#[derive(Debug, Clone, Copy)]
enum Release {
    /// A choice ended ([`Scheduler::finish`]).
    Seq(SeqId),
    /// A request failed ([`Scheduler::abort_group`]).
    Group(u64),
}

/// What the text half (phase 2) of one sampled token needs from its id half (phase 1).
struct TokenText {
    group: u64,
    seq: SeqId,
    choice: usize,
    sampled: Sampled,
    /// The token is EOS or one of `stop_token_ids`: the choice ended by id.
    stop_id: Option<StopMatch>,
    /// The choice reached `max_tokens` with this token.
    at_limit: bool,
}

/// Outcome of looking for stop strings in decoded text.
#[derive(Debug, PartialEq, Eq)]
enum StopScan {
    /// A stop string starts at byte `at`: emit `text[..at]`, drop the rest.
    Matched { at: usize, stop: usize },
    /// No match: emit `text[..emit]`, hold back the rest (a prefix of some stop string).
    Clear { emit: usize },
}

fn scan_stops(text: &str, stops: &[String]) -> StopScan {
    let first = stops.iter().enumerate().filter_map(|(i, s)| text.find(s.as_str()).map(|at| (at, i))).min();
    if let Some((at, stop)) = first {
        return StopScan::Matched { at, stop };
    }
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    for k in (1..longest.min(text.len() + 1)).rev() {
        let start = text.len() - k;
        if text.is_char_boundary(start) && stops.iter().any(|s| s.len() > k && s.starts_with(&text[start..])) {
            return StopScan::Clear { emit: start };
        }
    }
    StopScan::Clear { emit: text.len() }
}

impl Engine {
    fn run(mut self, rx: mpsc::Receiver<Command>) {
        self.shared.beat();
        loop {
            let step = std::panic::catch_unwind(AssertUnwindSafe(|| self.iteration(&rx)));
            match step {
                Ok(true) => continue,
                Ok(false) => break,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    tracing::error!(model = %self.shared.info.served_name, panic = %msg, "engine thread panicked; model marked dead");
                    self.shared.alive.store(false, Ordering::Release);
                    self.shared.accepting.store(false, Ordering::Release);
                    let err = format!("engine of model `{}` crashed: {msg}", self.shared.info.served_name);
                    for (_, req) in self.requests.drain() {
                        req.send(GenerationEvent::Error(err.clone()));
                    }
                    while let Ok(cmd) = rx.try_recv() {
                        if let Command::Submit { tx, .. } = cmd {
                            let _ = tx.send(GenerationEvent::Error(err.clone()));
                        }
                    }
                    break;
                }
            }
        }
        self.shared.alive.store(false, Ordering::Release);
        self.shared.accepting.store(false, Ordering::Release);
        self.shared.counters.unstarted.store(0, Ordering::Relaxed);
        self.shared.counters.running.store(0, Ordering::Relaxed);
        self.shared.counters.preempted_waiting.store(0, Ordering::Relaxed);
    }

    /// One loop turn: collect the step in flight and take its token ids (phase 1), take
    /// commands, launch the next step, then emit the text of the collected one (phase 2) while
    /// the runner computes. False when the thread should end.
    ///
    /// Commands are taken only while no step is in flight, so a cancel frees blocks at once.
    fn iteration(&mut self, rx: &mpsc::Receiver<Command>) -> bool {
        self.shared.beat();
        self.land_in_flight();
        let go_on = self.commands_and_step(rx);
        // Overlaps the step just launched when the runner left it in flight.
        self.emit_texts();
        if go_on {
            self.publish_stats();
        }
        go_on
    }

    /// The middle of [`Engine::iteration`], with no step in flight: commands, then the next
    /// step. False when the thread should end.
    fn commands_and_step(&mut self, rx: &mpsc::Receiver<Command>) -> bool {
        if !self.sched.has_work() {
            // About to wait for commands: the last tokens' text goes out first.
            self.emit_texts();
        }
        // Block for commands only when idle; the timeout keeps the heartbeat going.
        if !self.sched.has_work() && self.shutdown_deadline.is_none() {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(cmd) => self.command(cmd),
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => self.command(cmd),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    if !self.sched.has_work() {
                        return false;
                    }
                    break;
                }
            }
        }
        if let Some(deadline) = self.shutdown_deadline {
            if !self.sched.has_work() {
                return false;
            }
            if Instant::now() >= deadline {
                self.emit_texts();
                self.abort_all("drain timeout reached at shutdown");
                return false;
            }
        }
        if self.sched.has_work() {
            self.step();
        } else if self.shutdown_deadline.is_some() {
            return false;
        }
        true
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { key, req, tx, at } => self.add_request(key, req, tx, at),
            Command::Cancel(key) => {
                if let Some(req) = self.requests.remove(&key) {
                    if !req.started {
                        self.shared.counters.unstarted.fetch_sub(1, Ordering::AcqRel);
                    }
                    self.sched.abort_group(key);
                    tracing::debug!(key, "request cancelled");
                }
            }
            Command::Shutdown { deadline } => {
                self.shutdown_deadline = Some(self.shutdown_deadline.map_or(deadline, |d| d.min(deadline)));
            }
        }
        self.publish_stats();
    }

    fn add_request(
        &mut self,
        key: u64,
        req: GenerateRequest,
        tx: tokio_mpsc::UnboundedSender<GenerationEvent>,
        at: Instant,
    ) {
        let fail = |shared: &Shared, tx: &tokio_mpsc::UnboundedSender<GenerationEvent>, msg: String| {
            shared.counters.unstarted.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(GenerationEvent::Error(msg));
        };
        let mut choices = Vec::with_capacity(req.n as usize);
        for c in 0..req.n {
            let decoder = match self.tokenizer.incremental_decoder(&req.prompt_tokens, req.sampling.skip_special_tokens)
            {
                Ok(d) => d,
                Err(e) => return fail(&self.shared, &tx, format!("tokenizer: {e}")),
            };
            choices.push(Choice {
                sampler: SeqSampler::new(&req.sampling, &req.prompt_tokens, c, &self.eos),
                decoder,
                held: String::new(),
                done: false,
            });
        }
        let prompt_len = req.prompt_tokens.len();
        tracing::debug!(request_id = %req.request_id, key, prompt_len, n = req.n, "request queued");
        if let Err(e) = self.sched.add(key, req.prompt_tokens, req.n, req.sampling.max_tokens as usize) {
            return fail(&self.shared, &tx, e.to_string());
        }
        self.requests.insert(
            key,
            Request {
                tx,
                params: req.sampling,
                prompt_len,
                submitted: at,
                started: false,
                queue_time: Duration::ZERO,
                cached_tokens: 0,
                completion_tokens: 0,
                choices,
                unfinished: req.n,
            },
        );
    }

    fn publish_stats(&self) {
        let c = &self.shared.counters;
        let unstarted_here = self.requests.values().filter(|r| !r.started).count();
        c.running.store(self.sched.num_running(), Ordering::Relaxed);
        c.preempted_waiting.store(self.sched.num_waiting().saturating_sub(unstarted_here), Ordering::Relaxed);
        c.kv_used.store(self.sched.kv().num_used_blocks(), Ordering::Relaxed);
        let (q, h) = self.sched.prefix_cache_counters();
        c.prefix_queries.store(q, Ordering::Relaxed);
        c.prefix_hits.store(h, Ordering::Relaxed);
        c.preemptions.store(self.sched.preemptions(), Ordering::Relaxed);
    }

    fn step(&mut self) {
        let out = self.sched.schedule();
        if out.is_empty() {
            // Nothing fits right now (cannot happen with a lone request: `add` refuses those);
            // avoid a hot loop while waiting for cancellations.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        let now = Instant::now();
        for &id in &out.first_scheduled {
            let Some(seq) = self.sched.seq(id) else { continue };
            let (group, cached) = (seq.group, seq.cached_tokens());
            if let Some(req) = self.requests.get_mut(&group).filter(|r| !r.started) {
                req.started = true;
                req.queue_time = now.saturating_duration_since(req.submitted);
                req.cached_tokens = cached;
                self.shared.counters.unstarted.fetch_sub(1, Ordering::AcqRel);
                self.shared.counters.prompt_tokens.fetch_add(req.prompt_len as u64, Ordering::Relaxed);
            }
        }
        // Published before any event of this step goes out, so a client that sees a token
        // also sees the blocks behind it.
        self.publish_stats();
        let started = Instant::now();
        let launched = self.launch(&out);
        let returned = Instant::now();
        match launched {
            Ok(Launched::InFlight) => {
                self.in_flight =
                    Some(Flight { out, launched: started, launch_returned: returned, releases: Vec::new() });
            }
            Ok(Launched::Ready(rows)) => {
                log_step(&out, started, returned, None);
                self.land(&out, Ok(rows), Vec::new());
            }
            Err(e) => {
                log_step(&out, started, returned, None);
                self.land(&out, Err(e), Vec::new());
            }
        }
    }

    /// Waits for the step in flight, if any, and takes its result ([`Engine::land`]).
    fn land_in_flight(&mut self) {
        let Some(flight) = self.in_flight.take() else { return };
        let waiting = Instant::now();
        let result = self.runner.collect();
        log_step(&flight.out, flight.launched, flight.launch_returned, Some(waiting));
        self.land(&flight.out, result, flight.releases);
    }

    /// Takes the result of step `out`, with no step in flight. The text of the step before
    /// goes out first (it may end choices by a stop string), then `releases` (what waited for
    /// this step) are applied; then phase 1 of each row ([`Engine::accept_row`]), or, when the
    /// runner failed, every request of the step fails.
    fn land(&mut self, out: &SchedulerOutput, result: Result<Vec<RowOutput>, ModelError>, releases: Vec<Release>) {
        self.emit_texts();
        let expected = out.scheduled.iter().filter(|s| s.wants_logits).count();
        let result = result.and_then(|rows| {
            if rows.len() == expected {
                Ok(rows)
            } else {
                Err(ModelError::Backend(format!("runner returned {} logits rows, expected {expected}", rows.len())))
            }
        });
        if result.is_ok() {
            self.sched.complete_step(out);
        }
        // A released sequence's row (computed after its choice ended) is dropped below.
        for r in releases {
            self.release(r);
        }
        let rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(model = %self.shared.info.served_name, error = %e, "forward step failed");
                let groups: Vec<u64> =
                    out.scheduled.iter().filter_map(|s| self.sched.seq(s.seq).map(|q| q.group)).collect();
                for g in groups {
                    self.fail_request(g, format!("model error: {e}"));
                }
                return;
            }
        };
        let with_logits = out.scheduled.iter().filter(|s| s.wants_logits).map(|s| s.seq);
        for (id, row) in with_logits.zip(rows) {
            self.accept_row(id, &row);
        }
    }

    /// Block copies, then the step on the runner, with a [`RowRequest`] per logits row.
    fn launch(&mut self, out: &SchedulerOutput) -> Result<Launched, ModelError> {
        for &(src, dst) in &out.copies {
            self.runner.copy_block(src, dst)?;
        }
        // Rows the backend picks on its device: everything but logprobs (the host needs the
        // row) and a prompt about to fork into `n` choices (each samples from the same row).
        let width = self.sample_width as u32;
        let mut requests = Vec::with_capacity(out.scheduled.len());
        for s in out.scheduled.iter().filter(|s| s.wants_logits) {
            let Some(seq) = self.sched.seq(s.seq) else {
                requests.push(RowRequest::Logits);
                continue;
            };
            let (group, choice, forks) = (seq.group, seq.choice as usize, seq.pending_forks());
            let request = match self.requests.get_mut(&group) {
                Some(req) if forks == 0 && req.params.logprobs.is_none() => match req.choices.get_mut(choice) {
                    Some(c) => RowRequest::Pick(c.sampler.pick(&req.params, width)),
                    None => RowRequest::Logits,
                },
                _ => RowRequest::Logits,
            };
            requests.push(request);
        }
        self.runner.launch(&out.batch, &requests)
    }

    /// Phase 1 of one logits row: forks the pending choices off a finished prompt, then takes
    /// the token of each ([`Engine::accept_choice`]). Runs before the next step is scheduled.
    fn accept_row(&mut self, id: SeqId, row: &RowOutput) {
        let Some(seq) = self.sched.seq(id) else { return };
        let group = seq.group;
        let mut seqs = vec![id];
        if seq.pending_forks() > 0 {
            seqs.extend(self.sched.fork(id));
        }
        for s in seqs {
            let Some(choice) = self.sched.seq(s).map(|q| q.choice) else { continue };
            self.accept_choice(group, s, choice as usize, row);
        }
    }

    /// Phase 1 of one choice's token, what only needs its id: the sampler takes it (penalty
    /// counts, the seeded generator), the counters count it, and the sequence either grows by
    /// it or, when it ends the choice by id (EOS, a stop token) or by `max_tokens`, is finished
    /// (no step is in flight here). The text half is queued for [`Engine::emit_text`].
    fn accept_choice(&mut self, group: u64, seq: SeqId, c: usize, row: &RowOutput) {
        let width = self.sample_width as u32;
        let Some(req) = self.requests.get_mut(&group) else { return };
        let params = &req.params;
        let Some(choice) = req.choices.get_mut(c).filter(|ch| !ch.done) else { return };
        let sampled = match row {
            RowOutput::Logits(l) => choice.sampler.sample(params, l, width, None),
            RowOutput::Token(token) => choice.sampler.accept(*token),
        };
        let tok = sampled.token;
        req.completion_tokens += 1;
        self.shared.counters.generation_tokens.fetch_add(1, Ordering::Relaxed);
        let stop_id = if !params.ignore_eos && self.eos.contains(&tok) {
            Some(StopMatch::Eos(tok))
        } else if params.stop_token_ids.contains(&tok) {
            Some(StopMatch::Token(tok))
        } else {
            None
        };
        let at_limit = choice.sampler.num_output() >= params.max_tokens;
        if stop_id.is_some() || at_limit {
            self.sched.finish(seq);
        } else {
            self.sched.append_token(seq, tok);
        }
        self.texts.push(TokenText { group, seq, choice: c, sampled, stop_id, at_limit });
    }

    /// Phase 2 of the queued tokens, in order. A tokenizer error fails the request.
    fn emit_texts(&mut self) {
        for t in std::mem::take(&mut self.texts) {
            let group = t.group;
            if let Err(msg) = self.emit_text(t) {
                self.fail_request(group, msg);
            }
        }
    }

    /// Phase 2 of one token: incremental detokenization, the stop-string scan, logprobs, and
    /// the events. A choice that a stop string ends is over for the client at once; its
    /// sequence is finished now, or after the step in flight (which computes its next token,
    /// dropped then) is collected.
    fn emit_text(&mut self, t: TokenText) -> Result<(), String> {
        let Some(req) = self.requests.get_mut(&t.group) else { return Ok(()) };
        let params = &req.params;
        let (c, tok) = (t.choice, t.sampled.token);
        // Ended by id or by `max_tokens`: phase 1 finished the sequence already.
        let finished_by_id = t.stop_id.is_some() || t.at_limit;
        let choice = &mut req.choices[c];
        let logprobs = match params.logprobs {
            Some(_) => vec![position_logprobs(&self.tokenizer, &t.sampled)],
            None => Vec::new(),
        };
        let mut finish: Option<(FinishReason, Option<StopMatch>)> = None;
        let mut text = String::new();
        let mut tail = String::new();
        if let Some(m) = t.stop_id {
            // The stop token itself is not part of the text; held-back text was not a stop.
            tail = std::mem::take(&mut choice.held);
            tail.push_str(&choice.decoder.finish().map_err(|e| format!("tokenizer: {e}"))?);
            finish = Some((FinishReason::Stop, Some(m)));
        } else {
            let new = choice.decoder.push(tok).map_err(|e| format!("tokenizer: {e}"))?;
            let mut buf = std::mem::take(&mut choice.held);
            buf.push_str(&new);
            if params.stop.is_empty() {
                text = buf;
            } else {
                match scan_stops(&buf, &params.stop) {
                    StopScan::Matched { at, stop } => {
                        buf.truncate(at);
                        text = buf;
                        finish = Some((FinishReason::Stop, Some(StopMatch::String(params.stop[stop].clone()))));
                    }
                    StopScan::Clear { emit } => {
                        choice.held = buf.split_off(emit);
                        text = buf;
                    }
                }
            }
            if finish.is_none() && t.at_limit {
                tail = std::mem::take(&mut choice.held);
                tail.push_str(&choice.decoder.finish().map_err(|e| format!("tokenizer: {e}"))?);
                // The flushed tail may complete a stop string.
                if let StopScan::Matched { at, stop } = scan_stops(&tail, &params.stop) {
                    tail.truncate(at);
                    finish = Some((FinishReason::Stop, Some(StopMatch::String(params.stop[stop].clone()))));
                } else {
                    finish = Some((FinishReason::Length, None));
                }
            }
        }
        choice.done = finish.is_some();
        req.send(GenerationEvent::Token { index: c as u32, token_ids: vec![tok], text, logprobs });
        let Some((reason, stop)) = finish else { return Ok(()) };
        req.send(GenerationEvent::Finished { index: c as u32, reason, text: tail, stop });
        req.unfinished -= 1;
        if req.unfinished == 0 {
            req.send(GenerationEvent::Usage(req.usage()));
            self.requests.remove(&t.group);
        }
        if !finished_by_id {
            self.release_or_defer(Release::Seq(t.seq));
        }
        Ok(())
    }

    /// Applies `r` now, or once the step in flight is collected when there is one (its
    /// sequences' blocks must stay allocated until then).
    fn release_or_defer(&mut self, r: Release) {
        match &mut self.in_flight {
            Some(flight) => flight.releases.push(r),
            None => self.release(r),
        }
    }

    fn release(&mut self, r: Release) {
        match r {
            Release::Seq(id) => self.sched.finish(id),
            Release::Group(group) => {
                self.sched.abort_group(group);
            }
        }
    }

    /// Ends a request with an error event; its sequences go at once, or after the step in
    /// flight.
    fn fail_request(&mut self, group: u64, msg: String) {
        self.release_or_defer(Release::Group(group));
        if let Some(req) = self.requests.remove(&group) {
            if !req.started {
                self.shared.counters.unstarted.fetch_sub(1, Ordering::AcqRel);
            }
            req.send(GenerationEvent::Error(msg));
        }
    }

    fn abort_all(&mut self, why: &str) {
        tracing::warn!(model = %self.shared.info.served_name, requests = self.requests.len(), "{why}; aborting");
        self.sched.abort_all();
        for (_, mut req) in self.requests.drain() {
            if !req.started {
                self.shared.counters.unstarted.fetch_sub(1, Ordering::AcqRel);
            }
            for (i, ch) in req.choices.iter_mut().enumerate() {
                if !ch.done {
                    ch.done = true;
                    let _ = req.tx.send(GenerationEvent::Finished {
                        index: i as u32,
                        reason: FinishReason::Abort,
                        text: String::new(),
                        stop: None,
                    });
                }
            }
            req.send(GenerationEvent::Usage(req.usage()));
        }
    }
}

/// Whether "auto" should pick the GPU: built with CUDA and at least one device usable.
/// "auto" uses the GPU when one is there and the CUDA backend serves this architecture;
/// otherwise the model runs on the CPU (with a log line saying why).
#[cfg(feature = "cuda")]
fn cuda_usable(dir: &std::path::Path) -> bool {
    if !llmd_cuda::device_count().is_ok_and(|n| n > 0) {
        return false;
    }
    match llmd_models::ModelConfig::from_dir(dir) {
        Ok(cfg) if llmd_cuda::supports_architecture(&cfg.architecture) => true,
        Ok(cfg) => {
            tracing::warn!(architecture = %cfg.architecture, "the CUDA backend does not serve this architecture yet; loading on the CPU");
            false
        }
        // The CPU loader reports the config error with its details.
        Err(_) => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_usable(_dir: &std::path::Path) -> bool {
    false
}

#[cfg(feature = "cuda")]
fn load_cuda(
    opts: &LoadOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<llmd_models::LoadedModel, EngineError> {
    let config = llmd_models::ModelConfig::from_dir(&opts.path)?;
    let max_model_len =
        opts.max_model_len.map_or(config.max_position_embeddings, |m| (m as usize).min(config.max_position_embeddings));
    let cfg = llmd_cuda::CudaLoadConfig {
        gpus: opts.gpus.iter().map(|&g| g as usize).collect(),
        gpu_memory_utilization: opts.gpu_memory_utilization,
        block_size: opts.block_size,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        max_model_len,
        peer_all_reduce: opts.peer_all_reduce,
    };
    Ok(llmd_cuda::load_cuda(&opts.path, &cfg, progress)?)
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(
    _opts: &LoadOptions,
    _progress: &mut dyn FnMut(usize, usize),
) -> Result<llmd_models::LoadedModel, EngineError> {
    Err(EngineError::Model(ModelError::Backend("this llmd was built without the `cuda` feature".into())))
}

/// The per-step debug line. `ms`: from the launch to the rows on the host; `host_ms`: host
/// work done while the step ran (the text of the step before; 0 when the runner answered at
/// once); `wait_ms`: time blocked on the runner for the rows (the whole step when it answered
/// at once). `collecting` is when `collect` was called, None for a step that came back ready.
fn log_step(out: &SchedulerOutput, launched: Instant, returned: Instant, collecting: Option<Instant>) {
    let done = Instant::now();
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1e3;
    let (host_ms, wait_ms) = match collecting {
        Some(c) => (ms(returned, c), ms(c, done)),
        None => (0.0, ms(launched, done)),
    };
    tracing::debug!(
        tokens = out.batch.num_tokens(),
        seqs = out.batch.seqs.len(),
        ms = ms(launched, done),
        host_ms,
        wait_ms,
        "step"
    );
}

fn token_logprob(tok: &Tokenizer, id: u32, logprob: f32) -> TokenLogprob {
    TokenLogprob {
        token_id: id,
        token: tok.decode(&[id], false).unwrap_or_default(),
        bytes: tok.token_bytes(id),
        logprob,
    }
}

fn position_logprobs(tok: &Tokenizer, s: &Sampled) -> PositionLogprobs {
    PositionLogprobs {
        chosen: token_logprob(tok, s.token, s.logprob),
        top: s.top.iter().map(|&(id, lp)| token_logprob(tok, id, lp)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn handle_and_stream_cross_threads() {
        assert_send_sync::<EngineHandle>();
        assert_send::<GenerationStream>();
    }

    #[test]
    fn stop_scan_finds_earliest_match() {
        assert_eq!(scan_stops("abc END x STOP", &stops(&["STOP", "END"])), StopScan::Matched { at: 4, stop: 1 });
    }

    #[test]
    fn stop_scan_holds_back_possible_prefix() {
        assert_eq!(scan_stops("hello EN", &stops(&["END"])), StopScan::Clear { emit: 6 });
        assert_eq!(scan_stops("hello E", &stops(&["END", "xx"])), StopScan::Clear { emit: 6 });
        assert_eq!(scan_stops("hello", &stops(&["END"])), StopScan::Clear { emit: 5 });
        // Multi-byte characters: never split one.
        assert_eq!(scan_stops("日本", &stops(&["本語"])), StopScan::Clear { emit: 3 });
        assert_eq!(scan_stops("日本", &stops(&["x本"])), StopScan::Clear { emit: 6 });
    }
}
