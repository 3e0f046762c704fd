//! The seam between the serving core (scheduler, KV block manager, sampler) and a backend.
//!
//! The scheduler decides which tokens run this step and which KV blocks they use; a
//! [`ModelRunner`] owns the weights and the KV storage on its device and computes logits.
//! Models hold no KV state: everything about sequences arrives in the [`ForwardBatch`].
//! The CPU backend implements this with candle tensors and paged attention in Rust; the CUDA
//! backend implements the same trait with its own kernels.

use crate::pick::TokenPick;

/// Shape of the paged KV cache a runner allocates: `num_blocks` blocks per layer of
/// `block_size` token slots, each slot holding K and V of `num_kv_heads * head_dim` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// Bytes per element of the cache storage (4 on the CPU, 2 for bf16 on the GPU).
    pub dtype_bytes: usize,
}

impl KvCacheLayout {
    /// Bytes one block takes across all layers, K and V.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes
    }

    /// How many blocks fit into `budget_bytes`.
    pub fn blocks_for_budget(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        dtype_bytes: usize,
        budget_bytes: u64,
    ) -> usize {
        let per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes;
        (budget_bytes / per_block.max(1) as u64) as usize
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Offset of this sequence's first new token in [`ForwardBatch::tokens`].
    pub start: usize,
    /// Number of new tokens this step (prompt chunk length, or 1 for decode).
    pub len: usize,
    /// Tokens already in the KV cache before this step (cached prefix + earlier chunks).
    /// The new tokens sit at positions `context_before .. context_before + len`.
    pub context_before: usize,
    /// Physical block ids holding positions `0 .. context_before + len`, in order;
    /// position `p` lives in block `block_table[p / block_size]`, slot `p % block_size`.
    pub block_table: Vec<u32>,
    /// Whether the caller wants logits for this sequence's last new token (false for a
    /// prompt chunk that is not the last one).
    pub wants_logits: bool,
}

/// Everything a backend needs for one forward step over a mixed batch of prefill chunks and
/// decodes. Tokens of all sequences are concatenated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    pub tokens: Vec<u32>,
    /// Absolute position of each token in `tokens`.
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSlice>,
}

impl ForwardBatch {
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// Logits for the sequences with `wants_logits`, in batch order: `rows[i]` is a `vocab_size`
/// row for the i-th such sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepLogits {
    pub vocab_size: usize,
    pub rows: Vec<Vec<f32>>,
}

/// What the serving core wants for one row of a step (a sequence with `wants_logits`).
#[derive(Debug, Clone, PartialEq)]
pub enum RowRequest {
    /// The full logits row (the host needs logprobs, or samples several choices from it).
    Logits,
    /// Only the token [`TokenPick`] chooses; a backend that can follow the rule on its device
    /// copies one id back instead of a vocabulary-wide row.
    Pick(TokenPick),
}

/// One row of a step's output, for a sequence that wanted logits.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutput {
    /// The full logits row.
    Logits(Vec<f32>),
    /// The token a [`RowRequest::Pick`] chose.
    Token(u32),
}

impl RowOutput {
    /// The logits of a step in which no row was picked (what [`ModelRunner::forward`] returns
    /// when a backend implements it through [`ModelRunner::forward_sample`]).
    pub fn into_logits(rows: Vec<RowOutput>) -> Result<Vec<Vec<f32>>, crate::ModelError> {
        rows.into_iter()
            .map(|r| match r {
                RowOutput::Logits(l) => Ok(l),
                RowOutput::Token(_) => Err(crate::ModelError::Backend("token row without a pick request".into())),
            })
            .collect()
    }
}

/// What [`ModelRunner::launch`] did with a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Launched {
    /// The step ran to the end: its rows, as [`ModelRunner::forward_sample`] returns them.
    Ready(Vec<RowOutput>),
    /// The step runs on the device; [`ModelRunner::collect`] waits for it and returns its rows.
    InFlight,
}

/// A loaded model on one device together with its KV storage.
///
/// Pipelining: [`ModelRunner::launch`] may return before the device finished a step
/// ([`Launched::InFlight`]), so that the serving core does its host work for the previous
/// step meanwhile. At most one step is in flight; after `InFlight` the caller must call
/// [`ModelRunner::collect`] before any other call on the runner (no second `launch`, no
/// `copy_block`, no `forward`). The serving core also keeps every KV block of the in-flight
/// step's sequences allocated until the step is collected.
pub trait ModelRunner: Send {
    /// The KV cache this runner allocated; the block manager hands out ids below `num_blocks`.
    fn kv_layout(&self) -> KvCacheLayout;
    /// Runs one step: writes K/V of the new tokens into their slots and returns logits.
    fn forward(&mut self, batch: &ForwardBatch) -> Result<StepLogits, crate::ModelError>;
    /// Like [`ModelRunner::forward`], with what the caller wants of each logits row
    /// (`requests[i]` for the i-th row). The default computes full rows and follows each
    /// [`TokenPick`] on the host; a GPU backend picks on the device.
    fn forward_sample(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<Vec<RowOutput>, crate::ModelError> {
        let rows = self.forward(batch)?.rows;
        Ok(rows
            .into_iter()
            .enumerate()
            .map(|(i, row)| match requests.get(i) {
                Some(RowRequest::Pick(p)) => RowOutput::Token(p.pick_host(&row)),
                _ => RowOutput::Logits(row),
            })
            .collect())
    }

    /// Starts the step of [`ModelRunner::forward_sample`]; a backend that can return before the
    /// device is done answers [`Launched::InFlight`] and hands the rows out in
    /// [`ModelRunner::collect`]. The default runs the step at once (synchronous backends).
    fn launch(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Launched, crate::ModelError> {
        Ok(Launched::Ready(self.forward_sample(batch, requests)?))
    }

    /// Waits for the step [`ModelRunner::launch`] left in flight and returns its rows (one per
    /// row request, as `forward_sample`). An error when no step is in flight.
    fn collect(&mut self) -> Result<Vec<RowOutput>, crate::ModelError> {
        Err(crate::ModelError::Backend("collect called with no step in flight".into()))
    }

    /// Copies the contents of block `src` into block `dst` in every layer (copy-on-write
    /// when a shared, partly filled block is about to be appended to).
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), crate::ModelError>;
    /// "cpu" or "cuda:0", for `llmctl ps`.
    fn device_name(&self) -> String;
}
