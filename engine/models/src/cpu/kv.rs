//! Paged KV storage in host memory and the per-step plan that maps tokens to cache slots.

use crate::ModelError;
use crate::runner::{ForwardBatch, KvCacheLayout};

/// K and V of every layer in fixed-size blocks: per layer one f32 buffer of
/// `[num_blocks, block_size, num_kv_heads, head_dim]` for K and one for V. A "slot" is
/// `block * block_size + offset`; slot `s` of a layer starts at `s * num_kv_heads * head_dim`.
#[derive(Debug)]
pub struct PagedKvCache {
    layout: KvCacheLayout,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl PagedKvCache {
    /// Allocates the cache; a failed allocation is an error, not an abort.
    pub fn new(layout: KvCacheLayout) -> Result<Self, ModelError> {
        let per_layer = layout
            .num_blocks
            .checked_mul(layout.block_size)
            .and_then(|x| x.checked_mul(layout.num_kv_heads))
            .and_then(|x| x.checked_mul(layout.head_dim))
            .ok_or_else(|| {
                ModelError::InsufficientMemory(format!("KV cache of {} blocks overflows", layout.num_blocks))
            })?;
        let alloc = || -> Result<Vec<f32>, ModelError> {
            let mut b = Vec::new();
            b.try_reserve_exact(per_layer).map_err(|_| {
                ModelError::InsufficientMemory(format!(
                    "cannot allocate {} bytes for one layer of the KV cache ({} blocks)",
                    per_layer * 4,
                    layout.num_blocks
                ))
            })?;
            b.resize(per_layer, 0.0);
            Ok(b)
        };
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(PagedKvCache { layout, k, v })
    }

    /// The layout this cache was allocated with.
    pub fn layout(&self) -> KvCacheLayout {
        self.layout
    }

    fn slot_width(&self) -> usize {
        self.layout.num_kv_heads * self.layout.head_dim
    }

    /// Writes K and V (`[tokens, num_kv_heads * head_dim]`) of the batch's new tokens into
    /// their slots of `layer`.
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32], plan: &BatchPlan) {
        let w = self.slot_width();
        for (t, &slot) in plan.token_slot.iter().enumerate() {
            self.k[layer][slot * w..(slot + 1) * w].copy_from_slice(&k[t * w..(t + 1) * w]);
            self.v[layer][slot * w..(slot + 1) * w].copy_from_slice(&v[t * w..(t + 1) * w]);
        }
    }

    /// K of `layer` as one flat buffer (see the type doc for the layout).
    pub fn k(&self, layer: usize) -> &[f32] {
        &self.k[layer]
    }

    /// V of `layer` as one flat buffer.
    pub fn v(&self, layer: usize) -> &[f32] {
        &self.v[layer]
    }

    /// Copies block `src` into block `dst` in every layer.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), ModelError> {
        let n = self.layout.num_blocks;
        for (what, id) in [("src", src), ("dst", dst)] {
            if id as usize >= n {
                return Err(ModelError::InvalidBatch(format!("copy_block: {what} block {id} >= num_blocks {n}")));
            }
        }
        if src == dst {
            return Ok(());
        }
        let bw = self.layout.block_size * self.slot_width();
        let (s, d) = (src as usize * bw, dst as usize * bw);
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.copy_within(s..s + bw, d);
        }
        Ok(())
    }
}

/// A [`ForwardBatch`] checked against the cache layout and the vocabulary, with the slot of
/// every new token and the cache slots of every sequence's context precomputed.
#[derive(Debug)]
pub struct BatchPlan {
    /// Cache slot each new token's K/V goes to.
    pub token_slot: Vec<usize>,
    /// Sequence index of each new token.
    pub token_seq: Vec<usize>,
    /// Per sequence: cache slots of positions `0 .. context_before + len`.
    pub seq_slots: Vec<Vec<usize>>,
    /// Per token: how many positions it attends to (its position + 1: causal within the chunk
    /// and over the whole cached prefix).
    pub token_ctx: Vec<usize>,
    logit_rows: Vec<usize>,
}

impl BatchPlan {
    /// Validates `batch` and builds the plan. Every violation is an `InvalidBatch` naming the
    /// sequence, the field and the limit.
    pub fn new(batch: &ForwardBatch, layout: &KvCacheLayout, vocab_size: usize) -> Result<Self, ModelError> {
        let bad = |m: String| Err(ModelError::InvalidBatch(m));
        let n = batch.tokens.len();
        if batch.positions.len() != n {
            return bad(format!("`positions` has {} entries but `tokens` has {n}", batch.positions.len()));
        }
        if let Some((i, t)) = batch.tokens.iter().enumerate().find(|(_, t)| **t as usize >= vocab_size) {
            return bad(format!("`tokens[{i}]` = {t} is outside the vocabulary (vocab_size {vocab_size})"));
        }
        let bs = layout.block_size;
        let mut plan = BatchPlan {
            token_slot: Vec::with_capacity(n),
            token_seq: Vec::with_capacity(n),
            seq_slots: Vec::with_capacity(batch.seqs.len()),
            token_ctx: Vec::with_capacity(n),
            logit_rows: Vec::new(),
        };
        let mut offset = 0usize;
        for (si, s) in batch.seqs.iter().enumerate() {
            if s.start != offset {
                return bad(format!("seqs[{si}].start = {} but the previous sequences end at {offset}", s.start));
            }
            if s.len == 0 {
                return bad(format!("seqs[{si}].len is 0"));
            }
            let end = s.start.checked_add(s.len).filter(|e| *e <= n);
            let Some(end) = end else {
                return bad(format!("seqs[{si}] covers tokens {}..{} but the batch has {n}", s.start, s.start + s.len));
            };
            let total = s.context_before + s.len;
            let needed = total.div_ceil(bs);
            if s.block_table.len() < needed {
                return bad(format!(
                    "seqs[{si}].block_table has {} blocks but {total} positions need {needed} blocks of {bs}",
                    s.block_table.len()
                ));
            }
            if let Some(b) = s.block_table[..needed].iter().find(|b| **b as usize >= layout.num_blocks) {
                return bad(format!("seqs[{si}].block_table holds block {b} >= num_blocks {}", layout.num_blocks));
            }
            let slots: Vec<usize> = (0..total).map(|p| s.block_table[p / bs] as usize * bs + p % bs).collect();
            for i in 0..s.len {
                let p = s.context_before + i;
                if batch.positions[s.start + i] as usize != p {
                    return bad(format!(
                        "positions[{}] = {} but seqs[{si}] places that token at context_before + {i} = {p}",
                        s.start + i,
                        batch.positions[s.start + i]
                    ));
                }
                plan.token_slot.push(slots[p]);
                plan.token_seq.push(si);
                plan.token_ctx.push(p + 1);
            }
            if s.wants_logits {
                plan.logit_rows.push(end - 1);
            }
            plan.seq_slots.push(slots);
            offset = end;
        }
        if offset != n {
            return bad(format!("seqs cover {offset} tokens but the batch has {n}"));
        }
        Ok(plan)
    }

    /// Token rows whose logits the caller wants, in batch order.
    pub fn logit_rows(&self) -> &[usize] {
        &self.logit_rows
    }
}
