//! [`CudaRunner`]: a dense decoder (Llama, Mistral, Qwen2, Qwen3) or Qwen3-MoE (routed experts:
//! [`crate::moe`]) in bf16 on one GPU, with its paged KV cache in device memory.
//!
//! Per step: host arrays (ids, positions, KV slots, block tables) are uploaded once, then every
//! layer runs as fused RMSNorm → one QKV GEMM → bias/q-k-norm/RoPE/KV-write kernel → paged
//! attention → O GEMM → fused residual+RMSNorm → one gate/up GEMM → SiLU·mul → down GEMM.
//! Only the rows that need logits go through the LM head, and only those logits come back.

use std::path::Path;

use llmd_models::ModelError;
use llmd_models::config::ModelConfig;
use llmd_models::loader::Checkpoint;
use llmd_models::models::layers::Rope;
use llmd_models::pick::TokenPick;
use llmd_models::runner::{ForwardBatch, KvCacheLayout, Launched, ModelRunner, RowOutput, RowRequest, StepLogits};
use llmd_models::spec::{DecoderSpec, MlpSpec, SpecFeature, WeightSpec, WeightStorage};
use safetensors::Dtype;

use crate::allreduce::{PeerAllReduce, PeerBuffers, Site};
use crate::device::{DType, DeviceTensor, Gpu, TensorRef};
use crate::error::CudaError;
use crate::kernels::pack_picks;
use crate::shard::Shard;

/// How to load a model on a GPU.
#[derive(Debug, Clone)]
pub struct CudaLoadConfig {
    /// CUDA device numbers; one entry per tensor-parallel rank (empty: GPU 0).
    pub gpus: Vec<usize>,
    /// Fraction of the GPU's free memory (after weights and activations) given to the KV cache.
    pub gpu_memory_utilization: f32,
    pub block_size: usize,
    /// Most tokens in one step; activation buffers are sized for it.
    pub max_num_batched_tokens: usize,
    /// Longest context; sizes the RoPE table and block tables.
    pub max_model_len: usize,
    /// With tp > 1: sum small steps through peer memory ([`crate::allreduce`]) where every pair
    /// of GPUs has peer access; false sends every all-reduce through NCCL.
    pub peer_all_reduce: bool,
}

struct Layer {
    input_norm: DeviceTensor,
    qkv: DeviceTensor,
    qkv_bias: Option<DeviceTensor>,
    q_norm: Option<DeviceTensor>,
    k_norm: Option<DeviceTensor>,
    o: DeviceTensor,
    /// o_proj bias, on rank 0 only (added before the cross-rank sum).
    o_bias: Option<DeviceTensor>,
    post_norm: DeviceTensor,
    mlp: Mlp,
    k_cache: DeviceTensor,
    v_cache: DeviceTensor,
}

/// A layer's MLP: dense (gate/up fused, with optional biases: `gate_up_bias` is this rank's
/// gate|up slice, `down_bias` is on rank 0 only), or routed experts (sparse layers of Qwen3-MoE).
enum Mlp {
    Dense {
        gate_up: DeviceTensor,
        down: DeviceTensor,
        gate_up_bias: Option<DeviceTensor>,
        down_bias: Option<DeviceTensor>,
    },
    Sparse(crate::moe::MoeLayer),
}

impl Mlp {
    fn bytes(&self) -> usize {
        let opt = |t: &Option<DeviceTensor>| t.as_ref().map_or(0, DeviceTensor::bytes);
        match self {
            Mlp::Dense { gate_up, down, gate_up_bias, down_bias } => {
                gate_up.bytes() + down.bytes() + opt(gate_up_bias) + opt(down_bias)
            }
            Mlp::Sparse(moe) => moe.bytes(),
        }
    }
}

/// Activation buffers, allocated once for `max_tokens` rows.
struct Activations {
    /// Step metadata (ids, positions, slots, query→sequence map, block tables, logit rows),
    /// packed by [`StepMeta`] and uploaded with one copy per step.
    meta: DeviceTensor,
    residual: DeviceTensor,
    normed: DeviceTensor,
    qkv: DeviceTensor,
    q: DeviceTensor,
    attn: DeviceTensor,
    x: DeviceTensor,
    /// Dense MLP scratch (gate/up output, SiLU·up): absent when every layer is sparse.
    dense_mlp: Option<(DeviceTensor, DeviceTensor)>,
    /// Scratch of the sparse layers (MoE models only).
    moe: Option<crate::moe::MoeBuffers>,
    part_acc: DeviceTensor,
    part_ml: DeviceTensor,
    selected: DeviceTensor,
    /// This rank's vocabulary slice of the logits [rows, vocab / tp].
    logits: DeviceTensor,
    /// All ranks' slices after the all-gather, [tp, rows, vocab / tp] (tp > 1 only).
    gathered: DeviceTensor,
    sampled: DeviceTensor,
    /// Packed pick parameters and logit adjustments of one step (grows when a step needs more).
    pick_params: DeviceTensor,
}

/// The model on one GPU. Owns weights, KV cache and activation buffers.
pub struct CudaRunner {
    gpu: Gpu,
    cfg: ModelConfig,
    shard: Shard,
    dims: ShardDims,
    /// Present when tp > 1: all-reduce after the attention and MLP outputs and the embedding,
    /// all-gather of the vocabulary-parallel logits.
    comm: Option<crate::nccl::Communicator>,
    /// With tp > 1 and a supported shape: the one-shot peer all-reduce for small steps.
    peer_ar: Option<PeerAllReduce>,
    num_params: u64,
    embed: DeviceTensor,
    lm_head: Option<DeviceTensor>,
    final_norm: DeviceTensor,
    cos_sin: DeviceTensor,
    layers: Vec<Layer>,
    act: Activations,
    layout: KvCacheLayout,
    max_tokens: usize,
    max_seqs: usize,
    max_blocks_per_seq: usize,
    max_model_len: usize,
    /// Decode graphs by padded batch size.
    graphs: std::collections::HashMap<usize, DecodeGraph>,
    /// While [`CudaRunner::profile_decode`] captures a step: an event after every op.
    profile: std::cell::RefCell<Option<Vec<(&'static str, cudarc::driver::CudaEvent)>>>,
    /// The step `launch` left in flight (see [`StepInFlight`]).
    in_flight: StepInFlight,
}

/// A captured decode step. cudarc's graph handle is not `Send`; the runner moves to the engine
/// thread once and is then used by that thread alone, and `launch` binds the context first.
struct DecodeGraph(cudarc::driver::CudaGraph);

// SAFETY: see above — one owner thread at a time, context bound on every launch.
unsafe impl Send for DecodeGraph {}

/// Mean milliseconds per op of a decode step (summed over layers, first-seen order) and of the
/// whole step, from [`CudaRunner::profile_decode`].
pub type StepProfile = (Vec<(&'static str, f64)>, f64);

/// Batch sizes decode graphs are captured for; a decode batch is padded up to the next one.
const GRAPH_BUCKETS: &[usize] = &[1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256];

/// Byte layout of one step's metadata inside the packed buffer: regions in a fixed order,
/// each aligned to 16 bytes, sized for `t` tokens, `s` sequences and `stride` blocks per row
/// of the block table. The same (t, s, stride) always gives the same offsets, which is what
/// lets a captured graph reuse them.
#[derive(Debug, Clone, Copy)]
struct StepMeta {
    t: usize,
    s: usize,
    stride: usize,
    ids: usize,
    positions: usize,
    slots: usize,
    query_seq: usize,
    tables: usize,
    rows: usize,
    tiles: usize,
    /// Prefill attention tiles planned by `pack` (0: the step uses paged attention).
    n_tiles: usize,
    bytes: usize,
}

impl StepMeta {
    fn new(t: usize, s: usize, stride: usize) -> StepMeta {
        let align = |x: usize| x.div_ceil(16) * 16;
        let ids = 0;
        let positions = align(ids + 4 * t);
        let slots = align(positions + 4 * t);
        let query_seq = align(slots + 8 * t);
        let tables = align(query_seq + 4 * t);
        let rows = align(tables + 4 * s * stride);
        // Prefill attention tiles (the step's sequences and a run of padding rows) come last,
        // so that `pack` uploads only the tiles it planned.
        let tiles = align(rows + 4 * s);
        let bytes = align(tiles + 16 * crate::prefill_attention::max_tiles(t, s + 1));
        StepMeta { t, s, stride, ids, positions, slots, query_seq, tables, rows, tiles, n_tiles: 0, bytes }
    }

    fn capacity_bytes(max_tokens: usize, max_seqs: usize, max_blocks: usize) -> usize {
        // In 4-byte words (the buffer is typed U32).
        StepMeta::new(max_tokens, max_seqs, max_blocks).bytes.div_ceil(4)
    }

    /// Region `offset` of the packed buffer `base` as `shape` of `dtype` (checked to fit).
    fn view(&self, base: &TensorRef, offset: usize, shape: &[usize], dtype: DType) -> Result<TensorRef, CudaError> {
        base.view_bytes(offset, shape, dtype)
    }
}

/// Everything one forward pass reads besides weights, as device views.
struct StepViews {
    t: usize,
    ids: TensorRef,
    positions: TensorRef,
    slots: TensorRef,
    query_seq: TensorRef,
    tables: TensorRef,
    rows: TensorRef,
    n_rows: usize,
    /// i32 [n_tiles, 4] query tiles of the tensor-core prefill attention, for steps with a
    /// prompt chunk; None: the split paged kernel.
    prefill_tiles: Option<TensorRef>,
    /// Context length the attention splits are planned for.
    max_context: usize,
}

impl std::fmt::Debug for CudaRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaRunner").field("gpu", &self.gpu).field("layout", &self.layout).finish()
    }
}

fn to_dtype(d: Dtype, name: &str) -> Result<bool, CudaError> {
    match d {
        Dtype::BF16 => Ok(false),
        Dtype::F16 | Dtype::F32 => Ok(true),
        other => {
            Err(CudaError::Model(ModelError::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?}") }))
        }
    }
}

/// A rectangle of one checkpoint tensor: rows `rows` and columns `cols` of a [R, C] matrix
/// (a vector is one row; a higher-rank tensor is [product of the leading dims, last dim]).
/// Tensor-parallel ranks read only their slices.
#[derive(Debug, Clone)]
struct Part {
    name: String,
    shape: Vec<usize>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

impl Part {
    fn whole(name: impl Into<String>, shape: &[usize]) -> Part {
        let c = shape.last().copied().unwrap_or(1);
        let r = shape.iter().product::<usize>() / c.max(1);
        Part { name: name.into(), shape: shape.to_vec(), rows: 0..r, cols: 0..c }
    }
    fn rows(name: impl Into<String>, shape: &[usize], rows: std::ops::Range<usize>) -> Part {
        let mut p = Part::whole(name, shape);
        if shape.len() == 1 {
            p.cols = rows;
        } else {
            p.rows = rows;
        }
        p
    }
    fn cols(name: impl Into<String>, shape: &[usize], cols: std::ops::Range<usize>) -> Part {
        let mut p = Part::whole(name, shape);
        p.cols = cols;
        p
    }
    fn numel(&self) -> usize {
        self.rows.len() * self.cols.len()
    }
}

/// Loads `parts` one after another into one bf16 device tensor of `out_shape` (fused QKV and
/// gate/up projections, tensor-parallel slices), converting f32/f16 checkpoints on the device.
/// Whole tensors and row slices are uploaded straight from the memory map; column slices are
/// gathered row by row on the host first.
fn load_parts(gpu: &Gpu, ckpt: &Checkpoint, parts: &[Part], out_shape: &[usize]) -> Result<DeviceTensor, CudaError> {
    let total: usize = parts.iter().map(Part::numel).sum();
    if total != out_shape.iter().product::<usize>() {
        return Err(CudaError::Shape(format!("{total} elements from {} parts for shape {out_shape:?}", parts.len())));
    }
    let mut out = DeviceTensor::zeros(gpu, out_shape, DType::BF16)?;
    let mut offset_elems = 0usize;
    for part in parts {
        let raw = ckpt.raw(&part.name, &part.shape)?;
        let elem = raw.bytes.len() / part.shape.iter().product::<usize>().max(1);
        let ncols = part.shape.last().copied().unwrap_or(1);
        let numel = part.numel();
        let gathered;
        let bytes: &[u8] = if part.cols.len() == ncols {
            &raw.bytes[part.rows.start * ncols * elem..part.rows.end * ncols * elem]
        } else {
            let mut v = Vec::with_capacity(numel * elem);
            for r in part.rows.clone() {
                v.extend_from_slice(
                    &raw.bytes[(r * ncols + part.cols.start) * elem..(r * ncols + part.cols.end) * elem],
                );
            }
            gathered = v;
            &gathered
        };
        let dst = out.r().slice(offset_elems, numel)?;
        if to_dtype(raw.dtype, &part.name)? {
            let src_dtype = if raw.dtype == Dtype::F32 {
                DType::F32
            } else {
                DType::BF16 /* f16 staged as 2-byte words */
            };
            let staged = DeviceTensor::from_bytes(gpu, bytes, &[numel], src_dtype)?;
            gpu.to_bf16(&dst, &staged.r(), raw.dtype == Dtype::F16)?;
            gpu.synchronize()?;
        } else {
            out.upload_at(gpu, offset_elems * 2, bytes)?;
        }
        offset_elems += numel;
    }
    Ok(out)
}

/// The rectangle of `w` this rank loads. Every [`WeightStorage`] kind the spec can state is
/// matched here, so a new storage kind is a compile error until the loader handles it.
fn part(w: &WeightSpec, rows: Option<std::ops::Range<usize>>, cols: Option<std::ops::Range<usize>>) -> Part {
    match w.storage {
        WeightStorage::Float(_) => match (rows, cols) {
            (Some(r), _) => Part::rows(w.name.clone(), &w.shape, r),
            (None, Some(c)) => Part::cols(w.name.clone(), &w.shape, c),
            (None, None) => Part::whole(w.name.clone(), &w.shape),
        },
    }
}

fn part_whole(w: &WeightSpec) -> Part {
    part(w, None, None)
}

fn part_rows(w: &WeightSpec, rows: std::ops::Range<usize>) -> Part {
    part(w, Some(rows), None)
}

fn part_cols(w: &WeightSpec, cols: std::ops::Range<usize>) -> Part {
    part(w, None, Some(cols))
}

/// Per-rank sizes for `cfg` split `world` ways, or why it cannot be split that way.
#[derive(Debug, Clone, Copy)]
struct ShardDims {
    heads: usize,
    kv_heads: usize,
    /// First KV head of this rank.
    kv_head0: usize,
    inter: usize,
    vocab: usize,
}

fn shard_dims(cfg: &ModelConfig, shard: Shard) -> Result<ShardDims, CudaError> {
    let (hq, hkv, inter, vocab, tp) =
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size, shard.world);
    let refuse = |what: String| Err(CudaError::Unsupported(format!("tp {tp}: {what}")));
    if hq % tp != 0 {
        return refuse(format!("{hq} attention heads are not divisible by {tp}"));
    }
    if hkv % tp != 0 && tp % hkv != 0 {
        return refuse(format!("{hkv} KV heads neither divide nor are divisible by {tp}"));
    }
    if inter % tp != 0 {
        return refuse(format!("intermediate_size {inter} is not divisible by {tp}"));
    }
    if vocab % tp != 0 {
        return refuse(format!("vocab_size {vocab} is not divisible by {tp}"));
    }
    let (kv_heads, kv_head0) =
        if hkv >= tp { (hkv / tp, shard.rank * (hkv / tp)) } else { (1, shard.rank / (tp / hkv)) };
    Ok(ShardDims { heads: hq / tp, kv_heads, kv_head0, inter: inter / tp, vocab: vocab / tp })
}

/// How this backend names itself in refusals.
const BACKEND: &str = "the CUDA backend";

/// Spec features this backend does not serve; every other feature a [`DecoderSpec`] states is
/// loaded and applied (today: none left out).
const UNSUPPORTED: &[SpecFeature] = &[];

/// Checks, from `config.json` and the checkpoint index alone (no GPU), that this backend
/// serves the model in `dir`: the architecture is in the registry, every tensor the spec
/// names exists in a supported storage, no feature in [`UNSUPPORTED`] is used, and shared
/// experts (if any) split into expert-sized slices.
pub fn check_model(dir: &Path) -> Result<(), ModelError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let spec = DecoderSpec::new(&cfg, &ckpt)?;
    spec.refuse_unsupported(BACKEND, UNSUPPORTED)?;
    crate::moe::shared_slices(&spec)?;
    Ok(())
}

pub(crate) fn load_single(
    dir: &Path,
    cfg: &ModelConfig,
    opts: &CudaLoadConfig,
    ordinal: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<CudaRunner, CudaError> {
    let (mut r, possible) = load_rank(dir, cfg, opts, Gpu::open(ordinal)?, Shard::SINGLE, None, progress)?;
    r.alloc_kv(possible)?;
    Ok(r)
}

/// The single-GPU runner itself (GPU `opts.gpus[0]`), for tools that call its own methods
/// such as [`CudaRunner::profile_decode`]; serving goes through [`load_cuda`].
pub fn load_cuda_runner(dir: &Path, opts: &CudaLoadConfig) -> Result<CudaRunner, ModelError> {
    let cfg = ModelConfig::from_dir(dir)?;
    Ok(load_single(dir, &cfg, opts, opts.gpus.first().copied().unwrap_or(0), &mut |_, _| {})?)
}

/// Loads rank `shard` of the model onto `gpu` (weights and activation buffers, no KV cache
/// yet) and returns it with the number of KV blocks its free memory allows; the caller agrees
/// on one count across ranks and calls [`CudaRunner::alloc_kv`].
pub(crate) fn load_rank(
    dir: &Path,
    cfg: &ModelConfig,
    opts: &CudaLoadConfig,
    gpu: Gpu,
    shard: Shard,
    nccl_id: Option<crate::nccl::UniqueId>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(CudaRunner, usize), CudaError> {
    let ordinal = gpu.ordinal;
    // Join the communicator first: ncclCommInitRank blocks until every rank arrived, so doing it
    // before the long weight load keeps the window in which a failed rank strands the others short.
    let comm = match nccl_id {
        Some(id) => {
            gpu.ctx.bind_to_thread()?;
            Some(crate::nccl::Communicator::init(id, shard.rank, shard.world)?)
        }
        None => None,
    };
    let (h, d, hq, hkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
    if hq % hkv != 0 {
        return Err(CudaError::Unsupported(format!("{hq} heads with {hkv} KV heads")));
    }
    let dims = shard_dims(cfg, shard)?;
    if !gpu.kernels.supports_attention(d, dims.heads / dims.kv_heads) {
        return Err(CudaError::Unsupported(format!(
            "head_dim {d} with {} query heads per KV head",
            dims.heads / dims.kv_heads
        )));
    }
    let ckpt = Checkpoint::open_dir(dir)?;
    let spec = DecoderSpec::new(cfg, &ckpt)?;
    // Routed experts (and shared-expert slices) held by this rank (sparse layers only).
    let shared = crate::moe::shared_slices(&spec)?;
    let experts = cfg.moe.as_ref().map(|m| crate::moe::local_experts(m, h, shard, shared)).transpose()?.unwrap_or(0..0);
    spec.refuse_unsupported(BACKEND, UNSUPPORTED)?;
    let total = spec.layers.len() + 3;
    let mut done = 0;
    let (v0, vl) = (shard.rank * dims.vocab, dims.vocab);
    let embed = load_parts(&gpu, &ckpt, &[part_rows(&spec.embed_tokens, v0..v0 + vl)], &[vl, h])?;
    let lm_head = match &spec.lm_head {
        Some(w) => Some(load_parts(&gpu, &ckpt, &[part_rows(w, v0..v0 + vl)], &[vl, h])?),
        None => None,
    };
    let final_norm = load_parts(&gpu, &ckpt, &[part_whole(&spec.final_norm)], &[h])?;
    done += 3;
    progress(done, total);
    let max_tokens = opts.max_num_batched_tokens.max(1);
    let max_seqs = max_tokens.min(1024);
    let block_size = opts.block_size;
    let max_blocks_per_seq = opts.max_model_len.div_ceil(block_size);
    let (hq_l, hkv_l, inter_l) = (dims.heads, dims.kv_heads, dims.inter);
    let attn_ws_elems = max_tokens.max(512) * hq_l * d * 2;

    let q_rows = shard.rank * hq_l * d..(shard.rank + 1) * hq_l * d;
    let kv_rows = dims.kv_head0 * d..(dims.kv_head0 + hkv_l) * d;
    let inter_rows = shard.rank * inter_l..(shard.rank + 1) * inter_l;
    // Row-parallel outputs (o_proj, down_proj) are summed across ranks: their bias is added once,
    // by rank 0, before the sum.
    let row_parallel_bias = |b: &Option<WeightSpec>, n: usize| -> Result<Option<DeviceTensor>, CudaError> {
        match b {
            Some(b) if shard.rank == 0 => Ok(Some(load_parts(&gpu, &ckpt, &[part_whole(b)], &[n])?)),
            _ => Ok(None),
        }
    };
    let mut layers = Vec::with_capacity(spec.layers.len());
    for l in &spec.layers {
        let a = &l.attention;
        let qkv_width = (hq_l + 2 * hkv_l) * d;
        let qkv = load_parts(
            &gpu,
            &ckpt,
            &[
                part_rows(&a.q_proj.weight, q_rows.clone()),
                part_rows(&a.k_proj.weight, kv_rows.clone()),
                part_rows(&a.v_proj.weight, kv_rows.clone()),
            ],
            &[qkv_width, h],
        )?;
        let qkv_bias = match (&a.q_proj.bias, &a.k_proj.bias, &a.v_proj.bias) {
            (Some(q), Some(k), Some(v)) => Some(load_parts(
                &gpu,
                &ckpt,
                &[part_rows(q, q_rows.clone()), part_rows(k, kv_rows.clone()), part_rows(v, kv_rows.clone())],
                &[qkv_width],
            )?),
            (None, None, None) => None,
            _ => return Err(CudaError::Unsupported(format!("{}: a bias on only some of q/k/v", a.q_proj.weight.name))),
        };
        let norm = |w: &Option<WeightSpec>| -> Result<Option<DeviceTensor>, CudaError> {
            w.as_ref().map(|w| load_parts(&gpu, &ckpt, &[part_whole(w)], &[d])).transpose()
        };
        let mlp = match &l.mlp {
            MlpSpec::Routed(r) => {
                let el = experts.len();
                let mi = r.intermediate;
                let src = crate::moe::expert_sources(r, h, experts.clone());
                let parts = |v: Vec<crate::moe::TensorRows>| -> Vec<Part> {
                    v.into_iter()
                        .map(|s| match s.cols {
                            Some(c) => Part::cols(s.name, &s.shape, c),
                            None => Part::rows(s.name, &s.shape, s.rows),
                        })
                        .collect()
                };
                let bias = r
                    .routing
                    .correction_bias
                    .as_ref()
                    .map(|b| -> Result<Vec<f32>, CudaError> {
                        let t = ckpt.load_f32(&b.name, &b.shape)?;
                        Ok(t.to_vec1::<f32>().map_err(llmd_models::ModelError::from)?)
                    })
                    .transpose()?;
                Mlp::Sparse(crate::moe::MoeLayer {
                    router: load_parts(&gpu, &ckpt, &[part_whole(&r.router)], &[r.num_experts, h])?,
                    gate_up: load_parts(&gpu, &ckpt, &parts(src.gate_up), &[el, 2 * mi, h])?,
                    down: load_parts(&gpu, &ckpt, &parts(src.down), &[el, h, mi])?,
                    expert0: experts.start,
                    top_k: r.top_k,
                    shared,
                    routing: crate::moe::MoeRouting::new(&gpu, &r.routing, r.num_experts, bias.as_deref())?,
                })
            }
            MlpSpec::Dense(m) => Mlp::Dense {
                gate_up: load_parts(
                    &gpu,
                    &ckpt,
                    &[
                        part_rows(&m.gate_proj.weight, inter_rows.clone()),
                        part_rows(&m.up_proj.weight, inter_rows.clone()),
                    ],
                    &[2 * inter_l, h],
                )?,
                down: load_parts(&gpu, &ckpt, &[part_cols(&m.down_proj.weight, inter_rows.clone())], &[h, inter_l])?,
                gate_up_bias: match (&m.gate_proj.bias, &m.up_proj.bias) {
                    (Some(g), Some(u)) => Some(load_parts(
                        &gpu,
                        &ckpt,
                        &[part_rows(g, inter_rows.clone()), part_rows(u, inter_rows.clone())],
                        &[2 * inter_l],
                    )?),
                    (None, None) => None,
                    _ => {
                        return Err(CudaError::Unsupported(format!(
                            "{}: a bias on only one of gate/up",
                            m.gate_proj.weight.name
                        )));
                    }
                },
                down_bias: row_parallel_bias(&m.down_proj.bias, h)?,
            },
        };
        let layer = Layer {
            input_norm: load_parts(&gpu, &ckpt, &[part_whole(&l.input_norm)], &[h])?,
            qkv,
            qkv_bias,
            q_norm: norm(&a.q_norm)?,
            k_norm: norm(&a.k_norm)?,
            o: load_parts(&gpu, &ckpt, &[part_cols(&a.o_proj.weight, q_rows.clone())], &[h, hq_l * d])?,
            o_bias: row_parallel_bias(&a.o_proj.bias, h)?,
            post_norm: load_parts(&gpu, &ckpt, &[part_whole(&l.post_attention_norm)], &[h])?,
            mlp,
            k_cache: DeviceTensor::zeros(&gpu, &[1], DType::BF16)?,
            v_cache: DeviceTensor::zeros(&gpu, &[1], DType::BF16)?,
        };
        layers.push(layer);
        done += 1;
        progress(done, total);
    }

    // RoPE table: cos | sin for every position up to max_model_len.
    let rope = Rope::new(&cfg.rope, d);
    let max_pos = opts.max_model_len.max(1);
    let mut table = Vec::with_capacity(max_pos * d);
    for pos in 0..max_pos {
        let (sin, cos): (Vec<f32>, Vec<f32>) = rope.inv_freq().iter().map(|f| (pos as f32 * f).sin_cos()).unzip();
        table.extend_from_slice(&cos);
        table.extend_from_slice(&sin);
    }
    let mut cos_sin = DeviceTensor::zeros(&gpu, &[max_pos, d], DType::F32)?;
    cos_sin.upload(&gpu, &table)?;

    let z = |shape: &[usize], dt| DeviceTensor::zeros(&gpu, shape, dt);
    let qkv_width = (hq_l + 2 * hkv_l) * d;
    let act = Activations {
        meta: z(&[StepMeta::capacity_bytes(max_tokens, max_seqs, max_blocks_per_seq)], DType::U32)?,
        residual: z(&[max_tokens, h], DType::BF16)?,
        normed: z(&[max_tokens, h], DType::BF16)?,
        qkv: z(&[max_tokens, qkv_width], DType::BF16)?,
        q: z(&[max_tokens, hq_l, d], DType::BF16)?,
        attn: z(&[max_tokens, hq_l, d], DType::BF16)?,
        x: z(&[max_tokens, h], DType::BF16)?,
        dense_mlp: if layers.iter().any(|l| matches!(l.mlp, Mlp::Dense { .. })) {
            Some((z(&[max_tokens, 2 * inter_l], DType::BF16)?, z(&[max_tokens, inter_l], DType::BF16)?))
        } else {
            None
        },
        moe: cfg.moe.as_ref().map(|m| crate::moe::MoeBuffers::new(&gpu, max_tokens, h, m, shared)).transpose()?,
        part_acc: z(&[attn_ws_elems], DType::F32)?,
        part_ml: z(&[attn_ws_elems / d * 2], DType::F32)?,
        selected: z(&[max_seqs, h], DType::BF16)?,
        logits: z(&[max_seqs, vl], DType::F32)?,
        gathered: z(&[if shard.world > 1 { shard.world * max_seqs * vl } else { 1 }], DType::F32)?,
        sampled: z(&[max_seqs], DType::U32)?,
        pick_params: z(&[(max_seqs * crate::kernels::PICK_PARAMS_BYTES).next_power_of_two() / 4], DType::U32)?,
    };
    let peer_ar =
        if comm.is_some() && opts.peer_all_reduce { PeerAllReduce::new(&gpu, shard, h, max_tokens)? } else { None };
    gpu.synchronize()?;

    // KV cache from what is left: a fraction of free memory, as vLLM's gpu_memory_utilization.
    let (free, total_mem) = gpu.mem_info()?;
    let budget = (free as f64 * opts.gpu_memory_utilization as f64) as u64;
    let possible = KvCacheLayout::blocks_for_budget(cfg.num_hidden_layers, hkv_l, d, block_size, 2, budget);
    if possible < max_blocks_per_seq {
        return Err(CudaError::OutOfMemory(format!(
            "GPU {ordinal}: {} MiB free after loading weights leaves room for {possible} KV blocks; one sequence of max_model_len {} needs {max_blocks_per_seq} (lower max_model_len or raise gpu_memory_utilization)",
            free >> 20,
            opts.max_model_len
        )));
    }
    tracing::info!(gpu = %gpu.name, ordinal, rank = shard.rank, tp = shard.world, total_mib = total_mem >> 20, free_mib = free >> 20, kv_blocks_possible = possible, "weights loaded");
    let layout = KvCacheLayout {
        num_layers: cfg.num_hidden_layers,
        num_kv_heads: hkv_l,
        head_dim: d,
        block_size,
        num_blocks: 0,
        dtype_bytes: 2,
    };
    let runner = CudaRunner {
        gpu,
        cfg: cfg.clone(),
        shard,
        dims,
        comm,
        peer_ar,
        num_params: ckpt.num_elements(),
        embed,
        lm_head,
        final_norm,
        cos_sin,
        layers,
        act,
        layout,
        max_tokens,
        max_seqs,
        max_blocks_per_seq,
        max_model_len: opts.max_model_len,
        graphs: Default::default(),
        profile: Default::default(),
        in_flight: Default::default(),
    };
    progress(total, total);
    Ok((runner, possible))
}

impl CudaRunner {
    /// Allocates the paged KV cache: `num_blocks` blocks per layer (the same on every rank).
    pub(crate) fn alloc_kv(&mut self, num_blocks: usize) -> Result<(), CudaError> {
        let (bs, hkv, d) = (self.layout.block_size, self.layout.num_kv_heads, self.layout.head_dim);
        for layer in &mut self.layers {
            layer.k_cache = DeviceTensor::zeros(&self.gpu, &[num_blocks, bs, hkv, d], DType::BF16)?;
            layer.v_cache = DeviceTensor::zeros(&self.gpu, &[num_blocks, bs, hkv, d], DType::BF16)?;
        }
        self.gpu.synchronize()?;
        self.layout.num_blocks = num_blocks;
        tracing::info!(
            gpu = %self.gpu.name,
            rank = self.shard.rank,
            kv_blocks = num_blocks,
            kv_mib = (self.layout.bytes_per_block() * num_blocks) >> 20,
            "CUDA KV cache allocated"
        );
        Ok(())
    }

    /// This rank's peer all-reduce addresses, when it has that path.
    pub(crate) fn peer_buffers(&self) -> Option<PeerBuffers> {
        self.peer_ar.as_ref().map(|p| p.buffers(&self.gpu))
    }

    /// Enables peer access to every rank of `peers` (see [`PeerAllReduce::connect`]).
    pub(crate) fn connect_peers(&mut self, peers: &[PeerBuffers]) -> Result<(), CudaError> {
        match &mut self.peer_ar {
            Some(p) => p.connect(&self.gpu, peers),
            None => Err(CudaError::Unsupported("this rank has no peer all-reduce buffers".into())),
        }
    }

    /// Turns the peer all-reduce on (every rank connected) or drops it (NCCL serves every call).
    /// Must be called before the first decode graph is captured, identically on every rank.
    pub(crate) fn use_peer_all_reduce(&mut self, on: bool) {
        if on {
            if let Some(p) = &mut self.peer_ar {
                p.set_ready(true);
            }
        } else {
            self.peer_ar = None;
        }
    }

    /// Parameters of the whole checkpoint (not just this rank's slice).
    pub(crate) fn num_params(&self) -> u64 {
        self.num_params
    }

    /// Bytes of weights on this GPU.
    pub(crate) fn weight_bytes(&self) -> u64 {
        let opt = |t: &Option<DeviceTensor>| t.as_ref().map_or(0, DeviceTensor::bytes);
        let mut b = self.embed.bytes() + self.final_norm.bytes() + opt(&self.lm_head);
        for l in &self.layers {
            b += l.input_norm.bytes() + l.qkv.bytes() + l.o.bytes() + l.post_norm.bytes() + l.mlp.bytes();
            b += opt(&l.qkv_bias) + opt(&l.q_norm) + opt(&l.k_norm) + opt(&l.o_bias);
        }
        b as u64
    }

    /// Validates the batch and packs its metadata for `t_pad` tokens / `s_pad` sequences
    /// (padding rows write no KV and produce ignored outputs).
    fn pack(
        &self,
        batch: &ForwardBatch,
        t_pad: usize,
        s_pad: usize,
        stride: usize,
    ) -> Result<(StepMeta, Vec<u8>, usize, usize), CudaError> {
        let t = batch.num_tokens();
        let s = batch.seqs.len();
        let bs = self.layout.block_size;
        let mut meta = StepMeta::new(t_pad, s_pad, stride);
        let mut buf = vec![0u8; meta.bytes];
        let put = |buf: &mut Vec<u8>, off: usize, bytes: &[u8]| buf[off..off + bytes.len()].copy_from_slice(bytes);
        let mut max_context = 0usize;
        let mut n_rows = 0usize;
        for (i, &id) in batch.tokens.iter().enumerate() {
            if id as usize >= self.cfg.vocab_size {
                return Err(CudaError::Shape(format!("token id {id} >= vocab size {}", self.cfg.vocab_size)));
            }
            put(&mut buf, meta.ids + 4 * i, &id.to_ne_bytes());
            put(&mut buf, meta.positions + 4 * i, &(batch.positions[i] as i32).to_ne_bytes());
        }
        for i in t..t_pad {
            put(&mut buf, meta.slots + 8 * i, &(-1i64).to_ne_bytes());
        }
        for (si, seq) in batch.seqs.iter().enumerate() {
            let ctx = seq.context_before + seq.len;
            if seq.block_table.len() * bs < ctx || seq.block_table.len() > stride {
                return Err(CudaError::Shape(format!(
                    "sequence {si}: {} blocks for {ctx} tokens (max {stride} blocks)",
                    seq.block_table.len()
                )));
            }
            if let Some(&b) = seq.block_table.iter().find(|&&b| b as usize >= self.layout.num_blocks) {
                return Err(CudaError::Shape(format!(
                    "sequence {si}: block id {b} >= {} blocks",
                    self.layout.num_blocks
                )));
            }
            max_context = max_context.max(ctx);
            for (j, &b) in seq.block_table.iter().enumerate() {
                put(&mut buf, meta.tables + 4 * (si * stride + j), &(b as i32).to_ne_bytes());
            }
            for k in 0..seq.len {
                let pos = seq.context_before + k;
                let ti = seq.start + k;
                let slot = seq.block_table[pos / bs] as i64 * bs as i64 + (pos % bs) as i64;
                put(&mut buf, meta.slots + 8 * ti, &slot.to_ne_bytes());
                put(&mut buf, meta.query_seq + 4 * ti, &(si as i32).to_ne_bytes());
            }
            if seq.wants_logits {
                put(&mut buf, meta.rows + 4 * n_rows, &((seq.start + seq.len - 1) as i32).to_ne_bytes());
                n_rows += 1;
            }
        }
        // Padding rows (t..t_pad, s..s_pad) keep zeros: token 0 at position 0 of sequence 0,
        // slot -1 (no KV write), logits from row 0; their outputs are never read.
        debug_assert!(t <= t_pad && s <= s_pad);
        // Steps with a prompt chunk run attention as tiles of query rows on tensor cores, and so
        // do decode steps of many sequences: one tile per (sequence, KV head) reads the K/V once
        // for the whole GQA group on tensor cores, where the split paged kernel scores key by
        // key on CUDA cores (on an H200, Qwen3-30B-A3B shapes, 256 sequences at context 512:
        // 21.4 ms of a 49.6 ms step in the paged kernel, 0.6 TB/s). Few sequences keep the
        // split kernel, which spreads a long context over the GPU. The choice depends only on
        // the padded sizes, so a decode graph's bucket always takes the same path.
        let group = self.dims.heads / self.dims.kv_heads;
        let decode = batch.seqs.iter().all(|q| q.len == 1);
        let decode_on_tiles = decode && s_pad * self.dims.kv_heads >= self.gpu.sm_count;
        if (!decode || decode_on_tiles) && self.gpu.kernels.prefill.supports(self.cfg.head_dim, group) {
            use crate::prefill_attention::{TileSeq, plan_tiles};
            let mut seqs: Vec<TileSeq> = batch
                .seqs
                .iter()
                .enumerate()
                .map(|(si, q)| TileSeq { seq: si, q_start: q.start, q_len: q.len, context_before: q.context_before })
                .collect();
            if t_pad > t && decode_on_tiles {
                // One tile per padding row, so that a decode bucket always has t_pad tiles (the
                // grid its graph was captured with).
                seqs.extend((t..t_pad).map(|r| TileSeq { seq: 0, q_start: r, q_len: 1, context_before: 0 }));
            } else if t_pad > t {
                // Padding rows attend to position 0 of sequence 0, as in the paged kernel.
                seqs.push(TileSeq { seq: 0, q_start: t, q_len: t_pad - t, context_before: 0 });
            }
            let tiles = plan_tiles(&seqs, group);
            debug_assert!(tiles.len() <= crate::prefill_attention::max_tiles(t_pad, s_pad + 1));
            for (i, tile) in tiles.iter().enumerate() {
                put(&mut buf, meta.tiles + 16 * i, &tile.to_ne_bytes());
            }
            meta.n_tiles = tiles.len();
        }
        buf.truncate(meta.tiles + 16 * meta.n_tiles);
        Ok((meta, buf, max_context, n_rows))
    }

    fn views(&self, meta: &StepMeta, n_rows: usize, max_context: usize) -> Result<StepViews, CudaError> {
        let base = &self.act.meta.r();
        let (t, s) = (meta.t, meta.s);
        Ok(StepViews {
            t,
            ids: meta.view(base, meta.ids, &[t], DType::U32)?,
            positions: meta.view(base, meta.positions, &[t], DType::I32)?,
            slots: meta.view(base, meta.slots, &[t], DType::I64)?,
            query_seq: meta.view(base, meta.query_seq, &[t], DType::I32)?,
            tables: meta.view(base, meta.tables, &[s, meta.stride], DType::I32)?,
            rows: meta.view(base, meta.rows, &[n_rows], DType::I32)?,
            n_rows,
            prefill_tiles: match meta.n_tiles {
                0 => None,
                n => Some(meta.view(base, meta.tiles, &[n, 4], DType::I32)?),
            },
            max_context,
        })
    }

    /// Issues every launch of one forward pass (no host synchronisation, so it can be captured).
    fn launch_forward(&self, v: &StepViews) -> Result<(), CudaError> {
        let gpu = &self.gpu;
        let a = &self.act;
        let cfg = &self.cfg;
        let (d, hq) = (cfg.head_dim, self.dims.heads);
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (d as f32).sqrt();
        let t = v.t;
        let stream = &*self.gpu.stream;
        let residual = a.residual.rows(0, t)?;
        let normed = a.normed.rows(0, t)?;
        let qkv = a.qkv.rows(0, t)?;
        let q = a.q.rows(0, t)?;
        let attn = a.attn.rows(0, t)?;
        // Where the partial sums of the ranks go: the peer all-reduce's buffers on a small
        // tensor-parallel step, else `x` (and the residual itself for the embedding), summed by
        // NCCL in place (a no-op on one GPU).
        let peer = self.peer_ar.as_ref().filter(|p| p.serves(t));
        let site = |s: Site, fallback: &TensorRef| peer.map_or_else(|| Ok(fallback.clone()), |p| p.input(s, t));
        let x = a.x.rows(0, t)?;
        let (x_attn, x_mlp, x_embed) =
            (site(Site::Attention, &x)?, site(Site::Mlp, &x)?, site(Site::Embedding, &residual)?);
        // Sums `x` across ranks, adds it to the residual (unless `x` is the embedding), and
        // writes rmsnorm(residual) * weight to `normed`: one kernel on the peer path.
        let reduce_norm = |s: Site, x: &TensorRef, weight: &TensorRef, op: &'static str| -> Result<(), CudaError> {
            let add = s != Site::Embedding;
            match peer {
                // Profiled as one op: the sum and the norm are one kernel here.
                Some(p) => {
                    return p
                        .reduce_add_rmsnorm(gpu, s, &residual, &normed, weight, eps)
                        .and(self.mark("all_reduce+norm"));
                }
                None => {
                    if let Some(c) = &self.comm {
                        c.all_reduce_sum(x, stream)?;
                        self.mark("all_reduce")?;
                    }
                    gpu.add_rmsnorm(&normed, &residual, add.then_some(x), weight, eps)?;
                }
            }
            self.mark(op)
        };
        // Vocabulary-parallel embedding: each rank writes its rows (zeros elsewhere), then a sum.
        gpu.embedding_shard(&x_embed, &self.embed.r(), &v.ids, self.shard.rank * self.dims.vocab)?;
        self.mark("embedding")?;
        // The sum the next norm consumes: the embedding, then each layer's MLP output.
        let mut pending = (Site::Embedding, &x_embed);
        for layer in &self.layers {
            reduce_norm(pending.0, pending.1, &layer.input_norm.r(), "input_norm")?;
            gpu.linear(&qkv, &normed, &layer.qkv.r())?;
            self.mark("qkv_proj")?;
            gpu.qkv_rope_cache(
                &qkv,
                layer.qkv_bias.as_ref().map(|b| b.r()).as_ref(),
                layer.q_norm.as_ref().map(|b| b.r()).as_ref(),
                layer.k_norm.as_ref().map(|b| b.r()).as_ref(),
                eps,
                &self.cos_sin.r(),
                &v.positions,
                &v.slots,
                &q,
                &layer.k_cache.r(),
                &layer.v_cache.r(),
            )?;
            self.mark("rope_kv_write")?;
            match &v.prefill_tiles {
                Some(tiles) => gpu.prefill_attention(
                    &attn,
                    &q,
                    &layer.k_cache.r(),
                    &layer.v_cache.r(),
                    &v.tables,
                    &v.positions,
                    tiles,
                    scale,
                )?,
                None => gpu.paged_attention(
                    &attn,
                    &q,
                    &layer.k_cache.r(),
                    &layer.v_cache.r(),
                    &v.tables,
                    &v.query_seq,
                    &v.positions,
                    v.max_context,
                    &a.part_acc.r(),
                    &a.part_ml.r(),
                    scale,
                )?,
            }
            self.mark("attention")?;
            gpu.linear(&x_attn, &attn.reshape(&[t, hq * d])?, &layer.o.r())?;
            if let Some(b) = &layer.o_bias {
                gpu.add_bias(&x_attn, &b.r())?;
            }
            self.mark("o_proj")?;
            reduce_norm(Site::Attention, &x_attn, &layer.post_norm.r(), "post_norm")?;
            match &layer.mlp {
                Mlp::Dense { gate_up: w_gate_up, down, gate_up_bias, down_bias } => {
                    let (gate_up, act) = a
                        .dense_mlp
                        .as_ref()
                        .ok_or_else(|| CudaError::Shape("dense layer without MLP buffers".into()))
                        .and_then(|(g, x)| Ok((g.rows(0, t)?, x.rows(0, t)?)))?;
                    gpu.linear(&gate_up, &normed, &w_gate_up.r())?;
                    if let Some(b) = gate_up_bias {
                        gpu.add_bias(&gate_up, &b.r())?;
                    }
                    self.mark("gate_up_proj")?;
                    gpu.silu_mul(&act, &gate_up)?;
                    self.mark("silu_mul")?;
                    gpu.linear(&x_mlp, &act, &down.r())?;
                    if let Some(b) = down_bias {
                        gpu.add_bias(&x_mlp, &b.r())?;
                    }
                    self.mark("down_proj")?;
                }
                Mlp::Sparse(moe) => {
                    let buffers =
                        a.moe.as_ref().ok_or_else(|| CudaError::Shape("sparse layer without MoE buffers".into()))?;
                    moe.forward(gpu, &x_mlp, &normed, buffers, &|op| self.mark(op))?;
                }
            }
            pending = (Site::Mlp, &x_mlp);
        }
        reduce_norm(pending.0, pending.1, &self.final_norm.r(), "final_norm")?;
        if v.n_rows > 0 {
            let selected = a.selected.rows(0, v.n_rows)?;
            gpu.gather_rows(&selected, &normed, &v.rows)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed).r();
            let local = a.logits.rows(0, v.n_rows)?;
            gpu.linear(&local, &selected, &head)?;
            if let Some(c) = &self.comm {
                c.all_gather(&local, &a.gathered.r(), stream)?;
            }
        }
        self.mark("lm_head")?;
        Ok(())
    }

    /// Records a timing event named `op` when a profile is being captured (a no-op otherwise).
    fn mark(&self, op: &'static str) -> Result<(), CudaError> {
        use cudarc::driver::sys;
        if let Some(events) = self.profile.borrow_mut().as_mut() {
            let event = self.gpu.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
            // An external record becomes an event-record node of the captured graph, recorded at
            // every replay (a plain record inside a capture only orders the stream).
            // SAFETY: the event and the stream belong to this runner's context and outlive the call.
            unsafe {
                sys::cuEventRecordWithFlags(
                    event.cu_event(),
                    self.gpu.stream.cu_stream(),
                    sys::CUevent_record_flags_enum::CU_EVENT_RECORD_EXTERNAL as u32,
                )
            }
            .result()?;
            events.push((op, event));
        }
        Ok(())
    }

    /// Where one decode step of `batch` (every sequence decoding one token) spends its time:
    /// the step is captured as a graph with an event after every op, as the serving path runs
    /// it, and replayed `iters` times. Returns the mean milliseconds per op, summed over layers,
    /// in first-seen order, and the whole step's mean.
    pub fn profile_decode(&mut self, batch: &ForwardBatch, iters: usize) -> Result<StepProfile, CudaError> {
        let s = batch.seqs.len();
        let bucket = GRAPH_BUCKETS
            .iter()
            .copied()
            .find(|&b| b >= s && b <= self.max_seqs && b <= self.max_tokens)
            .ok_or_else(|| CudaError::Shape(format!("no decode graph bucket for {s} sequences")))?;
        let (meta, host, _ctx, _rows) = self.pack(batch, bucket, bucket, self.max_blocks_per_seq)?;
        self.act.meta.upload_at(&self.gpu, 0, &host)?;
        let views = self.views(&meta, bucket, self.max_model_len)?;
        self.launch_forward(&views)?;
        *self.profile.borrow_mut() = Some(Vec::new());
        let mode = cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.gpu.stream.begin_capture(mode)?;
        let captured = self.mark("start").and_then(|_| self.launch_forward(&views));
        let graph = self.gpu.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?;
        let events = self.profile.borrow_mut().take().unwrap_or_default();
        captured?;
        let graph = graph.ok_or_else(|| CudaError::Shape("profile capture produced no graph".into()))?;
        let mut totals: Vec<(&'static str, f64)> = Vec::new();
        let mut step = 0f64;
        for _ in 0..iters.max(1) {
            graph.launch()?;
            self.gpu.synchronize()?;
            for w in events.windows(2) {
                let ms = f64::from(w[0].1.elapsed_ms(&w[1].1)?);
                match totals.iter_mut().find(|(op, _)| *op == w[1].0) {
                    Some(t) => t.1 += ms,
                    None => totals.push((w[1].0, ms)),
                }
            }
            if let (Some(first), Some(last)) = (events.first(), events.last()) {
                step += f64::from(first.1.elapsed_ms(&last.1)?);
            }
        }
        let n = iters.max(1) as f64;
        Ok((totals.into_iter().map(|(op, ms)| (op, ms / n)).collect(), step / n))
    }

    /// Queues one step. When every row is picked on the device (or no row wants logits) it
    /// returns [`Launched::InFlight`] without waiting: the ids come back asynchronously into
    /// pinned memory and [`StepInFlight::collect`] waits for them. A step with a full-logits row
    /// downloads them here and returns [`Launched::Ready`].
    fn step(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Launched, CudaError> {
        let t = batch.num_tokens();
        let s = batch.seqs.len();
        if t == 0 || t > self.max_tokens || s > self.max_seqs {
            return Err(CudaError::Shape(format!(
                "batch of {t} tokens / {s} sequences (limits {} / {})",
                self.max_tokens, self.max_seqs
            )));
        }
        if self.in_flight.rows.is_some() {
            return Err(CudaError::Shape("a step was launched before the one in flight was collected".into()));
        }
        let vocab = self.cfg.vocab_size;
        // Picked rows: the token is chosen on the device and one id per row comes back; the
        // logits are downloaded only when some row needs them (logprobs, forks). The pick
        // parameters go up before the forward is queued: an upload from pageable memory may
        // wait for the stream, and must not wait for this step.
        let picks: Vec<Option<&TokenPick>> = (0..batch.seqs.iter().filter(|q| q.wants_logits).count())
            .map(|i| match requests.get(i) {
                Some(RowRequest::Pick(p)) => Some(p),
                _ => None,
            })
            .collect();
        if picks.iter().any(Option::is_some) {
            let mut packed = pack_picks(&picks, vocab)?;
            packed.resize(packed.len().next_multiple_of(4), 0);
            if self.act.pick_params.bytes() < packed.len() {
                self.act.pick_params =
                    DeviceTensor::zeros(&self.gpu, &[packed.len().next_power_of_two() / 4], DType::U32)?;
            }
            self.act.pick_params.upload_at(&self.gpu, 0, &packed)?;
        }
        let decode = batch.seqs.iter().all(|q| q.len == 1 && q.wants_logits);
        let bucket = GRAPH_BUCKETS.iter().copied().find(|&b| b >= s && b <= self.max_seqs && b <= self.max_tokens);
        let n_rows;
        // Rows the forward computed logits for: the padded bucket on the graph path. The
        // all-gathered layout [world, computed_rows, vocab / world] depends on it.
        let computed_rows;
        match bucket.filter(|_| decode) {
            Some(b) => {
                // Decode: padded to a bucket, fixed attention plan (max_model_len), replayed as a graph.
                let (meta, host, _ctx, rows) = self.pack(batch, b, b, self.max_blocks_per_seq)?;
                n_rows = rows;
                computed_rows = b;
                self.act.meta.upload_at(&self.gpu, 0, &host)?;
                if !self.graphs.contains_key(&b) {
                    let views = self.views(&meta, b, self.max_model_len)?;
                    // Run once eagerly (cuBLAS picks its kernels), then capture.
                    self.launch_forward(&views)?;
                    self.gpu
                        .stream
                        .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                    let captured = self.launch_forward(&views);
                    let graph = self.gpu.stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))?;
                    captured?;
                    let graph = graph.ok_or_else(|| CudaError::Shape("graph capture produced no graph".into()))?;
                    tracing::debug!(batch = b, "captured decode graph");
                    self.graphs.insert(b, DecodeGraph(graph));
                }
                self.graphs[&b].0.launch()?;
            }
            None => {
                let stride = batch.seqs.iter().map(|q| q.block_table.len()).max().unwrap_or(1).max(1);
                let (meta, host, ctx, rows) = self.pack(batch, t, s, stride)?;
                n_rows = rows;
                computed_rows = rows;
                self.act.meta.upload_at(&self.gpu, 0, &host)?;
                let views = self.views(&meta, rows, ctx)?;
                self.launch_forward(&views)?;
            }
        }
        debug_assert_eq!(n_rows, picks.len());
        if n_rows == 0 {
            // A prompt chunk that wants no logits: nothing comes back but the end of the step.
            self.in_flight.queue_copy(&self.gpu, &self.act.sampled, 0)?;
            return Ok(Launched::InFlight);
        }
        let (world, vl) = (self.shard.world, self.dims.vocab);
        // With tp > 1 the gathered logits are [world, rows, vocab / world].
        let (logits, shards) = if world > 1 {
            (self.act.gathered.r().reshape(&[world * computed_rows, vl])?, world)
        } else {
            (self.act.logits.rows(0, computed_rows)?, 1)
        };
        let mut out: Vec<Option<RowOutput>> = (0..n_rows).map(|_| None).collect();
        if picks.iter().any(Option::is_some) {
            let params = self.act.pick_params.r();
            self.gpu.pick_tokens(&self.act.sampled.rows(0, n_rows)?, &logits, computed_rows, shards, &params)?;
            if picks.iter().all(Option::is_some) {
                // Only ids come back: queue their copy and let the host go on meanwhile.
                self.in_flight.queue_copy(&self.gpu, &self.act.sampled, n_rows)?;
                return Ok(Launched::InFlight);
            }
            let ids = self.act.sampled.download_u32(&self.gpu, n_rows)?;
            for (i, id) in ids.into_iter().enumerate() {
                if picks[i].is_some() {
                    out[i] = Some(RowOutput::Token(id));
                }
            }
        }
        if picks.iter().any(Option::is_none) {
            let flat = if world > 1 {
                self.act.gathered.download_f32(&self.gpu, world * computed_rows * vl)?
            } else {
                self.act.logits.download_f32(&self.gpu, n_rows * vocab)?
            };
            for (r, slot) in out.iter_mut().enumerate().filter(|(_, o)| o.is_none()) {
                let mut row = Vec::with_capacity(vocab);
                for k in 0..shards {
                    let at = (k * computed_rows + r) * vl;
                    row.extend_from_slice(&flat[at..at + vl]);
                }
                *slot = Some(RowOutput::Logits(row));
            }
        }
        Ok(Launched::Ready(out.into_iter().flatten().collect()))
    }
}

impl Drop for CudaRunner {
    fn drop(&mut self) {
        // Graphs that captured NCCL calls must go before the communicator (a field, dropped
        // after this), and queued work must finish before buffers are freed.
        let _ = self.gpu.synchronize();
        self.graphs.clear();
    }
}

/// The host side of a step [`CudaRunner`] left in flight: page-locked memory its picked ids
/// are copied into (allocated at the first such step), the event recorded after that copy, and
/// how many ids the step returns (`None`: no step in flight).
#[derive(Default)]
struct StepInFlight {
    ids: Option<cudarc::driver::PinnedHostSlice<u32>>,
    done: Option<cudarc::driver::CudaEvent>,
    rows: Option<usize>,
}

impl StepInFlight {
    /// Queues, after the work already on `gpu`'s stream, an asynchronous copy of the first
    /// `rows` ids of `sampled` (u32 on the device) to the host and then the event `collect`
    /// waits on. Returns at once.
    fn queue_copy(&mut self, gpu: &Gpu, sampled: &DeviceTensor, rows: usize) -> Result<(), CudaError> {
        if sampled.dtype() != DType::U32 || rows > sampled.numel() {
            return Err(CudaError::Shape(format!(
                "copy of {rows} ids from {:?} {:?}",
                sampled.dtype(),
                sampled.shape()
            )));
        }
        if rows > 0 {
            if self.ids.as_ref().is_none_or(|h| h.len() < rows) {
                // Flags 0: cached page-locked memory (write-combined memory is slow for the host
                // to read).
                // SAFETY: the allocation comes uninitialised; it is zeroed through its raw
                // pointer before any slice of it is made.
                let mut host = unsafe { gpu.ctx.alloc_pinned_with_flags::<u32>(sampled.numel(), 0) }?;
                let ptr = host.as_mut_ptr()?;
                // SAFETY: `ptr` points to `host.len()` u32 of this live allocation.
                unsafe { std::ptr::write_bytes(ptr, 0, host.len()) };
                self.ids = Some(host);
            }
            let host = match self.ids.as_mut() {
                Some(h) => h.as_mut_slice()?,
                None => return Err(CudaError::Shape("no pinned id buffer".into())),
            };
            let dst = &mut host[..rows];
            // SAFETY: `sampled` is a live allocation of this context holding at least `rows` u32;
            // `dst` is page-locked host memory owned by this runner that nothing touches until
            // `collect` has waited for the event recorded below; the copy is ordered after the
            // pick kernel on the GPU's only stream. (cudarc's own event tracking, which would
            // order it otherwise, is off for this context.)
            unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, sampled.addr(), gpu.stream.cu_stream()) }?;
        }
        let done = match self.done.take() {
            Some(event) => event,
            None => gpu.ctx.new_event(None)?,
        };
        done.record(&gpu.stream)?;
        self.done = Some(done);
        self.rows = Some(rows);
        Ok(())
    }

    /// Waits for the step in flight (device errors of the step surface here) and returns the
    /// ids it picked.
    fn collect(&mut self) -> Result<Vec<u32>, CudaError> {
        let rows = self.rows.take().ok_or_else(|| CudaError::Shape("collect called with no step in flight".into()))?;
        if let Some(done) = &self.done {
            done.synchronize()?;
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        let host = self.ids.as_ref().ok_or_else(|| CudaError::Shape("no pinned id buffer".into()))?.as_slice()?;
        Ok(host[..rows].to_vec())
    }
}

impl ModelRunner for CudaRunner {
    fn kv_layout(&self) -> KvCacheLayout {
        self.layout
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<StepLogits, ModelError> {
        let rows = RowOutput::into_logits(self.forward_sample(batch, &[])?)?;
        Ok(StepLogits { vocab_size: self.cfg.vocab_size, rows })
    }

    fn forward_sample(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Vec<RowOutput>, ModelError> {
        match self.step(batch, requests)? {
            Launched::Ready(rows) => Ok(rows),
            Launched::InFlight => self.collect(),
        }
    }

    /// Queues the step and returns while the GPU runs it when every row is picked on the
    /// device (the usual decode step); steps with a full-logits row come back ready.
    fn launch(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Launched, ModelError> {
        Ok(self.step(batch, requests)?)
    }

    fn collect(&mut self) -> Result<Vec<RowOutput>, ModelError> {
        Ok(self.in_flight.collect()?.into_iter().map(RowOutput::Token).collect())
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), ModelError> {
        let n = self.layout.num_blocks as u32;
        if src >= n || dst >= n {
            return Err(ModelError::InvalidBatch(format!("copy_block {src} -> {dst} with {n} blocks")));
        }
        let per_block = self.layout.block_size * self.layout.num_kv_heads * self.layout.head_dim * 2;
        for layer in &self.layers {
            for cache in [&layer.k_cache, &layer.v_cache] {
                cache
                    .copy_within(&self.gpu, src as usize * per_block, dst as usize * per_block, per_block)
                    .map_err(ModelError::from)?;
            }
        }
        Ok(())
    }

    fn device_name(&self) -> String {
        format!("cuda:{}", self.gpu.ordinal)
    }
}
