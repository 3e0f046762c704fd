//! The engine thread and its handle.
//!
//! [`EngineHandle`] is a cheap `Clone` handle to one model. One `std::thread` per model (the
//! actor) owns the runner, the [`Scheduler`] and its block manager, the samplers and the
//! detokenizers; handles talk to it over a channel and read live counters from shared atomics.
//! Each request's events come back on its own [`GenerationStream`]; dropping the stream
//! cancels the request and frees its KV blocks before the next step.
//!
//! Steps are pipelined one deep: while the runner computes step N+1 (`Launched::InFlight`),
//! the thread detokenizes step N's tokens, scans them for stop strings and sends their events.
//! What needs only token ids (sampler state, forks, ends by id or length) runs before N+1 is
//! scheduled; a choice a stop string ends keeps its blocks until N+1 is collected. See
//! `run_loop::Engine::iteration` and `docs/architecture.md`.
//!
//! A panic inside the engine thread is caught: in-flight requests get
//! [`GenerationEvent::Error`], the handle is marked dead (new submissions are refused with
//! [`EngineError::ShuttingDown`]) and the process goes on.
//!
//! Files by job: `load` (options, backend choice, [`EngineHandle::load`]), this file (the
//! handle: start, submit, stats, shutdown), `stream` ([`GenerationStream`]), `run_loop` (the
//! engine thread and its step pipeline) and `stop` (the stop-string scan).

mod load;
mod run_loop;
mod stop;
mod stream;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llmd_models::ModelError;
use llmd_models::runner::ModelRunner;
use llmd_tokenizer::Tokenizer;
use tokio::sync::mpsc as tokio_mpsc;

pub use load::{LoadOptions, LoadProgress, ModelFacts, backend_dtype, serving_dtype};
pub use stream::GenerationStream;

use crate::error::EngineError;
use crate::kv::BlockManager;
use crate::request::{GenerationEvent, RequestLimits, ValidGenerateRequest};
use crate::scheduler::{Scheduler, SchedulerConfig};
use run_loop::Engine;

/// Static facts about a loaded model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub served_name: String,
    pub source: String,
    /// HF `architectures[0]`, e.g. "Qwen2ForCausalLM".
    pub architecture: String,
    pub num_params: u64,
    /// The dtype the backend computes and keeps its KV cache in (what `llmctl ps` shows).
    pub dtype: llmd_options::Dtype,
    /// The backend it runs on.
    pub backend: llmd_options::Backend,
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

enum Command {
    Submit { key: u64, req: Box<ValidGenerateRequest>, tx: tokio_mpsc::UnboundedSender<GenerationEvent>, at: Instant },
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
    /// What requests are validated against: `max_model_len`, and ids below both the model's
    /// and the tokenizer's vocabularies.
    limits: RequestLimits,
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
            dtype: facts.dtype,
            backend: facts.backend,
            max_model_len,
            vocab_size: facts.vocab_size,
            weight_bytes: facts.weight_bytes,
            kv_cache_bytes: (layout.bytes_per_block() * layout.num_blocks) as u64,
            kv_block_size: layout.block_size as u32,
            kv_blocks_total: layout.num_blocks as u32,
            loaded_at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        };
        let shared = Arc::new(Shared {
            limits: RequestLimits { max_model_len, vocab_size: facts.vocab_size.min(tokenizer.vocab_size()) },
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
        let sample_width = facts.vocab_size.min(shared.tokenizer.vocab_size());
        let engine = Engine::new(runner, sched, tokenizer, eos, sample_width, Arc::clone(&shared));
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

    /// What requests to this model are validated against ([`GenerateRequest::validate`]).
    ///
    /// [`GenerateRequest::validate`]: crate::GenerateRequest::validate
    pub fn limits(&self) -> RequestLimits {
        self.shared.limits
    }

    /// Queues a request validated against [`EngineHandle::limits`] (or tighter ones). Errors:
    /// engine shutting down or dead, a request validated against looser limits, full queue.
    pub fn submit(&self, req: ValidGenerateRequest) -> Result<GenerationStream, EngineError> {
        let name = &self.shared.info.served_name;
        if !self.shared.accepting.load(Ordering::Acquire) || !self.is_alive() {
            return Err(EngineError::ShuttingDown(name.clone()));
        }
        let limits = self.shared.limits;
        if !req.limits().within(limits) {
            return Err(EngineError::LooserLimits { model: name.clone(), validated: req.limits(), limits });
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
        if self.tx.send(Command::Submit { key, req: Box::new(req), tx: etx, at: Instant::now() }).is_err() {
            counters.unstarted.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::ShuttingDown(name.clone()));
        }
        Ok(GenerationStream::new(erx, key, self.tx.clone()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    #[test]
    fn handle_and_stream_cross_threads() {
        assert_send_sync::<EngineHandle>();
        assert_send::<GenerationStream>();
    }
}
