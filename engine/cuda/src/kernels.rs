//! Safe wrappers around the kernels in `kernels/llmd.cu` and the cuBLAS GEMM.
//!
//! Each wrapper checks the shapes and element types it documents before launching, so a bad
//! call is an error instead of an out-of-bounds access. Pointers come from views
//! ([`TensorRef`]) of live [`DeviceTensor`](crate::device::DeviceTensor)s of the caller.

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::PushKernelArg;

use llmd_models::pick::{LogitAdjust, TokenPick};

use crate::device::{DType, Gpu, TensorRef};
use crate::error::CudaError;
use crate::launch::{cfg, check, i32_of, launch};
pub use crate::module::GEMV_MAX_T;

/// Shortest context piece one block of paged attention takes when it splits (flash-decoding).
pub const ATTENTION_SPLIT_LEN: usize = 64;

/// Shortest piece when even [`ATTENTION_SPLIT_LEN`] leaves fewer than
/// [`ATTENTION_BUSY_BLOCKS`] blocks: one pass of the block's 4 warps × 4 positions. Small batches
/// with few KV heads per GPU need it (70B at TP=4 has 2: batch 1 ran 16 busy blocks per layer at
/// 64, profiled 34 → 24 µs per layer at 16 on 4× H200); at batch 64 the finer split cost 6% (more merge
/// work), so it is only taken when the GPU would otherwise sit mostly idle.
pub const ATTENTION_MIN_SPLIT_LEN: usize = 16;

/// Blocks (queries × KV heads × splits) below which paged attention splits finer.
const ATTENTION_BUSY_BLOCKS: usize = 512;

/// Blocks paged attention aims for when choosing its number of splits. Splits past a query's
/// context exit at once, so the plan (made for the longest context a graph may see) can be
/// generous: measured on an H100 at context 512, batch 64 ran 4.74 ms of attention per step
/// with 2,048 (one active split per query head) against 3.5 ms with 16 splits of 256.
const ATTENTION_TARGET_BLOCKS: usize = 8192;

/// (tokens, in_features, out_features) of y[T, N] = x[T, K] · w[N, K]ᵀ after checking the types.
fn linear_shape(y: &TensorRef, x: &TensorRef, w: &TensorRef) -> Result<(usize, usize, usize), CudaError> {
    let (t, k, n) = (x.shape()[0], x.shape()[1], w.shape()[0]);
    check(x, "x", DType::BF16, &[t, k])?;
    check(w, "w", DType::BF16, &[n, k])?;
    if y.shape() != [t, n] || !matches!(y.dtype(), DType::BF16 | DType::F32) {
        return Err(CudaError::Shape(format!("`y` is {:?} {:?}, expected bf16/f32 [{t}, {n}]", y.dtype(), y.shape())));
    }
    Ok((t, k, n))
}

impl Gpu {
    /// out[T, H] = table[ids[T] - lo, :] for ids in [lo, lo + rows), zeros for other ids
    /// (vocabulary-parallel shard; lo = 0 and rows = vocab on one GPU).
    /// table: bf16 [rows, H]; ids: u32 [T] (checked < vocab by the caller).
    pub fn embedding_shard(
        &self,
        out: &TensorRef,
        table: &TensorRef,
        ids: &TensorRef,
        lo: usize,
    ) -> Result<(), CudaError> {
        let (t, rows, h) = (ids.shape()[0], table.shape()[0], table.shape()[1]);
        check(out, "out", DType::BF16, &[t, h])?;
        check(ids, "ids", DType::U32, &[t])?;
        let hidden = i32_of(h, "hidden")?;
        let (lo, rows) = (u32::try_from(lo).map_err(|_| CudaError::Shape("vocab offset".into()))?, rows as u32);
        launch!(
            self,
            &self.kernels.embedding,
            cfg((t as u32, 1, 1), 256),
            out.arg(),
            table.arg(),
            ids.arg(),
            &hidden,
            &lo,
            &rows
        )
    }

    /// residual += x (when given); out = rmsnorm(residual) * weight. All bf16 [T, H]; weight [H].
    pub fn add_rmsnorm(
        &self,
        out: &TensorRef,
        residual: &TensorRef,
        x: Option<&TensorRef>,
        weight: &TensorRef,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (t, h) = (residual.shape()[0], residual.shape()[1]);
        check(out, "out", DType::BF16, &[t, h])?;
        check(residual, "residual", DType::BF16, &[t, h])?;
        if let Some(x) = x {
            check(x, "x", DType::BF16, &[t, h])?;
        }
        check(weight, "weight", DType::BF16, &[h])?;
        let x_ptr = x.map_or(0u64, |x| x.addr());
        let hidden = i32_of(h, "hidden")?;
        let threads = if h >= 4096 {
            1024
        } else if h >= 1024 {
            512
        } else {
            128
        };
        launch!(
            self,
            &self.kernels.add_rmsnorm,
            cfg((t as u32, 1, 1), threads),
            out.arg(),
            residual.arg(),
            &x_ptr,
            weight.arg(),
            &hidden,
            &eps
        )
    }

    /// Bias (optional), per-head RMSNorm of q and k (optional), rotary embedding, and the
    /// KV-cache write of one layer.
    /// qkv: bf16 [T, (Hq + 2 Hkv) D]; q_out: bf16 [T, Hq, D]; caches: bf16 [blocks, block_size, Hkv, D];
    /// cos_sin: f32 [max_pos, D]; positions: i32 [T]; slots: i64 [T].
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope_cache(
        &self,
        qkv: &TensorRef,
        bias: Option<&TensorRef>,
        q_norm: Option<&TensorRef>,
        k_norm: Option<&TensorRef>,
        eps: f32,
        cos_sin: &TensorRef,
        positions: &TensorRef,
        slots: &TensorRef,
        q_out: &TensorRef,
        k_cache: &TensorRef,
        v_cache: &TensorRef,
    ) -> Result<(), CudaError> {
        let (t, hq, d) = (q_out.shape()[0], q_out.shape()[1], q_out.shape()[2]);
        let hkv = k_cache.shape()[2];
        if d % 2 != 0 || d > 256 {
            return Err(CudaError::Unsupported(format!("head_dim {d} (must be even and <= 256)")));
        }
        let width = (hq + 2 * hkv) * d;
        check(qkv, "qkv", DType::BF16, &[t, width])?;
        if let Some(b) = bias {
            check(b, "bias", DType::BF16, &[width])?;
        }
        for (n, w) in [("q_norm", q_norm), ("k_norm", k_norm)] {
            if let Some(w) = w {
                check(w, n, DType::BF16, &[d])?;
            }
        }
        check(cos_sin, "cos_sin", DType::F32, &[cos_sin.shape()[0], d])?;
        check(positions, "positions", DType::I32, &[t])?;
        check(slots, "slots", DType::I64, &[t])?;
        check(v_cache, "v_cache", DType::BF16, k_cache.shape())?;
        let (bias_p, qn, kn) =
            (bias.map_or(0u64, |b| b.addr()), q_norm.map_or(0u64, |w| w.addr()), k_norm.map_or(0u64, |w| w.addr()));
        let (hq_i, hkv_i, d_i) = (i32_of(hq, "n_heads")?, i32_of(hkv, "n_kv_heads")?, i32_of(d, "head_dim")?);
        let warps = (hq + 2 * hkv).min(8) as u32;
        launch!(
            self,
            &self.kernels.qkv_rope_cache,
            cfg((t as u32, 1, 1), 32 * warps),
            qkv.arg(),
            &bias_p,
            &qn,
            &kn,
            &eps,
            cos_sin.arg(),
            positions.arg(),
            slots.arg(),
            q_out.arg(),
            k_cache.arg(),
            v_cache.arg(),
            &hq_i,
            &hkv_i,
            &d_i
        )
    }

    /// Paged attention of `n_queries` query tokens over their sequences' cached K/V, causal
    /// (query i sees positions 0..=query_pos[i]), split along the context, then merged.
    /// q/out: bf16 [Q, Hq, D]; caches: bf16 [blocks, block_size, Hkv, D]; block_tables: i32 [S, max_blocks];
    /// query_seq, query_pos: i32 [Q]; part_acc: f32 [>= Q*Hq*splits*D]; part_ml: f32 [>= Q*Hq*splits*2].
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        out: &TensorRef,
        q: &TensorRef,
        k_cache: &TensorRef,
        v_cache: &TensorRef,
        block_tables: &TensorRef,
        query_seq: &TensorRef,
        query_pos: &TensorRef,
        max_context: usize,
        part_acc: &TensorRef,
        part_ml: &TensorRef,
        scale: f32,
    ) -> Result<(), CudaError> {
        let (nq, hq, d) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let (block_size, hkv) = (k_cache.shape()[1], k_cache.shape()[2]);
        check(out, "out", DType::BF16, &[nq, hq, d])?;
        check(k_cache, "k_cache", DType::BF16, &[k_cache.shape()[0], block_size, hkv, d])?;
        check(v_cache, "v_cache", DType::BF16, k_cache.shape())?;
        check(query_seq, "query_seq", DType::I32, &[nq])?;
        check(query_pos, "query_pos", DType::I32, &[nq])?;
        if block_tables.dtype() != DType::I32 || block_tables.shape().len() != 2 {
            return Err(CudaError::Shape(format!(
                "`block_tables` is {:?} {:?}",
                block_tables.dtype(),
                block_tables.shape()
            )));
        }
        let group = hq / hkv;
        let f = self.kernels.attention_for(d, group).ok_or_else(|| {
            CudaError::Unsupported(format!("paged attention for head_dim {d} with {group} query heads per KV head"))
        })?;
        // Split long contexts (flash-decoding) as far as the workspace allows.
        let capacity = (part_acc.numel() / (nq * hq * d)).min(part_ml.numel() / (nq * hq * 2));
        if capacity == 0 {
            return Err(CudaError::Shape(format!("attention workspace too small for {nq} queries")));
        }
        // Enough splits to fill the GPU (a few thousand blocks), no shorter than
        // ATTENTION_SPLIT_LEN: small batches split long contexts finely, large batches already
        // have a block per (query, KV head) and keep whole contexts together.
        let wanted = ATTENTION_TARGET_BLOCKS.div_ceil(nq * hkv);
        let mut splits = wanted.min(max_context.div_ceil(ATTENTION_SPLIT_LEN));
        if nq * hkv * splits < ATTENTION_BUSY_BLOCKS {
            splits = wanted.min(max_context.div_ceil(ATTENTION_MIN_SPLIT_LEN));
        }
        let splits = splits.clamp(1, capacity);
        let split_len = max_context.div_ceil(splits).max(1);
        let (mb, hq_i, hkv_i, bs_i, split_i, splits_i, d_i) = (
            i32_of(block_tables.shape()[1], "max_blocks")?,
            i32_of(hq, "n_heads")?,
            i32_of(hkv, "n_kv_heads")?,
            i32_of(block_size, "block_size")?,
            i32_of(split_len, "split_len")?,
            i32_of(splits, "splits")?,
            i32_of(d, "head_dim")?,
        );
        launch!(
            self,
            f,
            cfg((nq as u32, hkv as u32, splits as u32), 128),
            q.arg(),
            k_cache.arg(),
            v_cache.arg(),
            block_tables.arg(),
            &mb,
            query_seq.arg(),
            query_pos.arg(),
            part_acc.arg(),
            part_ml.arg(),
            &hq_i,
            &hkv_i,
            &bs_i,
            &split_i,
            &scale
        )?;
        launch!(
            self,
            &self.kernels.attention_merge,
            cfg((nq as u32, hq as u32, 1), d.min(256) as u32),
            out.arg(),
            part_acc.arg(),
            part_ml.arg(),
            query_pos.arg(),
            &hq_i,
            &splits_i,
            &split_i,
            &d_i
        )
    }

    /// out[T, I] = silu(gate_up[T, :I]) * gate_up[T, I:]. bf16.
    pub fn silu_mul(&self, out: &TensorRef, gate_up: &TensorRef) -> Result<(), CudaError> {
        let (t, i) = (out.shape()[0], out.shape()[1]);
        check(out, "out", DType::BF16, &[t, i])?;
        check(gate_up, "gate_up", DType::BF16, &[t, 2 * i])?;
        let inter = i32_of(i, "intermediate")?;
        launch!(
            self,
            &self.kernels.silu_mul,
            cfg((i.div_ceil(256) as u32, t as u32, 1), 256),
            out.arg(),
            gate_up.arg(),
            &inter
        )
    }

    /// y[T, N] += bias[N] on every row. bf16.
    pub fn add_bias(&self, y: &TensorRef, bias: &TensorRef) -> Result<(), CudaError> {
        let (t, n) = (y.shape()[0], y.shape()[1]);
        check(y, "y", DType::BF16, &[t, n])?;
        check(bias, "bias", DType::BF16, &[n])?;
        let width = i32_of(n, "bias width")?;
        launch!(
            self,
            &self.kernels.add_bias,
            cfg((n.div_ceil(256) as u32, t as u32, 1), 256),
            y.arg(),
            bias.arg(),
            &width
        )
    }

    /// out[R, W] = x[rows[R], :]. bf16; rows: i32 [R].
    pub fn gather_rows(&self, out: &TensorRef, x: &TensorRef, rows: &TensorRef) -> Result<(), CudaError> {
        let (r, w) = (rows.shape()[0], x.shape()[1]);
        check(out, "out", DType::BF16, &[r, w])?;
        check(rows, "rows", DType::I32, &[r])?;
        let width = i32_of(w, "width")?;
        launch!(self, &self.kernels.gather_rows, cfg((r as u32, 1, 1), 256), out.arg(), x.arg(), rows.arg(), &width)
    }

    /// out[r] = the token [`llmd_models::pick`]'s rule picks from row r of the logits, for the
    /// first `out.len()` rows. logits f32 [shards * rows, V/shards]: each row's vocabulary in
    /// `shards` slices laid out [shard, rows, V/shards] (one shard: plain [rows, V]);
    /// adjustments are applied in place. `params` holds one `PickParams` per picked row, then
    /// the adjustments they index, as packed by [`pack_picks`]. Rows with width 0 get u32::MAX.
    pub fn pick_tokens(
        &self,
        out: &TensorRef,
        logits: &TensorRef,
        rows: usize,
        shards: usize,
        params: &TensorRef,
    ) -> Result<(), CudaError> {
        let stride = logits.shape()[1];
        let picked = out.numel();
        check(logits, "logits", DType::F32, &[shards * rows, stride])?;
        check(out, "out", DType::U32, &[picked])?;
        if picked > rows || params.numel() * params.dtype().size() < picked * PICK_PARAMS_BYTES {
            return Err(CudaError::Shape(format!(
                "picking {picked} of {rows} rows with {} bytes of parameters",
                params.numel() * params.dtype().size()
            )));
        }
        let adjust = params.addr() + (picked * PICK_PARAMS_BYTES) as u64;
        let (stride, shards, rows_i) = (i32_of(stride, "vocab")?, i32_of(shards, "shards")?, i32_of(rows, "rows")?);
        launch!(
            self,
            &self.kernels.pick,
            cfg((picked as u32, 1, 1), 1024),
            out.arg(),
            logits.arg(),
            &stride,
            &shards,
            &rows_i,
            params.arg(),
            &adjust
        )
    }

    /// Converts a device f32 or f16 tensor into bf16 `out` of the same element count.
    pub fn to_bf16(&self, out: &TensorRef, x: &TensorRef, x_is_f16: bool) -> Result<(), CudaError> {
        if out.numel() != x.numel() || out.dtype() != DType::BF16 {
            return Err(CudaError::Shape(format!("to_bf16 of {:?} into {:?}", x.shape(), out.shape())));
        }
        let n = x.numel();
        let f = if x_is_f16 { &self.kernels.f16_to_bf16 } else { &self.kernels.f32_to_bf16 };
        launch!(self, f, cfg((n.div_ceil(256).min(65535) as u32, 1, 1), 256), out.arg(), x.arg(), &n)
    }

    /// y[T, N] = x[T, K] · w[N, K]ᵀ with bf16 inputs and f32 accumulation; y is bf16 or f32.
    /// (Row-major; computed by cuBLAS as the column-major product wᵀ·x.)
    pub fn linear(&self, y: &TensorRef, x: &TensorRef, w: &TensorRef) -> Result<(), CudaError> {
        let (t, k, n) = linear_shape(y, x, w)?;
        if t <= GEMV_MAX_T && k % 8 == 0 {
            // Decode-sized batches: a bandwidth-bound kernel streams w at close to peak, where
            // cuBLAS's skinny-GEMM kernels reach ~65% of it (bench/results/2026-11-21-h100-cuda-runner.md).
            // Warps per output row: split long rows while the GPU still holds every warp at once
            // (64 resident per SM) and each keeps at least 4 passes of 512 bytes per row.
            let slots = self.sm_count * 64;
            let split_index = [2usize, 1].into_iter().find(|&i| n << i <= slots && (k / 256) >> i >= 4).unwrap_or(0);
            let split = 1usize << split_index;
            let (bf, fp) = &self.kernels.gemv[t - 1][split_index];
            let f = if y.dtype() == DType::F32 { fp } else { bf };
            let rows_per_warp = if t <= 3 { 1 } else { 2 };
            let blocks = n.div_ceil(8 / split * rows_per_warp) as u32;
            let (n_i, k_i) = (i32_of(n, "out_features")?, i32_of(k, "in_features")?);
            return launch!(self, f, cfg((blocks, 1, 1), 256), y.arg(), x.arg(), w.arg(), &n_i, &k_i);
        }
        self.linear_cublas(y, x, w)
    }

    /// [`Gpu::linear`] through cuBLAS whatever the batch (the GEMV comparison of the bench).
    pub fn linear_cublas(&self, y: &TensorRef, x: &TensorRef, w: &TensorRef) -> Result<(), CudaError> {
        let (t, k, n) = linear_shape(y, x, w)?;
        let y_type = if y.dtype() == DType::F32 {
            blas_sys::cudaDataType::CUDA_R_32F
        } else {
            blas_sys::cudaDataType::CUDA_R_16BF
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: shapes checked above; the handle is bound to this GPU's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                i32_of(n, "out_features")?,
                i32_of(t, "tokens")?,
                i32_of(k, "in_features")?,
                &alpha as *const f32 as *const _,
                w.addr() as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                x.addr() as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const _,
                y.addr() as *mut _,
                y_type,
                n as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }
}

/// Bytes of one row's `PickParams` (kernels/pick.cuh): width u32, temperature f32, top_k u32,
/// top_p f32, min_p f32, adjust_start u32, adjust_count u32, padding u32, uniform f64.
pub const PICK_PARAMS_BYTES: usize = 40;

// `LogitAdjust` is `#[repr(C)]` {u32, f32, f32}, the layout of `PickAdjust` in kernels/pick.cuh.
const _: () = assert!(std::mem::size_of::<LogitAdjust>() == 12);

/// Packs one `PickParams` per row (`None`: width 0, the row is not picked) followed by every
/// row's adjustments, as `pick_tokens` reads them. Widths are capped at `vocab`.
pub fn pack_picks(picks: &[Option<&TokenPick>], vocab: usize) -> Result<Vec<u8>, CudaError> {
    let n_adjust: usize = picks.iter().flatten().map(|p| p.adjust.len()).sum();
    let too_many = || CudaError::Shape(format!("{n_adjust} logit adjustments in one step"));
    let mut buf = Vec::with_capacity(picks.len() * PICK_PARAMS_BYTES + n_adjust * 12);
    let vocab = u32::try_from(vocab).unwrap_or(u32::MAX);
    let mut start = 0u32;
    for pick in picks {
        let greedy_none = TokenPick { width: 0, ..TokenPick::greedy(0) };
        let p = pick.unwrap_or(&greedy_none);
        let count = u32::try_from(p.adjust.len()).map_err(|_| too_many())?;
        buf.extend_from_slice(&p.width.min(vocab).to_ne_bytes());
        buf.extend_from_slice(&p.temperature.to_ne_bytes());
        buf.extend_from_slice(&p.top_k.to_ne_bytes());
        buf.extend_from_slice(&p.top_p.to_ne_bytes());
        buf.extend_from_slice(&p.min_p.to_ne_bytes());
        buf.extend_from_slice(&start.to_ne_bytes());
        buf.extend_from_slice(&count.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&p.uniform.to_ne_bytes());
        start = start.checked_add(count).ok_or_else(too_many)?;
    }
    for a in picks.iter().flatten().flat_map(|p| &p.adjust) {
        buf.extend_from_slice(&a.token.to_ne_bytes());
        buf.extend_from_slice(&a.divide_positive.to_ne_bytes());
        buf.extend_from_slice(&a.subtract.to_ne_bytes());
    }
    Ok(buf)
}
