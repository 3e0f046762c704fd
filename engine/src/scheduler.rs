//! Continuous batching: which tokens of which sequences run in the next forward step.
//!
//! Policy (FCFS by arrival, ties by choice index):
//! 1. running sequences that decode (one token each), oldest first;
//! 2. running sequences in the middle of a prompt, the next chunk each;
//! 3. waiting sequences, front of the queue first, while `max_num_seqs` allows; a sequence
//!    that does not fit stops admission (no overtaking).
//!
//! All three share the per-step token budget `max_num_batched_tokens`, so long prompts are
//! prefilled in chunks alongside decodes. When a decode finds no free KV block, the youngest
//! running sequence not yet scheduled this step is preempted by recompute: its blocks are
//! freed (full ones stay in the prefix cache) and it goes back to the waiting queue in arrival
//! order, to be recomputed from its prompt plus the tokens it already generated. Because only
//! younger sequences are ever preempted, the oldest one always progresses: no livelock. A
//! request that could not fit even alone is refused by [`Scheduler::add`].
//!
//! The scheduler knows tokens and blocks, not text or sampling: the engine samples with the
//! logits of the sequences marked `wants_logits` and reports back with
//! [`Scheduler::append_token`], [`Scheduler::fork`] and [`Scheduler::finish`].

use std::collections::{HashMap, HashSet, VecDeque};

use llmd_models::runner::{ForwardBatch, SeqSlice};

use crate::kv::{BlockId, BlockManager, BlockTable};

/// Scheduler identity of one sequence (one choice of one request).
pub type SeqId = u64;

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once (forked choices of an admitted request may exceed it).
    pub max_num_seqs: usize,
    /// Most tokens per forward step (decodes + prefill chunks). Must be >= 1.
    pub max_num_batched_tokens: usize,
}

/// A request the scheduler refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error(
        "request needs up to {needed_tokens} tokens of KV cache but the whole cache holds {capacity_tokens} tokens"
    )]
    NeverFits { needed_tokens: usize, capacity_tokens: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Waiting,
    Running,
}

/// One sequence: its known tokens (prompt + generated), how many are in the KV cache, and
/// its blocks.
#[derive(Debug)]
pub struct Sequence {
    /// The request (group) this sequence belongs to.
    pub group: u64,
    /// Choice index within the request.
    pub choice: u32,
    tokens: Vec<u32>,
    num_prompt: usize,
    num_computed: usize,
    table: BlockTable,
    status: Status,
    /// FCFS priority: (arrival number, choice).
    order: (u64, u32),
    /// Choices still to fork off once the prompt is done (n - 1 for a request's first sequence).
    pending_forks: u32,
    /// Prompt tokens served from the prefix cache at first admission.
    cached_tokens: usize,
    admitted: bool,
}

impl Sequence {
    /// Prompt followed by generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    /// Prompt length.
    pub fn num_prompt(&self) -> usize {
        self.num_prompt
    }
    /// Generated tokens.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.num_prompt..]
    }
    /// Tokens whose K/V are in the cache.
    pub fn num_computed(&self) -> usize {
        self.num_computed
    }
    /// Prompt tokens served from the prefix cache when the request was first admitted.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }
    /// Choices still to fork off once the prompt's logits are available.
    pub fn pending_forks(&self) -> u32 {
        self.pending_forks
    }
    /// The blocks this sequence holds.
    pub fn block_table(&self) -> &BlockTable {
        &self.table
    }
}

/// One sequence's share of a step, in batch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub seq: SeqId,
    pub num_tokens: usize,
    /// The step computes this sequence's last known token: its logits row follows.
    pub wants_logits: bool,
}

/// What to run next.
#[derive(Debug, Default)]
pub struct SchedulerOutput {
    pub batch: ForwardBatch,
    /// Same order as `batch.seqs`.
    pub scheduled: Vec<ScheduledSeq>,
    /// Copy-on-write block copies `(src, dst)` the runner must do before the step.
    pub copies: Vec<(BlockId, BlockId)>,
    /// Sequences preempted (blocks freed, back to waiting) while scheduling.
    pub preempted: Vec<SeqId>,
    /// Sequences scheduled for the first time ever (end of their queue time).
    pub first_scheduled: Vec<SeqId>,
}

impl SchedulerOutput {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }
}

/// The scheduler and the block manager it drives.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    /// Sorted by `order`.
    waiting: VecDeque<SeqId>,
    /// Sorted by `order`.
    running: Vec<SeqId>,
    next_seq: SeqId,
    next_arrival: u64,
    preemptions: u64,
    prefix_queries: u64,
    prefix_hits: u64,
}

impl Scheduler {
    /// A scheduler over the given block manager.
    pub fn new(cfg: SchedulerConfig, kv: BlockManager) -> Self {
        Scheduler {
            cfg: SchedulerConfig { max_num_batched_tokens: cfg.max_num_batched_tokens.max(1), ..cfg },
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_seq: 0,
            next_arrival: 0,
            preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    /// Queues a request: one sequence now, forked into `n` after its prompt is computed.
    /// Refuses a request whose prompt plus `max_tokens` could not fit into the whole cache.
    pub fn add(&mut self, group: u64, prompt: Vec<u32>, n: u32, max_tokens: usize) -> Result<SeqId, SchedulerError> {
        if prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt);
        }
        let needed_tokens = prompt.len() + max_tokens;
        let capacity_tokens = self.kv.num_blocks() * self.kv.block_size();
        if needed_tokens > capacity_tokens {
            return Err(SchedulerError::NeverFits { needed_tokens, capacity_tokens });
        }
        let id = self.next_seq;
        self.next_seq += 1;
        let order = (self.next_arrival, 0);
        self.next_arrival += 1;
        let num_prompt = prompt.len();
        self.seqs.insert(
            id,
            Sequence {
                group,
                choice: 0,
                tokens: prompt,
                num_prompt,
                num_computed: 0,
                table: BlockTable::default(),
                status: Status::Waiting,
                order,
                pending_forks: n.saturating_sub(1),
                cached_tokens: 0,
                admitted: false,
            },
        );
        self.insert_waiting(id);
        Ok(id)
    }

    fn insert_waiting(&mut self, id: SeqId) {
        let order = self.seqs[&id].order;
        let pos = self.waiting.partition_point(|s| self.seqs[s].order < order);
        self.waiting.insert(pos, id);
    }

    fn insert_running(&mut self, id: SeqId) {
        let order = self.seqs[&id].order;
        let pos = self.running.partition_point(|s| self.seqs[s].order < order);
        self.running.insert(pos, id);
    }

    /// The sequence, if it still exists.
    pub fn seq(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Sequences running (admitted, holding blocks).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting (new or preempted).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether any sequence exists.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// The block manager (for stats).
    pub fn kv(&self) -> &BlockManager {
        &self.kv
    }

    /// Preemptions since creation.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// (prompt tokens looked up in the prefix cache, tokens found) at admissions.
    pub fn prefix_cache_counters(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    fn preempt(&mut self, id: SeqId, out: &mut SchedulerOutput) {
        self.running.retain(|&s| s != id);
        let seq = self.seqs.get_mut(&id).expect("running seq exists");
        self.kv.free(&mut seq.table);
        seq.num_computed = 0;
        seq.status = Status::Waiting;
        self.preemptions += 1;
        out.preempted.push(id);
        self.insert_waiting(id);
        tracing::debug!(seq = id, "preempted (recompute)");
    }

    /// Plans the next step. Empty output when nothing can run.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut chosen: Vec<(SeqId, usize)> = Vec::new();
        let mut scheduled: HashSet<SeqId> = HashSet::new();

        // 1. Decodes, oldest first. Every sequence after `i` is unscheduled, so a victim is
        //    always younger than (or is) the one asking.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            if seq.tokens.len() - seq.num_computed != 1 {
                i += 1;
                continue;
            }
            loop {
                let seq = self.seqs.get_mut(&id).expect("running seq exists");
                let total = seq.num_computed + 1;
                if self.kv.ensure_slots(&mut seq.table, total, seq.num_computed, &mut out.copies).is_ok() {
                    chosen.push((id, 1));
                    scheduled.insert(id);
                    budget -= 1;
                    i += 1;
                    break;
                }
                let victim = *self.running.iter().rev().find(|s| !scheduled.contains(s)).expect("self is unscheduled");
                self.preempt(victim, &mut out);
                if victim == id {
                    break; // `i` now points at the next sequence
                }
            }
        }

        // 2. Running prompts (chunked prefill), oldest first. A chunk shrinks to the blocks
        //    available; when none is, younger unscheduled sequences are preempted.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let remaining = seq.tokens.len() - seq.num_computed;
            if remaining <= 1 || scheduled.contains(&id) {
                i += 1;
                continue;
            }
            let want = remaining.min(budget);
            loop {
                let seq = &self.seqs[&id];
                let fit = want.min(self.kv.writable_tokens(&seq.table, seq.num_computed));
                if fit > 0 {
                    let seq = self.seqs.get_mut(&id).expect("running seq exists");
                    let total = seq.num_computed + fit;
                    self.kv
                        .ensure_slots(&mut seq.table, total, seq.num_computed, &mut out.copies)
                        .expect("writable_tokens counted the blocks");
                    chosen.push((id, fit));
                    scheduled.insert(id);
                    budget -= fit;
                    break;
                }
                let order = seq.order;
                let victim = self
                    .running
                    .iter()
                    .rev()
                    .copied()
                    .find(|s| !scheduled.contains(s) && *s != id && self.seqs[s].order > order);
                match victim {
                    Some(v) => self.preempt(v, &mut out),
                    None => break, // older sequences hold the blocks: wait for them
                }
            }
            i += 1;
        }

        // 3. Admit waiting sequences in order; stop at the first that does not fit.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let seq = self.seqs.get_mut(&id).expect("waiting seq exists");
            debug_assert!(seq.table.is_empty());
            let cached = self.kv.allocate_cached_prefix(&mut seq.table, &seq.tokens);
            let remaining = seq.tokens.len() - cached;
            let fit = remaining.min(budget).min(self.kv.writable_tokens(&seq.table, cached));
            if fit == 0 {
                self.kv.free(&mut seq.table);
                break;
            }
            self.kv
                .ensure_slots(&mut seq.table, cached + fit, cached, &mut out.copies)
                .expect("writable_tokens counted the blocks");
            seq.num_computed = cached;
            seq.status = Status::Running;
            if self.kv.prefix_caching() {
                self.prefix_queries += seq.tokens.len() as u64;
                self.prefix_hits += cached as u64;
            }
            if !seq.admitted {
                seq.admitted = true;
                seq.cached_tokens = cached;
                out.first_scheduled.push(id);
            }
            self.waiting.pop_front();
            self.insert_running(id);
            chosen.push((id, fit));
            budget -= fit;
        }

        self.build_batch(chosen, &mut out);
        out
    }

    fn build_batch(&self, chosen: Vec<(SeqId, usize)>, out: &mut SchedulerOutput) {
        for (id, len) in chosen {
            let seq = &self.seqs[&id];
            let start = out.batch.tokens.len();
            let from = seq.num_computed;
            out.batch.tokens.extend_from_slice(&seq.tokens[from..from + len]);
            out.batch.positions.extend((from..from + len).map(|p| p as u32));
            let wants_logits = from + len == seq.tokens.len();
            out.batch.seqs.push(SeqSlice {
                start,
                len,
                context_before: from,
                block_table: seq.table.blocks().to_vec(),
                wants_logits,
            });
            out.scheduled.push(ScheduledSeq { seq: id, num_tokens: len, wants_logits });
        }
    }

    /// Records that the step of `out` ran: its tokens are now in the cache, and full blocks
    /// enter the prefix cache.
    pub fn complete_step(&mut self, out: &SchedulerOutput) {
        for s in &out.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.seq) {
                seq.num_computed += s.num_tokens;
                self.kv.commit_full_blocks(&mut seq.table, &seq.tokens, seq.num_computed);
            }
        }
    }

    /// Appends a sampled token; the sequence decodes it next step.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Forks the request's pending choices off `id` (which must have its prompt computed):
    /// each child shares all of `id`'s blocks. Returns the children, by choice index.
    pub fn fork(&mut self, id: SeqId) -> Vec<SeqId> {
        let Some(parent) = self.seqs.get_mut(&id) else { return Vec::new() };
        let count = std::mem::take(&mut parent.pending_forks);
        let mut children = Vec::with_capacity(count as usize);
        for c in 1..=count {
            let parent = &self.seqs[&id];
            let table = self.kv.fork(&parent.table);
            let child = Sequence {
                group: parent.group,
                choice: c,
                tokens: parent.tokens.clone(),
                num_prompt: parent.num_prompt,
                num_computed: parent.num_computed,
                table,
                status: parent.status,
                order: (parent.order.0, c),
                pending_forks: 0,
                cached_tokens: parent.cached_tokens,
                admitted: true,
            };
            let status = child.status;
            let cid = self.next_seq;
            self.next_seq += 1;
            self.seqs.insert(cid, child);
            match status {
                Status::Running => self.insert_running(cid),
                Status::Waiting => self.insert_waiting(cid),
            }
            children.push(cid);
        }
        children
    }

    /// Removes a finished sequence and frees its blocks.
    pub fn finish(&mut self, id: SeqId) {
        if let Some(mut seq) = self.seqs.remove(&id) {
            self.kv.free(&mut seq.table);
            match seq.status {
                Status::Running => self.running.retain(|&s| s != id),
                Status::Waiting => self.waiting.retain(|&s| s != id),
            }
        }
    }

    /// Removes every sequence of `group` at once, freeing their blocks. Returns their ids.
    pub fn abort_group(&mut self, group: u64) -> Vec<SeqId> {
        let ids: Vec<SeqId> = self.seqs.iter().filter(|(_, s)| s.group == group).map(|(&id, _)| id).collect();
        for &id in &ids {
            self.finish(id);
        }
        ids
    }

    /// Removes every sequence, freeing all blocks. Returns the groups that had sequences.
    pub fn abort_all(&mut self) -> Vec<u64> {
        let mut groups: Vec<u64> = self.seqs.values().map(|s| s.group).collect();
        groups.sort_unstable();
        groups.dedup();
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.finish(id);
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, bs: usize, max_seqs: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig { max_num_seqs: max_seqs, max_num_batched_tokens: budget },
            BlockManager::new(blocks, bs, true),
        )
    }

    fn prompt(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// Runs a step and feeds back a fixed token for every sequence that got logits.
    fn step(s: &mut Scheduler, token: u32) -> SchedulerOutput {
        let out = s.schedule();
        s.complete_step(&out);
        for sc in &out.scheduled {
            if sc.wants_logits {
                s.fork(sc.seq);
                s.append_token(sc.seq, token);
            }
        }
        out
    }

    fn check_batch(out: &SchedulerOutput, bs: usize) {
        let b = &out.batch;
        assert_eq!(b.tokens.len(), b.positions.len());
        for s in &b.seqs {
            assert!(s.block_table.len() * bs >= s.context_before + s.len);
            for k in 0..s.len {
                assert_eq!(b.positions[s.start + k] as usize, s.context_before + k);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add { len: usize, n: u32, max_tokens: usize, base: u32 },
        Step,
        Abort { group: u64 },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            (1usize..14, 1u32..4, 1usize..6, 0u32..3).prop_map(|(len, n, max_tokens, base)| Op::Add {
                len,
                n,
                max_tokens,
                base
            }),
            Just(Op::Step),
            Just(Op::Step),
            Just(Op::Step),
            (0u64..10).prop_map(|group| Op::Abort { group }),
        ]
    }

    proptest::proptest! {
        /// Random traffic on a tiny pool: no panic, budget and pool respected, and once the
        /// traffic stops every request finishes (no deadlock) and every block comes back.
        #[test]
        fn random_traffic_always_drains(ops in proptest::collection::vec(op(), 1..80), bs in 1usize..4, budget in 3usize..12) {
            let blocks = 20 / bs + 1;
            let mut s = sched(blocks, bs, 3, budget);
            let mut generated: HashMap<SeqId, usize> = HashMap::new();
            let mut limits: HashMap<u64, usize> = HashMap::new();
            let mut group = 0u64;
            let run_step = |s: &mut Scheduler, generated: &mut HashMap<SeqId, usize>, limits: &HashMap<u64, usize>| {
                let out = s.schedule();
                check_batch(&out, bs);
                assert!(out.batch.num_tokens() <= budget);
                s.complete_step(&out);
                for sc in out.scheduled.iter().filter(|x| x.wants_logits) {
                    let mut ids = vec![sc.seq];
                    ids.extend(s.fork(sc.seq));
                    for id in ids {
                        let limit = limits[&s.seq(id).unwrap().group];
                        let g = generated.entry(id).or_default();
                        *g += 1;
                        if *g >= limit { s.finish(id) } else { s.append_token(id, 1) }
                    }
                }
                out.is_empty()
            };
            for op in ops {
                match op {
                    Op::Add { len, n, max_tokens, base } => {
                        if s.add(group, prompt(len, base), n, max_tokens).is_ok() {
                            limits.insert(group, max_tokens);
                        }
                        group += 1;
                    }
                    Op::Step => { run_step(&mut s, &mut generated, &limits); }
                    Op::Abort { group } => { s.abort_group(group); }
                }
                assert!(s.kv().num_used_blocks() <= blocks);
            }
            let mut idle = 0;
            for _ in 0..2000 {
                if !s.has_work() { break; }
                if run_step(&mut s, &mut generated, &limits) { idle += 1; } else { idle = 0; }
                proptest::prop_assert!(idle < 2, "scheduler stalled with work left");
            }
            proptest::prop_assert!(!s.has_work(), "requests left after 2000 steps");
            proptest::prop_assert_eq!(s.kv().num_used_blocks(), 0);
        }
    }

    #[test]
    fn budget_respected_and_prompt_chunked() {
        let mut s = sched(64, 4, 8, 10);
        s.add(1, prompt(25, 0), 1, 4).unwrap();
        let mut lens = Vec::new();
        for _ in 0..3 {
            let out = step(&mut s, 9);
            check_batch(&out, 4);
            assert!(out.batch.num_tokens() <= 10);
            lens.push(out.scheduled[0].num_tokens);
            assert_eq!(out.scheduled[0].wants_logits, lens.iter().sum::<usize>() == 25);
        }
        assert_eq!(lens, vec![10, 10, 5]);
        // Now a decode.
        let out = step(&mut s, 9);
        assert_eq!(out.batch.tokens, vec![9]);
        assert_eq!(out.batch.positions, vec![25]);
    }

    #[test]
    fn decodes_first_then_prefill_chunks_in_remaining_budget() {
        let mut s = sched(64, 4, 8, 8);
        s.add(1, prompt(3, 0), 1, 4).unwrap();
        s.add(2, prompt(3, 10), 1, 4).unwrap();
        let out = step(&mut s, 7); // both prompts (3 + 3)
        assert_eq!(out.batch.num_tokens(), 6);
        s.add(3, prompt(20, 100), 1, 4).unwrap();
        let out = step(&mut s, 7);
        check_batch(&out, 4);
        assert_eq!(out.scheduled.iter().map(|x| x.num_tokens).collect::<Vec<_>>(), vec![1, 1, 6]);
        assert!(!out.scheduled[2].wants_logits);
    }

    #[test]
    fn max_num_seqs_limits_admission() {
        let mut s = sched(64, 4, 2, 100);
        for g in 0..3 {
            s.add(g, prompt(3, 0), 1, 4).unwrap();
        }
        let out = step(&mut s, 1);
        assert_eq!(out.scheduled.len(), 2);
        assert_eq!(s.num_waiting(), 1);
    }

    #[test]
    fn preemption_under_tiny_pool_and_everyone_finishes() {
        // 6 blocks of 2 tokens; three requests of 4 prompt tokens + 4 generated = 4 blocks each.
        let mut s = sched(6, 2, 8, 64);
        let ids: Vec<SeqId> = (0..3).map(|g| s.add(g, prompt(4, 10 * g as u32), 1, 4).unwrap()).collect();
        let mut generated: HashMap<SeqId, usize> = HashMap::new();
        let mut preempted = 0;
        for _ in 0..200 {
            let out = s.schedule();
            check_batch(&out, 2);
            preempted += out.preempted.len();
            assert!(s.kv().num_used_blocks() <= 6);
            s.complete_step(&out);
            for sc in &out.scheduled {
                if sc.wants_logits {
                    let n = generated.entry(sc.seq).or_default();
                    *n += 1;
                    if *n == 4 {
                        s.finish(sc.seq);
                    } else {
                        s.append_token(sc.seq, 1);
                    }
                }
            }
            if !s.has_work() {
                break;
            }
        }
        assert!(!s.has_work(), "all requests finish");
        assert!(preempted > 0, "the pool is too small to run all three at once");
        assert_eq!(s.preemptions() as usize, preempted);
        for id in ids {
            assert_eq!(generated[&id], 4);
        }
        assert_eq!(s.kv().num_used_blocks(), 0);
    }

    #[test]
    fn preempted_sequence_recomputes_its_generated_tokens() {
        let mut s = sched(4, 2, 8, 64);
        let a = s.add(0, prompt(3, 0), 1, 4).unwrap();
        let b = s.add(1, prompt(3, 50), 1, 4).unwrap();
        step(&mut s, 5); // both prefilled: 2 blocks each, pool full
        step(&mut s, 6); // decode position 3 fits in block 1 of each
        // Position 4 needs a new block for each: b (younger) is preempted.
        let out = s.schedule();
        assert_eq!(out.preempted, vec![b]);
        assert_eq!(out.scheduled.len(), 1);
        assert_eq!(out.scheduled[0].seq, a);
        s.complete_step(&out);
        s.finish(a);
        let out = s.schedule();
        // b recomputes prompt + its 2 generated tokens, minus the full blocks still cached.
        let sc = &out.scheduled[0];
        assert_eq!(sc.seq, b);
        assert!(sc.wants_logits);
        assert_eq!(out.batch.seqs[0].context_before + sc.num_tokens, 5);
        assert_eq!(s.seq(b).unwrap().tokens(), &[50, 51, 52, 5, 6]);
    }

    #[test]
    fn request_that_can_never_fit_is_refused() {
        let mut s = sched(4, 2, 8, 64);
        assert_eq!(
            s.add(0, prompt(5, 0), 1, 4),
            Err(SchedulerError::NeverFits { needed_tokens: 9, capacity_tokens: 8 })
        );
        assert_eq!(s.add(0, Vec::new(), 1, 4), Err(SchedulerError::EmptyPrompt));
        assert!(s.add(0, prompt(4, 0), 1, 4).is_ok());
    }

    #[test]
    fn out_of_blocks_waits_instead_of_failing() {
        let mut s = sched(4, 2, 8, 64);
        s.add(0, prompt(7, 0), 1, 1).unwrap();
        s.add(1, prompt(3, 0), 1, 1).unwrap();
        let out = step(&mut s, 1);
        assert_eq!(out.scheduled.len(), 1, "second request does not fit yet");
        assert_eq!(s.num_waiting(), 1);
        let first = out.scheduled[0].seq;
        s.finish(first);
        let out = step(&mut s, 1);
        assert_eq!(out.scheduled.len(), 1);
        assert_ne!(out.scheduled[0].seq, first);
    }

    #[test]
    fn cancellation_frees_blocks_at_once() {
        let mut s = sched(16, 2, 8, 64);
        s.add(7, prompt(9, 0), 3, 4).unwrap();
        s.add(8, prompt(3, 0), 1, 4).unwrap();
        step(&mut s, 1); // prefill + forks
        assert!(s.kv().num_used_blocks() > 0);
        assert_eq!(s.abort_group(7).len(), 3);
        s.abort_group(8);
        assert_eq!(s.kv().num_used_blocks(), 0);
        assert!(!s.has_work());
        assert!(s.schedule().is_empty());
    }

    #[test]
    fn prefix_cache_hit_reduces_computed_tokens() {
        let mut s = sched(32, 4, 8, 64);
        let p = prompt(13, 0);
        let a = s.add(0, p.clone(), 1, 2).unwrap();
        let out = step(&mut s, 1);
        assert_eq!(out.batch.num_tokens(), 13);
        s.finish(a);
        let b = s.add(1, p, 1, 2).unwrap();
        let out = step(&mut s, 1);
        assert_eq!(out.batch.num_tokens(), 1, "12 of 13 tokens come from the cache");
        assert_eq!(out.batch.seqs[0].context_before, 12);
        assert_eq!(s.seq(b).unwrap().cached_tokens(), 12);
        assert_eq!(s.prefix_cache_counters(), (26, 12));
    }

    #[test]
    fn n_choices_share_prompt_blocks_and_copy_on_write() {
        let mut s = sched(32, 4, 8, 64);
        let p = s.add(0, prompt(6, 0), 3, 4).unwrap();
        let out = s.schedule();
        s.complete_step(&out);
        let kids = s.fork(p);
        assert_eq!(kids.len(), 2);
        assert_eq!(s.kv().num_used_blocks(), 2, "children share both prompt blocks");
        for (k, id) in [p, kids[0], kids[1]].into_iter().enumerate() {
            s.append_token(id, 100 + k as u32);
        }
        let out = s.schedule();
        check_batch(&out, 4);
        assert_eq!(out.scheduled.len(), 3);
        // The shared partial block is copied for all but the last writer.
        assert_eq!(out.copies.len(), 2);
        assert_eq!(s.kv().num_used_blocks(), 4);
        let tables: Vec<&[u32]> = out.batch.seqs.iter().map(|x| x.block_table.as_slice()).collect();
        assert!(tables.iter().all(|t| t[0] == tables[0][0]), "full prompt block still shared");
        assert_eq!(s.seq(kids[1]).unwrap().choice, 2);
    }
}
