//! Routed experts on the GPU (kernels in `kernels/moe.cuh`): Qwen3-MoE today, DeepSeek's
//! routing rules and shared experts ready for it.
//!
//! A sparse layer runs as: router GEMM (the existing [`Gpu::linear`], f32 logits) → routing
//! (softmax or sigmoid scores, optional correction bias and group limit, top-k, renormalised
//! and scaled weights: the architecture's rule, [`MoeRouting`]; shared-expert slices appended
//! as extra slots) → `moe_align`, which groups the (token, slot) pairs by expert into m-blocks
//! of a fixed row count → a grouped tensor-core GEMM over every expert's m-blocks at once for
//! gate/up, SiLU·up fused in its epilogue → the same for down, the routing weight fused in its
//! epilogue → each token's slots summed in slot order. An expert's weights are thus read once
//! per m-block: once per step in decode, and once per `block_m` tokens routed to it in a prefill
//! (the old per-(token, slot) GEMVs re-read them per token). Only the experts some token chose
//! are read. Grids are fixed by the token count (m-blocks past the device-side count exit at
//! once) and nothing synchronises with the host, so decode steps stay capturable as CUDA graphs;
//! no float atomics, and a value's k order does not depend on the tile, so results do not
//! depend on the batch.
//!
//! Tensor parallelism splits the experts: rank `r` of `tp` holds experts
//! `[r·E/tp, (r+1)·E/tp)` (router replicated; the last rank also the shared-expert slices),
//! pairs routed elsewhere contribute zero, and the all-reduce after the MLP sums the ranks'
//! partial outputs as for a dense MLP.

use std::ops::Range;

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use llmd_models::config::MoeConfig;
use llmd_models::spec::{
    DecoderSpec, ExpertWeights, GroupLimit, GroupRank, MlpSpec, RoutedMoeSpec, Routing, Scoring, WeightSpec,
};

use crate::device::{DType, DeviceTensor, Gpu, TensorRef};
use crate::error::CudaError;
use crate::launch::{cfg, check, i32_of, launch, u32_of};
use crate::module::moe_gemm::{M16_NARROW, M16_WIDE, M32, M64, M128, TILES, Tile};
use crate::shard::Shard;

/// Most routed experts the top-k kernel takes (`MOE_MAX_EXPERTS` in `kernels/moe.cuh`).
pub const MAX_EXPERTS: usize = 1024;

/// The experts rank `shard` holds, after checking that the model's MoE can run on the GPU
/// split that way: E/tp routed experts each, and the last rank also the `shared` shared-expert
/// slices (global ids E .. E + shared, see [`shared_slices`]).
pub(crate) fn local_experts(
    moe: &MoeConfig,
    hidden: usize,
    shard: Shard,
    shared: usize,
) -> Result<Range<usize>, CudaError> {
    let (e, tp) = (moe.num_experts, shard.world);
    if !e.is_multiple_of(tp) {
        return Err(CudaError::Unsupported(format!(
            "num_experts {e} is not divisible by tensor-parallel size {tp} (experts are split evenly across GPUs)"
        )));
    }
    if e > MAX_EXPERTS {
        return Err(CudaError::Unsupported(format!("num_experts {e} (at most {MAX_EXPERTS})")));
    }
    let i = moe.moe_intermediate_size;
    if !hidden.is_multiple_of(8) || !i.is_multiple_of(8) {
        return Err(CudaError::Unsupported(format!(
            "hidden_size {hidden} and moe_intermediate_size {i} must be multiples of 8"
        )));
    }
    let per = e / tp;
    let extra = if shard.rank + 1 == tp { shared } else { 0 };
    Ok(shard.rank * per..(shard.rank + 1) * per + extra)
}

/// How many expert-sized slices the shared experts of `spec`'s routed blocks make: the shared
/// MLP of intermediate size n·I runs as n extra experts of size I that every token takes with
/// weight 1 (rows of its gate and up projections, columns of its down projection), so the same
/// grouped GEMMs serve it. 0 without shared experts.
pub(crate) fn shared_slices(spec: &DecoderSpec) -> Result<usize, CudaError> {
    let mut found: Option<usize> = None;
    for layer in &spec.layers {
        let MlpSpec::Routed(r) = &layer.mlp else { continue };
        let n = match &r.shared {
            None => 0,
            Some(m) => {
                let rows = m.gate_proj.weight.shape[0];
                if !rows.is_multiple_of(r.intermediate) || m.gate_proj.bias.is_some() || m.down_proj.bias.is_some() {
                    return Err(CudaError::Unsupported(format!(
                        "shared experts of intermediate size {rows} (the GPU runs them as slices of moe_intermediate_size {}, without biases)",
                        r.intermediate
                    )));
                }
                rows / r.intermediate
            }
        };
        if found.is_some_and(|f| f != n) {
            return Err(CudaError::Unsupported("shared experts that differ between layers".into()));
        }
        found = Some(n);
    }
    Ok(found.unwrap_or(0))
}

/// Rows `rows` (and columns `cols`, all when `None`) of checkpoint tensor `name` of `shape`,
/// seen as a matrix [product of all dimensions but the last, last dimension].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRows {
    pub name: String,
    pub shape: Vec<usize>,
    pub rows: Range<usize>,
    pub cols: Option<Range<usize>>,
}

/// Where the stacked expert weights of one rank come from, in stacking order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpertSources {
    /// Fills `gate_up` [E_local, 2I, H]: per expert its gate rows, then its up rows.
    pub gate_up: Vec<TensorRows>,
    /// Fills `down` [E_local, H, I].
    pub down: Vec<TensorRows>,
}

/// The checkpoint tensors of `experts` of the routed block `r`, in stacking order, from
/// whichever expert layout the spec resolved: one tensor per expert and projection (hub
/// layout), or rows of transformers 5's fused `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I];
/// ids from E on are slices of the shared experts' MLP ([`shared_slices`]).
pub(crate) fn expert_sources(r: &RoutedMoeSpec, hidden: usize, experts: Range<usize>) -> ExpertSources {
    let (i, h, e) = (r.intermediate, hidden, r.num_experts);
    let rows = |w: &WeightSpec, rows: Range<usize>| TensorRows {
        name: w.name.clone(),
        shape: w.shape.clone(),
        rows,
        cols: None,
    };
    let routed = experts.start.min(e)..experts.end.min(e);
    let mut src = match &r.experts {
        ExpertWeights::Fused { gate_up, down } if !routed.is_empty() => ExpertSources {
            gate_up: vec![rows(gate_up, routed.start * 2 * i..routed.end * 2 * i)],
            down: vec![rows(down, routed.start * h..routed.end * h)],
        },
        ExpertWeights::Fused { .. } => ExpertSources { gate_up: vec![], down: vec![] },
        ExpertWeights::PerExpert(pe) => {
            let whole = |w: &WeightSpec| rows(w, 0..w.shape[0]);
            ExpertSources {
                gate_up: routed
                    .clone()
                    .flat_map(|x| [whole(&pe[x].gate_proj.weight), whole(&pe[x].up_proj.weight)])
                    .collect(),
                down: routed.map(|x| whole(&pe[x].down_proj.weight)).collect(),
            }
        }
    };
    if let Some(m) = &r.shared {
        for s in experts.start.max(e) - e..experts.end.max(e) - e {
            src.gate_up.push(rows(&m.gate_proj.weight, s * i..(s + 1) * i));
            src.gate_up.push(rows(&m.up_proj.weight, s * i..(s + 1) * i));
            let w = &m.down_proj.weight;
            src.down.push(TensorRows { cols: Some(s * i..(s + 1) * i), ..rows(w, 0..w.shape[0]) });
        }
    }
    src
}

/// One sparse layer's weights on one rank.
pub(crate) struct MoeLayer {
    /// Router `mlp.gate.weight`, bf16 [E, H] (every rank holds all of it).
    pub router: DeviceTensor,
    /// This rank's experts, bf16 [E_local, 2I, H].
    pub gate_up: DeviceTensor,
    /// This rank's experts, bf16 [E_local, H, I].
    pub down: DeviceTensor,
    /// Global id of this rank's first expert.
    pub expert0: usize,
    pub top_k: usize,
    /// Shared-expert slices every token takes after its top-k (global ids E .. E + shared,
    /// held by the last rank).
    pub shared: usize,
    pub routing: MoeRouting,
}

/// A sparse layer's routing rule on the GPU (the spec's [`Routing`], with the correction bias
/// in device memory), checked against what the kernel takes once, by [`MoeRouting::new`].
pub(crate) struct MoeRouting {
    /// Routed experts the rule was checked for (the router's rows).
    experts: usize,
    scoring: Scoring,
    /// `e_score_correction_bias`, f32 [experts].
    bias: Option<DeviceTensor>,
    group_limit: Option<GroupLimit>,
    renormalize: bool,
    scaling: f32,
}

impl MoeRouting {
    /// `routing` of a block of `experts` experts, `bias` the values of its correction bias;
    /// refuses group limits the kernel does not take.
    pub fn new(gpu: &Gpu, routing: &Routing, experts: usize, bias: Option<&[f32]>) -> Result<MoeRouting, CudaError> {
        if let Some(g) = routing.group_limit {
            let size = experts.checked_div(g.groups).unwrap_or(0);
            let top2 = g.rank == GroupRank::TopTwoSum;
            if g.groups == 0
                || g.groups > 32
                || !experts.is_multiple_of(g.groups)
                || g.keep == 0
                || g.keep > g.groups
                || (top2 && size < 2)
            {
                return Err(CudaError::Unsupported(format!(
                    "expert groups: n_group {} over {experts} experts keeping topk_group {} (the GPU routes at most 32 equal groups{})",
                    g.groups,
                    g.keep,
                    if top2 { " of at least 2 experts" } else { "" }
                )));
            }
        }
        let bias = match (routing.correction_bias.is_some(), bias) {
            (false, _) => None,
            (true, Some(v)) if v.len() == experts => {
                let mut t = DeviceTensor::zeros(gpu, &[experts], DType::F32)?;
                t.upload(gpu, v)?;
                Some(t)
            }
            (true, v) => {
                return Err(CudaError::Shape(format!(
                    "correction bias of {} values for {experts} experts",
                    v.map_or(0, <[f32]>::len)
                )));
            }
        };
        Ok(MoeRouting {
            experts,
            scoring: routing.scoring,
            bias,
            group_limit: routing.group_limit,
            renormalize: routing.renormalize,
            scaling: routing.scaling,
        })
    }

    pub fn bytes(&self) -> usize {
        self.bias.as_ref().map_or(0, DeviceTensor::bytes)
    }
}

/// Most tokens one pass of the expert kernels takes; a longer batch runs in passes of this many,
/// which bounds the scratch (about 400 MB at Qwen3-30B-A3B's shapes) at a cost of one more read of
/// the touched experts per pass. As large as the default `max_num_batched_tokens`, because a
/// pass reads every expert (~60 GB over that model's layers): at 2,048 a mixed step of 8,192
/// tokens read them four times.
pub(crate) const MAX_PASS_TOKENS: usize = 8192;

/// The m-block size for `pairs` (token, slot) pairs routed over `experts` experts: about the
/// average share of an expert, so that most experts take one m-block (decode reads each
/// touched expert once) without computing mostly-empty tiles, and large tiles for prefill.
pub(crate) fn block_m(pairs: usize, experts: usize) -> usize {
    match pairs / experts.max(1) {
        0..6 => 16,
        6..20 => 32,
        20..80 => 64,
        _ => 128,
    }
}

/// The tile shape for a grouped GEMM over `rows` weight rows per expert at m-block size
/// `block_m`, when at most `touched` experts have tokens: for 16-row m-blocks the wide tile
/// unless it makes fewer CTAs than the GPU has SMs (a one-token step), then the narrow one
/// (measured: bench/results/2026-12-02-h200-moe/moe-bench-*.txt).
pub(crate) fn pick_tile(block_m: usize, touched: usize, rows: usize, sm_count: usize) -> Tile {
    match block_m {
        16 if touched * rows.div_ceil(M16_WIDE.block_n) < sm_count => M16_NARROW,
        16 => M16_WIDE,
        32 => M32,
        64 => M64,
        _ => M128,
    }
}

/// Most m-blocks `pairs` pairs over `n_local` experts can need at `bm` rows per block:
/// Σₑ ⌈cₑ / bm⌉ ≤ (Σₑ cₑ + touched·(bm − 1)) / bm with touched ≤ min(n_local, pairs).
pub(crate) fn max_mblocks(pairs: usize, n_local: usize, bm: usize) -> usize {
    (pairs + pairs.min(n_local) * (bm - 1)) / bm
}

impl MoeLayer {
    pub fn bytes(&self) -> usize {
        self.router.bytes() + self.gate_up.bytes() + self.down.bytes() + self.routing.bytes()
    }

    /// out[T, H] = this rank's share of the layer's expert MLP of x[T, H] (both bf16), using
    /// `buf` as scratch, in passes of at most [`MAX_PASS_TOKENS`] tokens. No host synchronisation.
    /// `mark` is called after each phase with its name (the runner's step profile).
    pub fn forward(
        &self,
        gpu: &Gpu,
        out: &TensorRef,
        x: &TensorRef,
        buf: &MoeBuffers,
        mark: &dyn Fn(&'static str) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let t = x.shape()[0];
        let mut start = 0;
        while start < t {
            let n = buf.pass_tokens.min(t - start);
            self.pass(gpu, &out.rows(start, n)?, &x.rows(start, n)?, buf, mark)?;
            start += n;
        }
        Ok(())
    }

    fn pass(
        &self,
        gpu: &Gpu,
        out: &TensorRef,
        x: &TensorRef,
        buf: &MoeBuffers,
        mark: &dyn Fn(&'static str) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        // Slots per token: the top-k routed experts, then the shared-expert slices.
        let (t, k) = (x.shape()[0], self.top_k + self.shared);
        let (experts, n_local) = (self.router.shape()[0] + self.shared, self.gate_up.shape()[0]);
        let pairs = t * k;
        if buf.slots != k {
            return Err(CudaError::Shape(format!("MoE buffers for {} slots per token, the layer has {k}", buf.slots)));
        }
        let logits = buf.logits.rows(0, t)?;
        let (ids, weights) = (buf.ids.rows(0, t)?, buf.weights.rows(0, t)?);
        gpu.linear(&logits, x, &self.router.r())?;
        mark("moe_router")?;
        gpu.moe_route(&ids, &weights, &logits, &self.routing, self.top_k)?;
        mark("moe_route")?;
        let (ids, weights) = (ids.reshape(&[pairs])?, weights.reshape(&[pairs])?);
        let bm = block_m(pairs, experts);
        let mblocks = max_mblocks(pairs, n_local, bm);
        let groups = ExpertGroups {
            sorted: buf.sorted.r().slice(0, mblocks * bm)?,
            block_expert: buf.block_expert.r().slice(0, mblocks)?,
            count: buf.n_mblocks.r(),
            block_m: bm,
        };
        gpu.moe_align(&groups, &ids, self.expert0, n_local)?;
        mark("moe_align")?;
        let (touched, h, i) = (pairs.min(n_local), x.shape()[1], self.down.shape()[2]);
        let act = buf.act.rows(0, mblocks * bm)?;
        let tile = pick_tile(bm, touched, 2 * i, gpu.sm_count);
        gpu.moe_gemm_gate_up(&act, x, &self.gate_up.r(), &groups, k, &tile)?;
        mark("moe_gate_up")?;
        let pair_out = buf.pair_out.rows(0, pairs)?;
        let tile = pick_tile(bm, touched, h, gpu.sm_count);
        gpu.moe_gemm_down(&pair_out, &act, &self.down.r(), &groups, &weights, &tile)?;
        mark("moe_down")?;
        gpu.moe_sum_slots(out, &pair_out, &ids, self.expert0, n_local)?;
        mark("moe_sum")
    }
}

/// Scratch of the sparse layers (shared by all of them), sized for one pass of
/// min(max_tokens, [`MAX_PASS_TOKENS`]) tokens.
pub(crate) struct MoeBuffers {
    pass_tokens: usize,
    /// Slots per token (top-k + shared-expert slices).
    slots: usize,
    /// Router logits, f32 [T, E].
    logits: DeviceTensor,
    /// Chosen experts, i32 [T, slots].
    ids: DeviceTensor,
    /// Their routing weights, f32 [T, slots].
    weights: DeviceTensor,
    /// Pair index per grouped row (−1: padding), i32 [rows].
    sorted: DeviceTensor,
    /// Local expert of each m-block, i32 [m-blocks].
    block_expert: DeviceTensor,
    /// M-blocks in use, i32 [1].
    n_mblocks: DeviceTensor,
    /// SiLU(gate)·up per grouped row, bf16 [rows, I].
    act: DeviceTensor,
    /// Each pair's weighted expert output, bf16 [T·k, H].
    pair_out: DeviceTensor,
}

impl MoeBuffers {
    /// For `moe`'s routed experts plus `shared` shared-expert slices per token.
    pub fn new(
        gpu: &Gpu,
        max_tokens: usize,
        hidden: usize,
        moe: &MoeConfig,
        shared: usize,
    ) -> Result<MoeBuffers, CudaError> {
        let (e, k, i) = (moe.num_experts + shared, moe.num_experts_per_tok + shared, moe.moe_intermediate_size);
        let pass_tokens = max_tokens.clamp(1, MAX_PASS_TOKENS);
        let pairs = pass_tokens * k;
        // Bounds over every m-block size a pass may pick (a rank's experts are at most all E).
        let sizes = [16, 32, 64, 128];
        let rows = sizes.iter().map(|&bm| max_mblocks(pairs, e, bm) * bm).max().unwrap_or(0);
        let blocks = sizes.iter().map(|&bm| max_mblocks(pairs, e, bm)).max().unwrap_or(0);
        Ok(MoeBuffers {
            pass_tokens,
            slots: k,
            logits: DeviceTensor::zeros(gpu, &[pass_tokens, moe.num_experts], DType::F32)?,
            ids: DeviceTensor::zeros(gpu, &[pass_tokens, k], DType::I32)?,
            weights: DeviceTensor::zeros(gpu, &[pass_tokens, k], DType::F32)?,
            sorted: DeviceTensor::zeros(gpu, &[rows.max(1)], DType::I32)?,
            block_expert: DeviceTensor::zeros(gpu, &[blocks.max(1)], DType::I32)?,
            n_mblocks: DeviceTensor::zeros(gpu, &[1], DType::I32)?,
            act: DeviceTensor::zeros(gpu, &[rows.max(1), i], DType::BF16)?,
            pair_out: DeviceTensor::zeros(gpu, &[pairs, hidden], DType::BF16)?,
        })
    }
}

/// The pairs of one pass grouped by expert ([`Gpu::moe_align`]'s output, the grouped GEMMs'
/// input): `sorted` has `block_m` rows per m-block and `block_expert` one entry per m-block,
/// both sized for the most m-blocks the pass can need; `count` holds how many are in use.
pub(crate) struct ExpertGroups {
    pub sorted: TensorRef,
    pub block_expert: TensorRef,
    pub count: TensorRef,
    pub block_m: usize,
}

impl ExpertGroups {
    fn check(&self) -> Result<usize, CudaError> {
        let blocks = self.block_expert.shape()[0];
        check(&self.block_expert, "block_expert", DType::I32, &[blocks])?;
        check(&self.sorted, "sorted", DType::I32, &[blocks * self.block_m])?;
        check(&self.count, "n_mblocks", DType::I32, &[1])?;
        Ok(blocks)
    }
}

impl Gpu {
    /// Routing of T tokens over E experts by `routing` (the rule of
    /// `llmd_models::models::routing::route`): ids[T, :top_k] (global expert ids, best first,
    /// ties to the lower id) and weights[T, :top_k], then in the remaining S slots the
    /// shared-expert slices E .. E + S with weight 1.
    /// logits: f32 [T, E] (E <= [`MAX_EXPERTS`]); ids: i32 [T, top_k + S]; weights: f32 [T, top_k + S].
    pub(crate) fn moe_route(
        &self,
        ids: &TensorRef,
        weights: &TensorRef,
        logits: &TensorRef,
        routing: &MoeRouting,
        top_k: usize,
    ) -> Result<(), CudaError> {
        let (t, e, slots) = (logits.shape()[0], logits.shape()[1], ids.shape()[1]);
        let k = top_k;
        check(logits, "logits", DType::F32, &[t, e])?;
        check(ids, "ids", DType::I32, &[t, slots])?;
        check(weights, "weights", DType::F32, &[t, slots])?;
        if e > MAX_EXPERTS || k == 0 || k > e || slots < k || e + (slots - k) > MAX_EXPERTS {
            return Err(CudaError::Shape(format!("top-{k} routing over {e} experts (at most {MAX_EXPERTS})")));
        }
        // The bias length and the group limit were checked against `routing.experts` when the
        // rule was made.
        if e != routing.experts {
            return Err(CudaError::Shape(format!("routing over {e} experts with a rule made for {}", routing.experts)));
        }
        let bias = routing.bias.as_ref().map_or(0, DeviceTensor::addr);
        let (groups, keep, top2) =
            routing.group_limit.map_or((1, 1, false), |g| (g.groups, g.keep, g.rank == GroupRank::TopTwoSum));
        let (e_i, k_i, s_i) = (i32_of(e, "experts")?, i32_of(k, "top_k")?, i32_of(slots - k, "shared slices")?);
        let (sig, g_i, keep_i, top2_i, norm) = (
            i32::from(routing.scoring == Scoring::Sigmoid),
            i32_of(groups, "n_group")?,
            i32_of(keep, "topk_group")?,
            i32::from(top2),
            i32::from(routing.renormalize),
        );
        launch!(
            self,
            &self.kernels.moe.route,
            cfg((u32_of(t, "tokens")?, 1, 1), 32),
            ids.arg(),
            weights.arg(),
            logits.arg(),
            &bias,
            &e_i,
            &k_i,
            &s_i,
            &sig,
            &g_i,
            &keep_i,
            &top2_i,
            &norm,
            &routing.scaling
        )
    }

    /// Groups the pairs whose expert ids[p] (global) lies in [expert0, expert0 + n_local) by
    /// local expert into `groups` (see [`ExpertGroups`]), whose size must be
    /// [`max_mblocks`]`(pairs, n_local, block_m)` m-blocks.
    pub(crate) fn moe_align(
        &self,
        groups: &ExpertGroups,
        ids: &TensorRef,
        expert0: usize,
        n_local: usize,
    ) -> Result<(), CudaError> {
        let blocks = groups.check()?;
        let pairs = ids.shape()[0];
        check(ids, "ids", DType::I32, &[pairs])?;
        if n_local == 0 || n_local > MAX_EXPERTS || blocks != max_mblocks(pairs, n_local, groups.block_m) {
            return Err(CudaError::Shape(format!(
                "MoE grouping of {pairs} pairs over {n_local} experts into {blocks} blocks of {}",
                groups.block_m
            )));
        }
        let (p_i, e0, el, bm) = (
            i32_of(pairs, "pairs")?,
            i32_of(expert0, "expert0")?,
            i32_of(n_local, "local experts")?,
            i32_of(groups.block_m, "block_m")?,
        );
        launch!(
            self,
            &self.kernels.moe.align,
            cfg((1, 1, 1), 1024),
            groups.sorted.arg(),
            groups.block_expert.arg(),
            groups.count.arg(),
            ids.arg(),
            &p_i,
            &e0,
            &el,
            &bm
        )
    }

    /// The grouped GEMM of `tile` (gate/up or down) and its launch over `blocks` m-blocks and
    /// `n_ctas` weight-row tiles.
    fn moe_gemm_launch(
        &self,
        tile: &Tile,
        groups: &ExpertGroups,
        down: bool,
        blocks: usize,
        n_ctas: usize,
    ) -> Result<(&CudaFunction, LaunchConfig), CudaError> {
        let at = TILES
            .iter()
            .position(|t| t == tile && t.block_m == groups.block_m)
            .ok_or_else(|| CudaError::Shape(format!("no MoE GEMM {tile:?} for {}-row m-blocks", groups.block_m)))?;
        let f = match &self.kernels.moe.gemm[at] {
            Ok((gate_up, d)) => {
                if down {
                    d
                } else {
                    gate_up
                }
            }
            Err(why) => return Err(CudaError::Unsupported(why.clone())),
        };
        let launch = LaunchConfig {
            grid_dim: (u32_of(blocks, "m-blocks")?, u32_of(n_ctas, "n-blocks")?, 1),
            block_dim: (tile.threads(), 1, 1),
            shared_mem_bytes: tile.smem_bytes() as u32,
        };
        Ok((f, launch))
    }

    /// act[r, :] = silu(x[t] · gateₑᵀ) · (x[t] · upₑᵀ) for every grouped row r holding pair
    /// p = t·top_k + j of local expert e (rows of padding are written with garbage).
    /// x: bf16 [T, H]; gate_up: bf16 [E_local, 2I, H] (an expert's gate rows, then its up rows);
    /// act: bf16 [rows of `groups`, I]; H and I multiples of 8.
    pub(crate) fn moe_gemm_gate_up(
        &self,
        act: &TensorRef,
        x: &TensorRef,
        gate_up: &TensorRef,
        groups: &ExpertGroups,
        top_k: usize,
        tile: &Tile,
    ) -> Result<(), CudaError> {
        let blocks = groups.check()?;
        let (t, h) = (x.shape()[0], x.shape()[1]);
        if gate_up.shape().len() != 3 {
            return Err(CudaError::Shape(format!("MoE gate_up of shape {:?}", gate_up.shape())));
        }
        let (el, i) = (gate_up.shape()[0], gate_up.shape()[1] / 2);
        check(x, "x", DType::BF16, &[t, h])?;
        check(gate_up, "gate_up", DType::BF16, &[el, 2 * i, h])?;
        check(act, "act", DType::BF16, &[blocks * groups.block_m, i])?;
        if !h.is_multiple_of(8) || !i.is_multiple_of(8) || top_k == 0 {
            return Err(CudaError::Shape(format!("MoE hidden {h} and intermediate {i} must be multiples of 8")));
        }
        // A CTA's weight tile covers block_n / 2 columns of act (gate and up rows interleaved).
        let (f, launch) = self.moe_gemm_launch(tile, groups, false, blocks, i.div_ceil(tile.block_n / 2))?;
        let (k_i, h_i, i_i, rows_i) =
            (i32_of(top_k, "top_k")?, i32_of(h, "hidden")?, i32_of(i, "moe_intermediate")?, i32_of(2 * i, "rows")?);
        // Null routing weights: the gate/up epilogue has none.
        launch!(
            self,
            f,
            launch,
            act.arg(),
            x.arg(),
            gate_up.arg(),
            groups.sorted.arg(),
            groups.block_expert.arg(),
            groups.count.arg(),
            &0u64,
            &k_i,
            &h_i,
            &i_i,
            &rows_i
        )
    }

    /// pair_out[p, :] = weights[p] · (act[r] · downₑᵀ) for every grouped row r holding pair p of
    /// local expert e (rows of pairs routed to other ranks are left as they were).
    /// act: bf16 [rows of `groups`, I]; down: bf16 [E_local, H, I]; weights: f32 [T·k];
    /// pair_out: bf16 [T·k, H]; H and I multiples of 8.
    pub(crate) fn moe_gemm_down(
        &self,
        pair_out: &TensorRef,
        act: &TensorRef,
        down: &TensorRef,
        groups: &ExpertGroups,
        weights: &TensorRef,
        tile: &Tile,
    ) -> Result<(), CudaError> {
        let blocks = groups.check()?;
        let (pairs, h) = (pair_out.shape()[0], pair_out.shape()[1]);
        if down.shape().len() != 3 {
            return Err(CudaError::Shape(format!("MoE down of shape {:?}", down.shape())));
        }
        let (el, i) = (down.shape()[0], down.shape()[2]);
        check(down, "down", DType::BF16, &[el, h, i])?;
        check(act, "act", DType::BF16, &[blocks * groups.block_m, i])?;
        check(weights, "weights", DType::F32, &[pairs])?;
        check(pair_out, "pair_out", DType::BF16, &[pairs, h])?;
        if !h.is_multiple_of(8) || !i.is_multiple_of(8) {
            return Err(CudaError::Shape(format!("MoE hidden {h} and intermediate {i} must be multiples of 8")));
        }
        let (f, launch) = self.moe_gemm_launch(tile, groups, true, blocks, h.div_ceil(tile.block_n))?;
        let (one, i_i, h_i) = (1i32, i32_of(i, "moe_intermediate")?, i32_of(h, "hidden")?);
        launch!(
            self,
            f,
            launch,
            pair_out.arg(),
            act.arg(),
            down.arg(),
            groups.sorted.arg(),
            groups.block_expert.arg(),
            groups.count.arg(),
            weights.arg(),
            &one,
            &i_i,
            &h_i,
            &h_i
        )
    }

    /// out[t, :] = Σⱼ pair_out[t·k + j] over the slots j (in order) whose expert
    /// ids[t·k + j] − expert0 is one of the n_local here; f32 sums, one bf16 rounding, zero
    /// when none is. pair_out: bf16 [T·k, H]; ids: i32 [T·k]; out: bf16 [T, H]; H a multiple of 8.
    pub fn moe_sum_slots(
        &self,
        out: &TensorRef,
        pair_out: &TensorRef,
        ids: &TensorRef,
        expert0: usize,
        n_local: usize,
    ) -> Result<(), CudaError> {
        let (t, h) = (out.shape()[0], out.shape()[1]);
        let pairs = ids.shape()[0];
        if t == 0 || !pairs.is_multiple_of(t) || !h.is_multiple_of(8) {
            return Err(CudaError::Shape(format!("MoE slot sum of {pairs} pairs for {t} tokens of {h}")));
        }
        check(out, "out", DType::BF16, &[t, h])?;
        check(pair_out, "pair_out", DType::BF16, &[pairs, h])?;
        check(ids, "ids", DType::I32, &[pairs])?;
        let (k, h_i, e0, el) = (
            i32_of(pairs / t, "top_k")?,
            i32_of(h, "hidden")?,
            i32_of(expert0, "expert0")?,
            i32_of(n_local, "local experts")?,
        );
        launch!(
            self,
            &self.kernels.moe.sum_slots,
            cfg((u32_of(t, "tokens")?, u32_of((h / 8).div_ceil(128), "blocks")?, 1), 128),
            out.arg(),
            pair_out.arg(),
            ids.arg(),
            &k,
            &h_i,
            &e0,
            &el
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmd_models::loader::Checkpoint;
    use llmd_models::spec::routed_moe;

    fn moe(num_experts: usize) -> MoeConfig {
        MoeConfig {
            num_experts,
            num_experts_per_tok: 2,
            moe_intermediate_size: 32,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
        }
    }

    #[test]
    fn experts_split_evenly_across_ranks() {
        assert_eq!(local_experts(&moe(16), 64, Shard::SINGLE, 0).unwrap(), 0..16);
        assert_eq!(local_experts(&moe(16), 64, Shard { rank: 1, world: 2 }, 0).unwrap(), 8..16);
        assert_eq!(local_experts(&moe(16), 64, Shard { rank: 3, world: 4 }, 0).unwrap(), 12..16);
        // Shared-expert slices go to the last rank.
        assert_eq!(local_experts(&moe(16), 64, Shard::SINGLE, 2).unwrap(), 0..18);
        assert_eq!(local_experts(&moe(16), 64, Shard { rank: 0, world: 2 }, 2).unwrap(), 0..8);
        assert_eq!(local_experts(&moe(16), 64, Shard { rank: 1, world: 2 }, 2).unwrap(), 8..18);
        let err = local_experts(&moe(6), 64, Shard { rank: 0, world: 4 }, 0).unwrap_err().to_string();
        assert!(err.contains("num_experts 6") && err.contains("tensor-parallel size 4"), "{err}");
        assert!(local_experts(&moe(2048), 64, Shard::SINGLE, 0).is_err());
        assert!(local_experts(&moe(16), 60, Shard::SINGLE, 0).is_err());
    }

    #[test]
    fn mblock_bound_holds_for_every_routing() {
        // Every way of spreading `pairs` over `n_local` experts, for small sizes, against the
        // bound the scratch and the grid are sized with.
        fn spreads(pairs: usize, experts: usize, out: &mut Vec<Vec<usize>>, cur: &mut Vec<usize>) {
            if cur.len() == experts - 1 {
                cur.push(pairs);
                out.push(cur.clone());
                cur.pop();
                return;
            }
            for c in 0..=pairs {
                cur.push(c);
                spreads(pairs - c, experts, out, cur);
                cur.pop();
            }
        }
        for experts in 1..=4 {
            for pairs in 0..=12 {
                let mut all = Vec::new();
                spreads(pairs, experts, &mut all, &mut Vec::new());
                for bm in [1, 2, 3, 16] {
                    let worst = all.iter().map(|s| s.iter().map(|c| c.div_ceil(bm)).sum::<usize>()).max().unwrap();
                    assert!(worst <= max_mblocks(pairs, experts, bm), "{pairs} pairs, {experts} experts, bm {bm}");
                }
            }
        }
        assert_eq!(max_mblocks(8, 128, 16), 8);
        assert_eq!((block_m(8, 128), block_m(1024, 128), block_m(4096, 128), block_m(16384, 128)), (16, 32, 64, 128));
        for bm in [16, 32, 64, 128] {
            for touched in [1, 8, 128, 1024] {
                for rows in [64, 1536, 7168] {
                    let tile = pick_tile(bm, touched, rows, 132);
                    assert!(TILES.contains(&tile) && tile.block_m == bm, "{bm} {touched} {rows}");
                }
            }
        }
    }

    #[test]
    fn shared_experts_are_slices_after_the_routed_ones_on_the_last_rank() {
        let (e, i, h) = (4, 32, 64);
        let tensors = vec![
            ("mlp.experts.gate_up_proj".to_string(), vec![e, 2 * i, h]),
            ("mlp.experts.down_proj".to_string(), vec![e, h, i]),
            ("mlp.gate.weight".to_string(), vec![e, h]),
            ("mlp.shared_experts.gate_proj.weight".to_string(), vec![2 * i, h]),
            ("mlp.shared_experts.up_proj.weight".to_string(), vec![2 * i, h]),
            ("mlp.shared_experts.down_proj.weight".to_string(), vec![h, 2 * i]),
        ];
        let (dir, ckpt) = checkpoint("shared", &tensors);
        let mut spec = routed_moe(&ckpt, "mlp", h, &moe(e)).unwrap();
        spec.shared = Some(llmd_models::spec::gated_mlp(&ckpt, "mlp.shared_experts", h, 2 * i).unwrap());
        // Rank 1 of 2: routed experts 2..4 and both shared slices (ids 4 and 5).
        let held = local_experts(&moe(e), h, Shard { rank: 1, world: 2 }, 2).unwrap();
        assert_eq!(held, 2..6);
        let src = expert_sources(&spec, h, held);
        // (tensor, rows, columns) of each source.
        type Source<'a> = (&'a str, Range<usize>, Option<Range<usize>>);
        let rows = |n: usize, r: Range<usize>| (tensors[n].0.as_str(), r, None);
        let got: Vec<Source> = src.gate_up.iter().map(|t| (t.name.as_str(), t.rows.clone(), t.cols.clone())).collect();
        assert_eq!(got, [rows(0, 4 * i..8 * i), rows(3, 0..i), rows(4, 0..i), rows(3, i..2 * i), rows(4, i..2 * i)]);
        let got: Vec<Source> = src.down.iter().map(|t| (t.name.as_str(), t.rows.clone(), t.cols.clone())).collect();
        assert_eq!(
            got,
            [
                rows(1, 2 * h..4 * h),
                (tensors[5].0.as_str(), 0..h, Some(0..i)),
                (tensors[5].0.as_str(), 0..h, Some(i..2 * i))
            ]
        );
        // Rank 0 holds no shared slice.
        let src = expert_sources(&spec, h, local_experts(&moe(e), h, Shard { rank: 0, world: 2 }, 2).unwrap());
        assert_eq!((src.gate_up.len(), src.down.len()), (1, 1));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Writes a safetensors file with zero-filled f32 tensors of the given shapes.
    fn checkpoint(tag: &str, tensors: &[(String, Vec<usize>)]) -> (std::path::PathBuf, Checkpoint) {
        let data: Vec<Vec<u8>> = tensors.iter().map(|(_, s)| vec![0u8; 4 * s.iter().product::<usize>()]).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&data)
            .map(|((n, s), d)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("llmd-cuda-moe-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let ckpt = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap();
        (dir, ckpt)
    }

    #[test]
    fn hub_layout_reads_one_tensor_per_expert() {
        let (e, i, h) = (4, 32, 64);
        let mut tensors = vec![("model.layers.0.mlp.gate.weight".to_string(), vec![e, h])];
        for x in 0..e {
            for (proj, shape) in [("gate", vec![i, h]), ("up", vec![i, h]), ("down", vec![h, i])] {
                tensors.push((format!("model.layers.0.mlp.experts.{x}.{proj}_proj.weight"), shape));
            }
        }
        let (dir, ckpt) = checkpoint("hub", &tensors);
        let src = expert_sources(&routed_moe(&ckpt, "model.layers.0.mlp", h, &moe(e)).unwrap(), h, 2..4);
        let names: Vec<&str> = src.gate_up.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.experts.2.gate_proj.weight",
                "model.layers.0.mlp.experts.2.up_proj.weight",
                "model.layers.0.mlp.experts.3.gate_proj.weight",
                "model.layers.0.mlp.experts.3.up_proj.weight",
            ]
        );
        assert!(src.gate_up.iter().all(|r| r.shape == [i, h] && r.rows == (0..i) && r.cols.is_none()));
        assert_eq!(src.down.len(), 2);
        assert_eq!(src.down[1].name, "model.layers.0.mlp.experts.3.down_proj.weight");
        assert_eq!((src.down[1].shape.as_slice(), src.down[1].rows.clone()), (&[h, i][..], 0..h));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn fused_layout_reads_this_ranks_rows() {
        let (e, i, h) = (4, 32, 64);
        let tensors = vec![
            ("model.layers.1.mlp.experts.gate_up_proj".to_string(), vec![e, 2 * i, h]),
            ("model.layers.1.mlp.experts.down_proj".to_string(), vec![e, h, i]),
            ("model.layers.1.mlp.gate.weight".to_string(), vec![e, h]),
        ];
        let (dir, ckpt) = checkpoint("fused", &tensors);
        let src = expert_sources(&routed_moe(&ckpt, "model.layers.1.mlp", h, &moe(e)).unwrap(), h, 2..4);
        assert_eq!(
            src.gate_up,
            [TensorRows { name: tensors[0].0.clone(), shape: vec![e, 2 * i, h], rows: 4 * i..8 * i, cols: None }]
        );
        assert_eq!(
            src.down,
            [TensorRows { name: tensors[1].0.clone(), shape: vec![e, h, i], rows: 2 * h..4 * h, cols: None }]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
