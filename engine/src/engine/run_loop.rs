//! The engine thread: the loop over commands and steps, the step pipeline (launch, collect,
//! phase 1 on token ids, phase 2 on text) and the end of requests (finish, fail, abort).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use llmd_models::ModelError;
use llmd_models::runner::{Launched, ModelRunner, RowOutput, RowRequest};
use llmd_tokenizer::{IncrementalDecoder, Tokenizer};
use tokio::sync::mpsc as tokio_mpsc;

use super::stop::{StopScan, scan_stops};
use super::{Command, Shared};
use crate::request::{
    FinishReason, GenerateRequest, GenerationEvent, PositionLogprobs, SamplingParams, StopMatch, TokenLogprob, Usage,
    ValidGenerateRequest,
};
use crate::sampler::{Sampled, SeqSampler};
use crate::scheduler::{Scheduler, SchedulerOutput, SeqId};

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

/// The state the engine thread owns: the runner, the scheduler, and the requests in flight.
pub(super) struct Engine {
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

impl Engine {
    pub(super) fn new(
        runner: Box<dyn ModelRunner>,
        sched: Scheduler,
        tokenizer: Arc<Tokenizer>,
        eos: Vec<u32>,
        sample_width: usize,
        shared: Arc<Shared>,
    ) -> Self {
        Engine {
            runner,
            sched,
            tokenizer,
            eos,
            sample_width,
            requests: HashMap::new(),
            shared,
            shutdown_deadline: None,
            in_flight: None,
            texts: Vec::new(),
        }
    }

    /// The thread's body: iterations until shutdown, a dropped handle or a panic.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Command>) {
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
            Command::Submit { key, req, tx, at } => self.add_request(key, *req, tx, at),
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
        req: ValidGenerateRequest,
        tx: tokio_mpsc::UnboundedSender<GenerationEvent>,
        at: Instant,
    ) {
        let fail = |shared: &Shared, tx: &tokio_mpsc::UnboundedSender<GenerationEvent>, msg: String| {
            shared.counters.unstarted.fetch_sub(1, Ordering::AcqRel);
            let _ = tx.send(GenerationEvent::Error(msg));
        };
        let req: GenerateRequest = req.into_inner();
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
