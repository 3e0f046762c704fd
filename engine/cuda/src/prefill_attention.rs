//! Prefill attention on bf16 tensor cores over the paged KV cache (`kernels/prefill_attention.cuh`).
//!
//! [`Gpu::paged_attention`] gives every query token its own block and re-reads the whole
//! context per query: right for decode, wasteful for a prompt. Here one CTA takes a tile of
//! [`BLOCK_M`] query rows of one sequence and one KV head — a row is a (query token, query head)
//! pair of that KV head's group, so every K/V tile gathered from the block table serves all
//! heads of the group — and walks the context 64 keys at a time with S = Q·Kᵀ and O += P·V on
//! `mma.sync` and an online softmax in f32 (flash-attention 2).
//!
//! The host plans the tiles ([`plan_tiles`]) from the step's sequences and uploads them with the
//! rest of the step metadata. The kernel reads nothing else per sequence: each row's causal
//! limit is its own `query_pos`, so any mix of fresh prompts, chunks with a cached prefix and
//! decode rows is one launch with no host synchronisation.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::device::{DType, Gpu, TensorRef};
use crate::error::CudaError;
use crate::launch::{check, i32_of};
pub use crate::module::prefill::{BLOCK_M, HEAD_DIMS, MAX_GROUP};
use crate::module::prefill::{THREADS, smem_bytes};

/// One sequence's queries in a step, as [`plan_tiles`] sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileSeq {
    /// Row of the block table.
    pub seq: usize,
    /// Index of the sequence's first query in the batch.
    pub q_start: usize,
    /// Its queries this step.
    pub q_len: usize,
    /// Position of its first query (tokens cached before this step).
    pub context_before: usize,
}

/// One CTA's work: query rows `row0 .. row0 + BLOCK_M` (capped at `q_len * group`) of a
/// sequence, where row r is token `q_start + r / group`, query head `kv_head * group + r % group`.
/// Uploaded as the kernel's `int4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillTile {
    pub seq: i32,
    pub q_start: i32,
    pub q_len: i32,
    pub row0: i32,
}

impl PrefillTile {
    /// The 16 bytes the kernel reads.
    pub fn to_ne_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, v) in [self.seq, self.q_start, self.q_len, self.row0].into_iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// The tiles covering every (query, head) row of `seqs` once, for `group` query heads per KV
/// head, longest first (a tile's cost grows with the keys its last row sees, and the GPU
/// starts CTAs in grid order, so the long ones should not be left for the tail).
/// Counts and positions must fit in i32 (the runner's limits are far below).
pub fn plan_tiles(seqs: &[TileSeq], group: usize) -> Vec<PrefillTile> {
    let mut tiles: Vec<(usize, PrefillTile)> = Vec::new();
    for s in seqs {
        let rows = s.q_len * group;
        for row0 in (0..rows).step_by(BLOCK_M) {
            let last_token = ((row0 + BLOCK_M).min(rows) - 1) / group;
            let keys = s.context_before + last_token + 1;
            let tile =
                PrefillTile { seq: s.seq as i32, q_start: s.q_start as i32, q_len: s.q_len as i32, row0: row0 as i32 };
            tiles.push((keys, tile));
        }
    }
    tiles.sort_by_key(|(keys, _)| std::cmp::Reverse(*keys));
    tiles.into_iter().map(|(_, t)| t).collect()
}

/// Most tiles [`plan_tiles`] returns for `t` queries in `n_seqs` sequences at any group up to
/// [`MAX_GROUP`]: a sequence of n queries needs ceil(n·group / BLOCK_M) < n·group / BLOCK_M + 1.
pub fn max_tiles(t: usize, n_seqs: usize) -> usize {
    (t * MAX_GROUP).div_ceil(BLOCK_M) + n_seqs
}

impl Gpu {
    /// Causal attention of a step's queries over their sequences' paged K/V on tensor cores:
    /// the result of [`Gpu::paged_attention`] up to bf16 rounding, for steps with prompt chunks.
    ///
    /// out, q: bf16 [Q, Hq, D] with D in [`HEAD_DIMS`] and Hq / Hkv in 1..=[`MAX_GROUP`];
    /// caches: bf16 [blocks, block_size, Hkv, D]; block_tables: i32 [S, max_blocks];
    /// query_pos: i32 [Q]; tiles: i32 [n_tiles, 4] from [`plan_tiles`] over sequences whose
    /// queries lie in 0..Q and whose positions 0..=query_pos are in the cache (written before
    /// this call). Each row a tile covers is written exactly once; other rows are left alone.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &self,
        out: &TensorRef,
        q: &TensorRef,
        k_cache: &TensorRef,
        v_cache: &TensorRef,
        block_tables: &TensorRef,
        query_pos: &TensorRef,
        tiles: &TensorRef,
        scale: f32,
    ) -> Result<(), CudaError> {
        if q.shape().len() != 3 || k_cache.shape().len() != 4 {
            return Err(CudaError::Shape(format!("`q` is {:?} and `k_cache` {:?}", q.shape(), k_cache.shape())));
        }
        let (nq, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let (blocks, block_size, hkv) = (k_cache.shape()[0], k_cache.shape()[1], k_cache.shape()[2]);
        check(q, "q", DType::BF16, &[nq, hq, d])?;
        check(out, "out", DType::BF16, &[nq, hq, d])?;
        check(k_cache, "k_cache", DType::BF16, &[blocks, block_size, hkv, d])?;
        check(v_cache, "v_cache", DType::BF16, &[blocks, block_size, hkv, d])?;
        check(query_pos, "query_pos", DType::I32, &[nq])?;
        let n_tiles = tiles.shape().first().copied().unwrap_or(0);
        check(tiles, "tiles", DType::I32, &[n_tiles, 4])?;
        if block_tables.dtype() != DType::I32 || block_tables.shape().len() != 2 {
            return Err(CudaError::Shape(format!(
                "`block_tables` is {:?} {:?}",
                block_tables.dtype(),
                block_tables.shape()
            )));
        }
        if hkv == 0 || hq % hkv != 0 || block_size == 0 {
            return Err(CudaError::Shape(format!("{hq} query heads over {hkv} KV heads, block size {block_size}")));
        }
        let group = hq / hkv;
        let f = self
            .kernels
            .prefill
            .function(d)
            .filter(|_| (1..=MAX_GROUP).contains(&group))
            .ok_or_else(|| {
                CudaError::Unsupported(format!(
                    "prefill attention for head_dim {d} with {group} query heads per KV head (head_dim {HEAD_DIMS:?}, 1..={MAX_GROUP} heads per KV head)"
                ))
            })?;
        if n_tiles == 0 || n_tiles > 65535 || hkv > 65535 {
            return Err(CudaError::Shape(format!("prefill attention grid of {hkv} KV heads x {n_tiles} tiles")));
        }
        let (mb, hq_i, hkv_i, bs_i) = (
            i32_of(block_tables.shape()[1], "max_blocks")?,
            i32_of(hq, "n_heads")?,
            i32_of(hkv, "n_kv_heads")?,
            i32_of(block_size, "block_size")?,
        );
        let cfg = LaunchConfig {
            grid_dim: (hkv as u32, n_tiles as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_bytes(d) as u32,
        };
        let mut builder = self.stream.launch_builder(f);
        builder
            .arg(out.arg())
            .arg(q.arg())
            .arg(k_cache.arg())
            .arg(v_cache.arg())
            .arg(block_tables.arg())
            .arg(&mb)
            .arg(query_pos.arg())
            .arg(tiles.arg())
            .arg(&hq_i)
            .arg(&hkv_i)
            .arg(&bs_i)
            .arg(&scale);
        // SAFETY: shapes and element types checked above against the kernel's contract; the
        // tiles come from plan_tiles over this step's sequences (the caller's contract), so every
        // query, head and block-table row the kernel touches exists; pointers are live buffers
        // of this context.
        unsafe { builder.launch(cfg) }.map(|_| ()).map_err(CudaError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(seq: usize, q_start: usize, q_len: usize, context_before: usize) -> TileSeq {
        TileSeq { seq, q_start, q_len, context_before }
    }

    /// Every (token, head) row of every sequence, as (seq, token in batch, head in group).
    fn covered(tiles: &[PrefillTile], group: usize) -> Vec<(i32, i32, usize)> {
        let mut rows = Vec::new();
        for t in tiles {
            let total = t.q_len as usize * group;
            assert!((t.row0 as usize) < total, "empty tile {t:?}");
            assert_eq!(t.row0 as usize % BLOCK_M, 0);
            for r in t.row0 as usize..(t.row0 as usize + BLOCK_M).min(total) {
                rows.push((t.seq, t.q_start + (r / group) as i32, r % group));
            }
        }
        rows.sort();
        rows
    }

    #[test]
    fn tiles_cover_every_row_once() {
        for group in [1, 3, 4, 6, 8, 16] {
            let seqs = [seq(0, 0, 1, 40), seq(1, 1, 100, 0), seq(2, 101, 17, 1500), seq(3, 118, 64, 0)];
            let tiles = plan_tiles(&seqs, group);
            let mut want = Vec::new();
            for s in &seqs {
                for tok in 0..s.q_len {
                    for h in 0..group {
                        want.push((s.seq as i32, (s.q_start + tok) as i32, h));
                    }
                }
            }
            want.sort();
            assert_eq!(covered(&tiles, group), want, "group {group}");
            let t: usize = seqs.iter().map(|s| s.q_len).sum();
            assert!(tiles.len() <= max_tiles(t, seqs.len()), "group {group}: {} tiles", tiles.len());
        }
    }

    #[test]
    fn tile_count_and_order() {
        // 512 tokens x 4 heads = 2048 rows = 32 tiles; the last rows (most keys) first.
        let tiles = plan_tiles(&[seq(0, 0, 512, 0)], 4);
        assert_eq!(tiles.len(), 32);
        assert_eq!(tiles[0].row0, 31 * 64);
        assert_eq!(tiles[31].row0, 0);
        // A decode row with a long context outranks a short fresh prompt.
        let tiles = plan_tiles(&[seq(0, 0, 70, 0), seq(1, 70, 1, 5000)], 1);
        assert_eq!(tiles.len(), 3);
        assert_eq!(tiles[0].seq, 1);
        assert_eq!(tiles[0].to_ne_bytes()[4..8], 70i32.to_ne_bytes(), "second word is the first query of the sequence");
    }

    #[test]
    fn max_tiles_bounds_the_worst_case() {
        // Every sequence one token at the largest group: one tile each.
        let seqs: Vec<TileSeq> = (0..300).map(|i| seq(i, i, 1, 0)).collect();
        assert!(plan_tiles(&seqs, MAX_GROUP).len() <= max_tiles(300, 300));
        // One long prompt at the largest group.
        assert!(plan_tiles(&[seq(0, 0, 8191, 0)], MAX_GROUP).len() <= max_tiles(8191, 1));
        assert!(plan_tiles(&[], 4).is_empty());
    }
}
