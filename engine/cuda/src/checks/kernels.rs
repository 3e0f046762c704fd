//! The per-kernel GPU self-check used by `llmd-cuda-check kernels`: every kernel the runner
//! launches besides attention and token picking (checked by `llmd-cuda-check attention` and
//! `pick`) runs on deterministic random inputs and is compared with the CPU path of
//! llmd-models on the same bf16-rounded inputs.
//!
//! | GPU | CPU path compared against |
//! |---|---|
//! | [`Gpu::embedding_shard`] | a row lookup written here (the CPU model's lookup is candle's `index_select` inside `CausalLm::forward`, not a function of its own) |
//! | [`Gpu::add_rmsnorm`] | the decoder layer's residual add, then `RmsNorm::forward` |
//! | [`Gpu::qkv_rope_cache`] | the bias add of `Linear`, `RmsNorm` per head (q/k norm), `Rope::apply`, `PagedKvCache::write` over a `BatchPlan` |
//! | [`Gpu::silu_mul`] | `layers::silu(gate) · up`, as `Mlp::forward` computes it |
//! | [`Gpu::gather_rows`] | a row copy written here (the CPU picks logit rows inline) |
//! | [`Gpu::to_bf16`] | `half::bf16::from_f32` (round to nearest even), bit for bit |
//! | [`Gpu::linear`], [`Gpu::linear_cublas`] | `Linear::forward` (candle's f32 gemm) |
//! | [`MoeLayer::forward`] | `SparseMoe::forward` |
//!
//! The CPU modules are built by their own constructors from a throwaway safetensors file
//! holding the case's weights (f32 values that bf16 represents exactly, the same numbers the
//! GPU gets), so no CPU numerics are re-implemented here apart from the two row copies.
//!
//! A case passes when
//! 1. every output element was written: outputs are pre-filled with 0xFF bytes (NaN as bf16,
//!    0xFFFF, and as f32) and none may remain;
//! 2. no output is NaN or infinite where the CPU value is finite;
//! 3. what the kernel must leave alone is untouched: KV-cache slots of other tokens (and of a
//!    padding row with slot −1), the residual when nothing is added;
//! 4. the relative L2 error ‖gpu − cpu‖ / ‖cpu‖ and the max-norm error
//!    max |gpu − cpu| / max |cpu| are within the case's [`Tol`]: [`BF16`] for bf16 results of
//!    arithmetic, [`F32`] for f32 results, and bit equality ([`EXACT`]) for the kernels that
//!    only move or convert values (embedding, gather, `to_bf16`, the V cache without bias).

use std::cell::RefCell;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};

use llmd_models::ModelError;
use llmd_models::config::{ModelConfig, RopeConfig, RopeScaling};
use llmd_models::cpu::kv::{BatchPlan, PagedKvCache};
use llmd_models::loader::{Checkpoint, Progress, Weights};
use llmd_models::models::layers::{Linear, RmsNorm, Rope, silu};
use llmd_models::models::qwen3_moe::SparseMoe;
use llmd_models::runner::{ForwardBatch, KvCacheLayout, SeqSlice};

use crate::device::{DType, DeviceTensor, Gpu, TensorRef};
use crate::error::CudaError;
use crate::module::GEMV_MAX_T;
use crate::moe::{MoeBuffers, MoeLayer, MoeRouting};
use llmd_models::models::routing::route;
use llmd_models::spec::{GroupLimit, GroupRank, Routing, Scoring, WeightSpec, WeightStorage, gated_mlp, routed_moe};

/// Largest relative errors a case allows; zero means bit for bit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tol {
    /// Bound of ‖gpu − cpu‖₂ / ‖cpu‖₂.
    pub l2: f64,
    /// Bound of max |gpu − cpu| / max |cpu|.
    pub max: f64,
}

/// bf16 results against the f32 CPU path. One bf16 rounding (8 significant bits) errs by at most
/// 2^-8 = 3.9e-3 relative and by ~1.6e-3 in L2 over many values (measured on an H100: 1.6-1.7e-3
/// for the GEMMs, which round once). The kernels round up to four times in a row, as HF's bf16
/// path does (residual sum, normalised value, then times the weight; bias, q/k norm, then RoPE;
/// expert gate/up, SiLU, the product, the output): measured at most 4.0e-3 in L2 and 8.8e-3 in
/// the max-norm (add_rmsnorm, three roundings, whose bound is 1.2e-2); four roundings are
/// bounded by 1.6e-2. A wrong index, term or formula errs by O(1): one wrong row of 64 still
/// gives 1/8 in L2, one wrong element shows in the max-norm. The whole-model `check` allows
/// 4e-2 because there errors compound over layers.
pub const BF16: Tol = Tol { l2: 1e-2, max: 2e-2 };

/// f32 results (the GEMV and cuBLAS f32 outputs that compute router logits): the same exact
/// bf16 products summed in f32 in another order than the CPU gemm, ~1e-6 relative (measured
/// at most 1.4e-6).
pub const F32: Tol = Tol { l2: 1e-4, max: 1e-4 };

/// Values that are only moved or converted: every bit must match.
pub const EXACT: Tol = Tol { l2: 0.0, max: 0.0 };

/// The pre-fill of every output, as a bf16 element (a NaN no kernel produces: CUDA's NaN is 0x7FFF).
const SENTINEL_BF16: u16 = 0xFFFF;
/// The pre-fill as an f32 element.
const SENTINEL_F32: u32 = 0xFFFF_FFFF;

/// Outcome of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub kernel: &'static str,
    pub case: String,
    /// ‖gpu − cpu‖₂ / ‖cpu‖₂ over the compared elements.
    pub rel_err: f64,
    /// max |gpu − cpu| / max |cpu|.
    pub max_err: f64,
    pub tol: Tol,
    /// Elements compared.
    pub elements: usize,
    /// Output elements still holding the pre-fill.
    pub unwritten: usize,
    /// NaN or infinite outputs where the CPU value is finite.
    pub non_finite: usize,
    /// Elements whose bits differ from the CPU's (the criterion of bit-exact cases).
    pub mismatched: usize,
    /// Elements the kernel had to leave alone but changed.
    pub clobbered: usize,
    /// Extra facts about the case (the GEMM path taken, tokens left out).
    pub note: String,
    /// The launch or a host step failed.
    pub error: Option<String>,
    pub passed: bool,
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kernel, self.case)?;
        if let Some(e) = &self.error {
            return write!(f, " error: {e} FAIL");
        }
        write!(f, " rel_err={:.2e} max_err={:.2e}", self.rel_err, self.max_err)?;
        if self.tol == EXACT {
            write!(f, " exact ({} of {} differ)", self.mismatched, self.elements)?;
        } else {
            write!(f, " tol={:.0e}/{:.0e}", self.tol.l2, self.tol.max)?;
        }
        for (what, n) in [("unwritten", self.unwritten), ("non_finite", self.non_finite), ("clobbered", self.clobbered)]
        {
            if n > 0 {
                write!(f, " {what}={n}")?;
            }
        }
        if !self.note.is_empty() {
            write!(f, " [{}]", self.note)?;
        }
        write!(f, " {}", if self.passed { "ok" } else { "FAIL" })
    }
}

/// Runs every case on GPU `gpu_ordinal`, handing each result to `on_case` as it completes.
/// Returns whether all passed; a case whose launch fails is a failed case, not an error. Errs
/// only when the GPU cannot be opened.
pub fn run(gpu_ordinal: usize, on_case: &mut dyn FnMut(&CaseResult)) -> Result<bool, CudaError> {
    let gpu = Gpu::open(gpu_ordinal)?;
    let mut rec = Recorder { gpu: &gpu, rng: Rng(0x11d_c0de_5eed), on_case, passed: true };
    embedding(&mut rec);
    add_rmsnorm(&mut rec);
    qkv_rope_cache(&mut rec);
    silu_mul(&mut rec);
    gather_rows(&mut rec);
    to_bf16(&mut rec);
    linear(&mut rec);
    moe_route(&mut rec);
    moe(&mut rec);
    Ok(rec.passed)
}

/// Runs cases and reports them.
struct Recorder<'a> {
    gpu: &'a Gpu,
    rng: Rng,
    on_case: &'a mut dyn FnMut(&CaseResult),
    passed: bool,
}

impl Recorder<'_> {
    /// Runs one case (which may report several outputs); an error becomes a failed result.
    fn case(
        &mut self,
        kernel: &'static str,
        case: &str,
        f: impl FnOnce(&Gpu, &mut Rng) -> Result<Vec<CaseResult>, CudaError>,
    ) {
        let results = f(self.gpu, &mut self.rng).unwrap_or_else(|e| {
            vec![CaseResult {
                error: Some(e.to_string()),
                passed: false,
                ..outcome(kernel, case, EXACT, &Errors::default())
            }]
        });
        for r in &results {
            self.passed &= r.passed;
            (self.on_case)(r);
        }
    }
}

/// Deterministic test data (splitmix64), no RNG dependency. Also feeds `llmd-cuda-check
/// attention` ([`super::attention`]).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// One bf16 value (raw bits) uniform in [−amplitude, amplitude).
    pub(crate) fn bf16(&mut self, amplitude: f32) -> u16 {
        half::bf16::from_f32(self.uniform() * amplitude).to_bits()
    }

    /// `n` bf16 values (raw bits) uniform in [offset − amplitude, offset + amplitude).
    fn bf16s(&mut self, n: usize, offset: f32, amplitude: f32) -> Vec<u16> {
        (0..n).map(|_| half::bf16::from_f32(offset + self.uniform() * amplitude).to_bits()).collect()
    }

    pub(crate) fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

fn f32_of(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

fn widen(bits: &[u16]) -> Vec<f32> {
    bits.iter().map(|b| f32_of(*b)).collect()
}

fn ne_bytes<T: Copy, const N: usize>(v: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|x| to(*x)).collect()
}

/// A device input holding `v`.
fn tensor<T: Copy, const N: usize>(
    gpu: &Gpu,
    v: &[T],
    to: fn(T) -> [u8; N],
    shape: &[usize],
    dtype: DType,
) -> Result<DeviceTensor, CudaError> {
    DeviceTensor::from_bytes(gpu, &ne_bytes(v, to), shape, dtype)
}

fn bf16_tensor(gpu: &Gpu, bits: &[u16], shape: &[usize]) -> Result<DeviceTensor, CudaError> {
    tensor(gpu, bits, u16::to_ne_bytes, shape, DType::BF16)
}

/// A device tensor written by a kernel, pre-filled with the sentinel (0xFF bytes) after any
/// initial contents, held as u32 words so that it reads back whatever its element type.
struct Output {
    words: DeviceTensor,
    shape: Vec<usize>,
    dtype: DType,
}

impl Output {
    fn new(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Output, CudaError> {
        Output::with_contents(gpu, shape, dtype, &[])
    }

    /// Starts as `init` (an in/out tensor such as the residual), the sentinel after it.
    fn with_contents(gpu: &Gpu, shape: &[usize], dtype: DType, init: &[u8]) -> Result<Output, CudaError> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let words = bytes.div_ceil(4).max(1);
        let mut fill = vec![0xFFu8; words * 4];
        fill[..init.len()].copy_from_slice(init);
        let words = DeviceTensor::from_bytes(gpu, &fill, &[words], DType::U32)?;
        Ok(Output { words, shape: shape.to_vec(), dtype })
    }

    /// The buffer seen as the tensor the kernel writes (its bytes fit: `with_contents`
    /// rounds them up to whole words).
    fn r(&self) -> Result<TensorRef, CudaError> {
        self.words.r().view_bytes(0, &self.shape, self.dtype)
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// All elements of a bf16 tensor as bits, after the GPU's queued work is done.
    fn bf16(&self, gpu: &Gpu) -> Result<Vec<u16>, CudaError> {
        gpu.synchronize()?;
        let words = self.words.download_u32(gpu, self.words.numel())?;
        Ok(words.iter().flat_map(|w| [*w as u16, (*w >> 16) as u16]).take(self.numel()).collect())
    }

    /// All elements of an f32 tensor as bits.
    fn f32(&self, gpu: &Gpu) -> Result<Vec<u32>, CudaError> {
        gpu.synchronize()?;
        self.words.download_u32(gpu, self.numel())
    }

    /// The elements (bf16 or f32) as f32 with a flag for those still holding the sentinel.
    fn values(&self, gpu: &Gpu) -> Result<Vec<(f32, bool)>, CudaError> {
        Ok(match self.dtype {
            DType::F32 => self.f32(gpu)?.into_iter().map(|b| (f32::from_bits(b), b == SENTINEL_F32)).collect(),
            _ => self.bf16(gpu)?.into_iter().map(|b| (f32_of(b), b == SENTINEL_BF16)).collect(),
        })
    }
}

/// Differences of GPU outputs from the CPU values, accumulated element by element.
#[derive(Debug, Default)]
struct Errors {
    diff2: f64,
    ref2: f64,
    max_diff: f64,
    max_ref: f64,
    elements: usize,
    unwritten: usize,
    non_finite: usize,
    mismatched: usize,
    clobbered: usize,
}

impl Errors {
    /// One element: `got` from the GPU (`sentinel`: it still holds the pre-fill), `want` from the CPU.
    fn push(&mut self, got: f32, sentinel: bool, want: f32) {
        self.elements += 1;
        if sentinel {
            self.unwritten += 1;
            return;
        }
        self.mismatched += usize::from(got.to_bits() != want.to_bits());
        if !want.is_finite() {
            self.non_finite += usize::from(got != want);
            return;
        }
        if !got.is_finite() {
            self.non_finite += 1;
            return;
        }
        let d = (got as f64 - want as f64).abs();
        self.diff2 += d * d;
        self.ref2 += (want as f64).powi(2);
        self.max_diff = self.max_diff.max(d);
        self.max_ref = self.max_ref.max((want as f64).abs());
    }

    fn bf16(&mut self, got: &[u16], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "kernel check compares outputs of different lengths");
        for (g, w) in got.iter().zip(want) {
            self.push(f32_of(*g), *g == SENTINEL_BF16, *w);
        }
    }

    fn values(&mut self, got: &[(f32, bool)], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "kernel check compares outputs of different lengths");
        for ((g, sentinel), w) in got.iter().zip(want) {
            self.push(*g, *sentinel, *w);
        }
    }

    fn rel_err(&self) -> f64 {
        if self.diff2 == 0.0 { 0.0 } else { (self.diff2 / self.ref2.max(1e-300)).sqrt() }
    }

    fn max_err(&self) -> f64 {
        if self.max_diff == 0.0 { 0.0 } else { self.max_diff / self.max_ref.max(1e-300) }
    }
}

/// The result of one output compared within `tol`.
fn outcome(kernel: &'static str, case: &str, tol: Tol, e: &Errors) -> CaseResult {
    let (rel_err, max_err) = (e.rel_err(), e.max_err());
    let close = if tol == EXACT { e.mismatched == 0 } else { rel_err <= tol.l2 && max_err <= tol.max };
    CaseResult {
        kernel,
        case: case.to_string(),
        rel_err,
        max_err,
        tol,
        elements: e.elements,
        unwritten: e.unwritten,
        non_finite: e.non_finite,
        mismatched: e.mismatched,
        clobbered: e.clobbered,
        note: String::new(),
        error: None,
        passed: close && e.elements > 0 && e.unwritten == 0 && e.non_finite == 0 && e.clobbered == 0,
    }
}

/// Writes `tensors` (name, shape, f32 values) to a throwaway safetensors file and builds a CPU
/// module from it with `build`, exactly as the CPU loader does (`Weights` over a `Checkpoint`).
/// The modules copy what they load, so the file is removed before returning.
fn cpu_module<R>(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    build: impl FnOnce(&Weights) -> Result<R, ModelError>,
) -> Result<R, CudaError> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "llmd-kernel-check-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).map_err(|source| ModelError::Io { path: dir.clone(), source })?;
    let path = dir.join("model.safetensors");
    let built = (|| {
        let st =
            |e: safetensors::SafeTensorError| ModelError::Safetensors { path: path.clone(), message: e.to_string() };
        let data: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| ne_bytes(v, f32::to_le_bytes)).collect();
        let views = tensors
            .iter()
            .zip(&data)
            .map(|((name, shape, _), bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(st)?;
        safetensors::serialize_to_file(views, None, &path).map_err(st)?;
        let ckpt = Checkpoint::open_files(std::slice::from_ref(&path))?;
        let mut quiet = |_: usize, _: usize| {};
        let progress = RefCell::new(Progress::new(ckpt.len(), &mut quiet));
        build(&Weights::new(&ckpt, &progress))
    })();
    // Best effort: a leftover file in the temp folder is harmless.
    let _ = std::fs::remove_dir_all(&dir);
    Ok(built?)
}

/// One named tensor of a [`cpu_module`] checkpoint.
fn named(name: impl Into<String>, shape: &[usize], bits: &[u16]) -> (String, Vec<usize>, Vec<f32>) {
    (name.into(), shape.to_vec(), widen(bits))
}

fn embedding(rec: &mut Recorder) {
    // (case, vocab, hidden, tokens, first id of this shard, rows of this shard)
    let cases = [
        ("table 1000x512, 64 tokens", 1000, 512, 64, 0, 1000),
        ("table 300x100 (rows not 16-byte multiples), 7 tokens", 300, 100, 7, 0, 300),
        ("vocab shard 2 of 2 (ids 500..1000 here), 64 tokens", 1000, 256, 64, 500, 500),
        ("table 1000x4096, 1 token", 1000, 4096, 1, 0, 1000),
    ];
    for (name, vocab, h, t, lo, rows) in cases {
        rec.case("embedding_shard", name, |gpu, rng| {
            let table = rng.bf16s(rows * h, 0.0, 1.0);
            let ids: Vec<u32> = (0..t).map(|_| rng.below(vocab) as u32).collect();
            // The CPU path is candle's index_select inside CausalLm::forward; the shard rule
            // (zeros for other ranks' ids, summed by the all-reduce) is the GPU's own.
            let mut want = vec![0f32; t * h];
            for (row, &id) in want.chunks_exact_mut(h).zip(&ids) {
                let id = id as usize;
                if (lo..lo + rows).contains(&id) {
                    row.copy_from_slice(&widen(&table[(id - lo) * h..(id - lo + 1) * h]));
                }
            }
            let table_d = bf16_tensor(gpu, &table, &[rows, h])?;
            let ids_d = tensor(gpu, &ids, u32::to_ne_bytes, &[t], DType::U32)?;
            let out = Output::new(gpu, &[t, h], DType::BF16)?;
            gpu.embedding_shard(&out.r()?, &table_d.r(), &ids_d.r(), lo)?;
            let mut e = Errors::default();
            e.bf16(&out.bf16(gpu)?, &want);
            Ok(vec![outcome("embedding_shard", name, EXACT, &e)])
        });
    }
}

fn add_rmsnorm(rec: &mut Recorder) {
    // (tokens, hidden, add x first, eps): hidden sizes of the three block sizes the wrapper picks.
    let cases = [
        (5, 64, false, 1e-6),
        (5, 64, true, 1e-6),
        (7, 1000, true, 1e-5),
        (64, 2048, false, 1e-6),
        (64, 2048, true, 1e-6),
        (3, 4096, true, 1e-5),
        (2, 5120, true, 1e-6),
    ];
    for (t, h, add, eps) in cases {
        let name = format!("T={t} H={h} {} eps={eps:.0e}", if add { "residual+=x" } else { "no add" });
        rec.case("add_rmsnorm", &name, |gpu, rng| {
            let residual = rng.bf16s(t * h, 0.0, 3.0);
            let x = add.then(|| rng.bf16s(t * h, 0.0, 2.0));
            let weight = rng.bf16s(h, 1.0, 0.5);
            // CPU: DecoderLayer::forward's `x += a` in f32, then the layer's RmsNorm.
            let mut sum = widen(&residual);
            if let Some(x) = &x {
                for (s, v) in sum.iter_mut().zip(x) {
                    *s += f32_of(*v);
                }
            }
            let norm = cpu_module(&[named("weight", &[h], &weight)], |w| RmsNorm::new(w, h, eps))?;
            let want = norm.forward(&sum);

            let res_d = Output::with_contents(gpu, &[t, h], DType::BF16, &ne_bytes(&residual, u16::to_ne_bytes))?;
            let x_d = x.as_ref().map(|x| bf16_tensor(gpu, x, &[t, h])).transpose()?;
            let w_d = bf16_tensor(gpu, &weight, &[h])?;
            let out = Output::new(gpu, &[t, h], DType::BF16)?;
            let x_ref = x_d.as_ref().map(DeviceTensor::r);
            gpu.add_rmsnorm(&out.r()?, &res_d.r()?, x_ref.as_ref(), &w_d.r(), eps as f32)?;
            let mut e = Errors::default();
            e.bf16(&out.bf16(gpu)?, &want);
            let res_after = res_d.bf16(gpu)?;
            let mut results = Vec::new();
            if add {
                results.push(outcome("add_rmsnorm", &name, BF16, &e));
                let mut r = Errors::default();
                r.bf16(&res_after, &sum);
                results.push(outcome("add_rmsnorm", &format!("{name}: residual"), BF16, &r));
            } else {
                e.clobbered = res_after.iter().zip(&residual).filter(|(a, b)| a != b).count();
                results.push(outcome("add_rmsnorm", &name, BF16, &e));
            }
            Ok(results)
        });
    }
}

/// One `qkv_rope_cache` geometry.
struct QkvCase {
    name: &'static str,
    hq: usize,
    hkv: usize,
    d: usize,
    bias: bool,
    qk_norm: bool,
    rope: RopeConfig,
    /// (context_before, len) of each sequence.
    seqs: &'static [(usize, usize)],
    /// One more row with slot −1, as the runner pads captured decode graphs: its q is written,
    /// no cache slot is.
    padding_row: bool,
}

/// cos | sin of every position below `max_pos` from the CPU `Rope`'s inverse frequencies, laid
/// out as the runner builds its table (runner.rs, `load_rank`).
fn rope_table(rope: &Rope, max_pos: usize) -> Vec<f32> {
    let mut table = Vec::with_capacity(max_pos * 2 * rope.inv_freq().len());
    for pos in 0..max_pos {
        let (sin, cos): (Vec<f32>, Vec<f32>) = rope.inv_freq().iter().map(|f| (pos as f32 * f).sin_cos()).unzip();
        table.extend_from_slice(&cos);
        table.extend_from_slice(&sin);
    }
    table
}

fn qkv_rope_cache(rec: &mut Recorder) {
    let plain = |theta| RopeConfig { theta, scaling: RopeScaling::Default };
    let llama3 = RopeConfig {
        theta: 500_000.0,
        scaling: RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
    };
    let cases = [
        QkvCase {
            name: "plain (Llama): 8 q / 2 kv heads, D 128",
            hq: 8,
            hkv: 2,
            d: 128,
            bias: false,
            qk_norm: false,
            rope: plain(10_000.0),
            seqs: &[(0, 5), (37, 1), (16, 2)],
            padding_row: false,
        },
        QkvCase {
            name: "bias (Qwen2): 14 q / 2 kv heads, D 64",
            hq: 14,
            hkv: 2,
            d: 64,
            bias: true,
            qk_norm: false,
            rope: plain(1_000_000.0),
            seqs: &[(3, 4), (100, 1)],
            padding_row: true,
        },
        QkvCase {
            name: "q/k norm (Qwen3): 16 q / 4 kv heads, D 128",
            hq: 16,
            hkv: 4,
            d: 128,
            bias: false,
            qk_norm: true,
            rope: plain(1_000_000.0),
            seqs: &[(0, 7), (250, 1)],
            padding_row: true,
        },
        QkvCase {
            name: "llama3-scaled table: 32 q / 8 kv heads, D 128, positions to 20k",
            hq: 32,
            hkv: 8,
            d: 128,
            bias: false,
            qk_norm: false,
            rope: llama3,
            seqs: &[(20_000, 1), (9_000, 3), (0, 2), (8_190, 4)],
            padding_row: false,
        },
        QkvCase {
            name: "bias + q/k norm, MQA: 4 q / 1 kv head, D 96",
            hq: 4,
            hkv: 1,
            d: 96,
            bias: true,
            qk_norm: true,
            rope: plain(10_000.0),
            seqs: &[(5, 3), (0, 1)],
            padding_row: false,
        },
        QkvCase {
            name: "q/k norm, MHA: 8 q / 8 kv heads, D 256",
            hq: 8,
            hkv: 8,
            d: 256,
            bias: false,
            qk_norm: true,
            rope: plain(10_000.0),
            seqs: &[(30, 2), (1, 1)],
            padding_row: true,
        },
    ];
    for c in &cases {
        rec.case("qkv_rope_cache", c.name, |gpu, rng| qkv_case(gpu, rng, c));
    }
}

fn qkv_case(gpu: &Gpu, rng: &mut Rng, c: &QkvCase) -> Result<Vec<CaseResult>, CudaError> {
    let (hq, hkv, d) = (c.hq, c.hkv, c.d);
    let width = (hq + 2 * hkv) * d;
    let (block_size, num_blocks) = (16, 64);
    // Blocks that receive new tokens are distinct and shuffled; blocks holding only the cached
    // prefix may be anything (this step reads none of them).
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut free);
    let mut batch = ForwardBatch::default();
    for &(before, len) in c.seqs {
        let total = before + len;
        let table = (0..total.div_ceil(block_size))
            .map(|b| if b >= before / block_size { free.pop() } else { Some(rng.below(num_blocks) as u32) })
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| CudaError::Shape(format!("kernel check: {num_blocks} KV blocks are too few")))?;
        batch.seqs.push(SeqSlice {
            start: batch.tokens.len(),
            len,
            context_before: before,
            block_table: table,
            wants_logits: false,
        });
        batch.tokens.extend(std::iter::repeat_n(0, len));
        batch.positions.extend((before..total).map(|p| p as u32));
    }
    let layout =
        KvCacheLayout { num_layers: 1, num_kv_heads: hkv, head_dim: d, block_size, num_blocks, dtype_bytes: 4 };
    let plan = BatchPlan::new(&batch, &layout, 1)?;
    let t = batch.tokens.len();
    let mut positions = batch.positions.clone();
    let mut slots: Vec<i64> = plan.token_slot.iter().map(|&s| s as i64).collect();
    if c.padding_row {
        positions.push(3);
        slots.push(-1);
    }
    let rows = positions.len();

    let qkv = rng.bf16s(rows * width, 0.0, 2.0);
    let bias = c.bias.then(|| rng.bf16s(width, 0.0, 0.5));
    let norms = c.qk_norm.then(|| (rng.bf16s(d, 1.0, 0.3), rng.bf16s(d, 1.0, 0.3)));
    let eps = 1e-6;

    // CPU: Attention::forward after the projections (Linear adds its bias in f32), then the
    // cache write of the real tokens.
    let mut x = widen(&qkv);
    if let Some(b) = &bias {
        for row in x.chunks_exact_mut(width) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += f32_of(*bv);
            }
        }
    }
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for row in x.chunks_exact(width) {
        q.extend_from_slice(&row[..hq * d]);
        k.extend_from_slice(&row[hq * d..(hq + hkv) * d]);
        v.extend_from_slice(&row[(hq + hkv) * d..]);
    }
    if let Some((qn, kn)) = &norms {
        let tensors = [named("q_norm.weight", &[d], qn), named("k_norm.weight", &[d], kn)];
        let (qn, kn) = cpu_module(&tensors, |w| {
            Ok((RmsNorm::new(&w.pp("q_norm"), d, eps)?, RmsNorm::new(&w.pp("k_norm"), d, eps)?))
        })?;
        qn.forward_inplace(&mut q);
        kn.forward_inplace(&mut k);
    }
    let rope = Rope::new(&c.rope, d);
    rope.apply(&mut q, &positions, hq);
    rope.apply(&mut k, &positions, hkv);
    let mut cache = PagedKvCache::new(layout)?;
    cache.write(0, &k[..t * hkv * d], &v[..t * hkv * d], &plan);

    // GPU.
    let max_pos = positions.iter().copied().max().unwrap_or(0) as usize + 1;
    let cos_sin = tensor(gpu, &rope_table(&rope, max_pos), f32::to_ne_bytes, &[max_pos, d], DType::F32)?;
    let qkv_d = bf16_tensor(gpu, &qkv, &[rows, width])?;
    let bias_d = bias.as_ref().map(|b| bf16_tensor(gpu, b, &[width])).transpose()?;
    let norms_d = match &norms {
        Some((qn, kn)) => Some((bf16_tensor(gpu, qn, &[d])?, bf16_tensor(gpu, kn, &[d])?)),
        None => None,
    };
    let pos_i32: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
    let pos_d = tensor(gpu, &pos_i32, i32::to_ne_bytes, &[rows], DType::I32)?;
    let slots_d = tensor(gpu, &slots, i64::to_ne_bytes, &[rows], DType::I64)?;
    let q_out = Output::new(gpu, &[rows, hq, d], DType::BF16)?;
    let cache_shape = [num_blocks, block_size, hkv, d];
    let k_cache = Output::new(gpu, &cache_shape, DType::BF16)?;
    let v_cache = Output::new(gpu, &cache_shape, DType::BF16)?;
    let bias_r = bias_d.as_ref().map(DeviceTensor::r);
    let qn_r = norms_d.as_ref().map(|(qn, _)| qn.r());
    let kn_r = norms_d.as_ref().map(|(_, kn)| kn.r());
    gpu.qkv_rope_cache(
        &qkv_d.r(),
        bias_r.as_ref(),
        qn_r.as_ref(),
        kn_r.as_ref(),
        eps as f32,
        &cos_sin.r(),
        &pos_d.r(),
        &slots_d.r(),
        &q_out.r()?,
        &k_cache.r()?,
        &v_cache.r()?,
    )?;

    let mut eq = Errors::default();
    eq.bf16(&q_out.bf16(gpu)?, &q);
    let mut results = vec![outcome("qkv_rope_cache", &format!("{}: q", c.name), BF16, &eq)];
    let mut written = vec![false; num_blocks * block_size];
    for &s in &plan.token_slot {
        written[s] = true;
    }
    let slot_width = hkv * d;
    // V is a copy unless a bias was added.
    let v_tol = if c.bias { BF16 } else { EXACT };
    for (what, out, cpu, tol) in [("K", &k_cache, cache.k(0), BF16), ("V", &v_cache, cache.v(0), v_tol)] {
        let got = out.bf16(gpu)?;
        let mut e = Errors::default();
        for (s, &w) in written.iter().enumerate() {
            let span = s * slot_width..(s + 1) * slot_width;
            if w {
                e.bf16(&got[span.clone()], &cpu[span]);
            } else {
                e.clobbered += got[span].iter().filter(|&&b| b != SENTINEL_BF16).count();
            }
        }
        let case = format!("{}: {what} cache ({t} slots written of {})", c.name, written.len());
        results.push(outcome("qkv_rope_cache", &case, tol, &e));
    }
    Ok(results)
}

fn silu_mul(rec: &mut Recorder) {
    for (t, i) in [(1, 14336), (7, 1000), (64, 768)] {
        let name = format!("T={t} I={i}");
        rec.case("silu_mul", &name, |gpu, rng| {
            let gate_up = rng.bf16s(t * 2 * i, 0.0, 4.0);
            // CPU: Mlp::forward's `silu(gate) * up`.
            let want: Vec<f32> = gate_up
                .chunks_exact(2 * i)
                .flat_map(|row| (0..i).map(move |j| silu(f32_of(row[j])) * f32_of(row[i + j])))
                .collect();
            let gu_d = bf16_tensor(gpu, &gate_up, &[t, 2 * i])?;
            let out = Output::new(gpu, &[t, i], DType::BF16)?;
            gpu.silu_mul(&out.r()?, &gu_d.r())?;
            let mut e = Errors::default();
            e.bf16(&out.bf16(gpu)?, &want);
            Ok(vec![outcome("silu_mul", &name, BF16, &e)])
        });
    }
}

fn gather_rows(rec: &mut Recorder) {
    // (rows of x, width, rows gathered)
    for (n, w, r) in [(64, 4096, 7), (300, 100, 64), (5, 2048, 1)] {
        let name = format!("{r} of {n} rows, width {w}");
        rec.case("gather_rows", &name, |gpu, rng| {
            let x = rng.bf16s(n * w, 0.0, 1.0);
            let rows: Vec<i32> = (0..r).map(|_| rng.below(n) as i32).collect();
            // The CPU copies the rows that need logits inline (CausalLm::forward).
            let want: Vec<f32> = rows.iter().flat_map(|&i| widen(&x[i as usize * w..(i as usize + 1) * w])).collect();
            let x_d = bf16_tensor(gpu, &x, &[n, w])?;
            let rows_d = tensor(gpu, &rows, i32::to_ne_bytes, &[r], DType::I32)?;
            let out = Output::new(gpu, &[r, w], DType::BF16)?;
            gpu.gather_rows(&out.r()?, &x_d.r(), &rows_d.r())?;
            let mut e = Errors::default();
            e.bf16(&out.bf16(gpu)?, &want);
            Ok(vec![outcome("gather_rows", &name, EXACT, &e)])
        });
    }
}

fn to_bf16(rec: &mut Recorder) {
    // Ties (1 + 2^-8 rounds to even 1, 1 + 3·2^-8 up), overflow to infinity, subnormals, zeros.
    let specials: [u32; 14] = [
        0x0000_0000,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x0080_0000,
        0x0000_0001,
        0x807f_ffff,
        0x3f80_8000,
        0x3f81_8000,
        0xbf80_8000,
        0x7f7f_8000,
        0x3f80_7fff,
    ];
    let f32_case = |name: &'static str, n: usize| {
        move |gpu: &Gpu, rng: &mut Rng| -> Result<Vec<CaseResult>, CudaError> {
            let mut x: Vec<f32> = specials.iter().map(|&b| f32::from_bits(b)).collect();
            while x.len() < n {
                // Random bits over the whole exponent range (NaN excluded), every other value a
                // plain one of typical size.
                let bits = rng.next_u64() as u32;
                if x.len().is_multiple_of(2) && (bits >> 23) & 0xff != 0xff {
                    x.push(f32::from_bits(bits));
                } else {
                    x.push(rng.uniform() * 8.0);
                }
            }
            let want: Vec<f32> = x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
            let x_d = tensor(gpu, &x, f32::to_ne_bytes, &[n], DType::F32)?;
            let out = Output::new(gpu, &[n], DType::BF16)?;
            gpu.to_bf16(&out.r()?, &x_d.r(), false)?;
            let mut e = Errors::default();
            e.bf16(&out.bf16(gpu)?, &want);
            Ok(vec![outcome("to_bf16", name, EXACT, &e)])
        }
    };
    let name = "f32, 1,000,003 values incl. ties, subnormals, overflow";
    rec.case("to_bf16", name, f32_case(name, 1_000_003));
    // More elements than the capped grid covers in one pass: the grid-stride loop.
    let name = "f32, 65,535·256 + 777 values (grid-stride tail)";
    rec.case("to_bf16", name, f32_case(name, 65_535 * 256 + 777));
    let name = "f16, every finite value and both infinities";
    rec.case("to_bf16", name, |gpu, _| {
        let x: Vec<u16> = (0..=u16::MAX).filter(|b| (b >> 10) & 0x1f != 0x1f || b & 0x3ff == 0).collect();
        let want: Vec<f32> =
            x.iter().map(|&b| half::bf16::from_f32(half::f16::from_bits(b).to_f32()).to_f32()).collect();
        // f16 staged as 2-byte words, as the loader does.
        let x_d = bf16_tensor(gpu, &x, &[x.len()])?;
        let out = Output::new(gpu, &[x.len()], DType::BF16)?;
        gpu.to_bf16(&out.r()?, &x_d.r(), true)?;
        let mut e = Errors::default();
        e.bf16(&out.bf16(gpu)?, &want);
        Ok(vec![outcome("to_bf16", name, EXACT, &e)])
    });
}

fn linear(rec: &mut Recorder) {
    // (cuBLAS whatever the batch, tokens, in_features, out_features, f32 output)
    let cases = [
        (false, 1, 4096, 1000, false),
        (false, 1, 4096, 1000, true),
        (false, 2, 2048, 515, false),
        (false, 2, 2048, 515, true),
        (false, 7, 1024, 1536, false),
        (false, 64, 4096, 512, false),
        (false, 64, 1024, 128, true),
        (false, 1, 100, 300, false),
        (false, 7, 57, 96, false),
        (true, 1, 4096, 1000, false),
        (true, 2, 2048, 515, true),
        (true, 7, 100, 300, false),
        (true, 64, 1024, 3000, false),
    ];
    for (cublas, t, k, n, f32_out) in cases {
        let kernel = if cublas { "linear_cublas" } else { "linear" };
        let name = format!("T={t} K={k} N={n} {}", if f32_out { "f32" } else { "bf16" });
        rec.case(kernel, &name, |gpu, rng| {
            let x = rng.bf16s(t * k, 0.0, 1.0);
            let w = rng.bf16s(n * k, 0.0, 0.05);
            let lin = cpu_module(&[named("weight", &[n, k], &w)], |wv| Linear::new(wv, k, n, false))?;
            let want = lin.forward(&widen(&x), t)?;
            let x_d = bf16_tensor(gpu, &x, &[t, k])?;
            let w_d = bf16_tensor(gpu, &w, &[n, k])?;
            let out = Output::new(gpu, &[t, n], if f32_out { DType::F32 } else { DType::BF16 })?;
            if cublas {
                gpu.linear_cublas(&out.r()?, &x_d.r(), &w_d.r())?;
            } else {
                gpu.linear(&out.r()?, &x_d.r(), &w_d.r())?;
            }
            let mut e = Errors::default();
            e.values(&out.values(gpu)?, &want);
            let mut r = outcome(kernel, &name, if f32_out { F32 } else { BF16 }, &e);
            // The wrapper's own rule: GEMV for small batches when K is a multiple of 8.
            let gemv = !cublas && t <= GEMV_MAX_T && k.is_multiple_of(8);
            r.note = if gemv { "GEMV kernel".into() } else { "cuBLAS".into() };
            Ok(vec![r])
        });
    }
}

/// One routing rule on random logits.
struct RouteCase {
    name: &'static str,
    tokens: usize,
    experts: usize,
    top_k: usize,
    routing: Routing,
}

fn moe_route(rec: &mut Recorder) {
    let bias = |e: usize| {
        Some(WeightSpec {
            name: "e_score_correction_bias".into(),
            shape: vec![e],
            storage: WeightStorage::Float(llmd_models::Dtype::Float32),
        })
    };
    let groups = |groups, keep, rank| Some(GroupLimit { groups, keep, rank });
    let routing = |scoring, correction_bias, group_limit, renormalize, scaling| Routing {
        scoring,
        correction_bias,
        group_limit,
        renormalize,
        scaling,
    };
    let cases = [
        RouteCase {
            name: "Qwen3-MoE: softmax, top-8 of 128, renormalised",
            tokens: 64,
            experts: 128,
            top_k: 8,
            routing: routing(Scoring::Softmax, None, None, true, 1.0),
        },
        RouteCase {
            name: "DeepSeek-V2: softmax, 8 groups by their best, keep 3, top-6 of 160, scaled 16",
            tokens: 64,
            experts: 160,
            top_k: 6,
            routing: routing(Scoring::Softmax, None, groups(8, 3, GroupRank::Max), false, 16.0),
        },
        RouteCase {
            name: "DeepSeek-V3: sigmoid + correction bias, 8 groups by their two best, keep 4, top-8 of 256, renormalised, scaled 2.5",
            tokens: 64,
            experts: 256,
            top_k: 8,
            routing: routing(Scoring::Sigmoid, bias(256), groups(8, 4, GroupRank::TopTwoSum), true, 2.5),
        },
        RouteCase {
            name: "sigmoid + correction bias, one group kept of 4 (dropped groups compete with 0), top-4 of 64",
            tokens: 64,
            experts: 64,
            top_k: 4,
            routing: routing(Scoring::Sigmoid, bias(64), groups(4, 1, GroupRank::Max), false, 1.0),
        },
    ];
    for c in &cases {
        rec.case("moe_route", c.name, |gpu, rng| route_case(gpu, rng, c));
    }
}

/// Logits on a grid of 1/16 (and a bias on a grid of 1/8): distinct choice scores are far
/// apart, equal ones are equal on both sides, so the expert ids must match exactly.
fn route_case(gpu: &Gpu, rng: &mut Rng, c: &RouteCase) -> Result<Vec<CaseResult>, CudaError> {
    let (t, e, k) = (c.tokens, c.experts, c.top_k);
    let logits: Vec<f32> = (0..t * e).map(|_| (rng.uniform() * 64.0).round() / 16.0).collect();
    let bias: Option<Vec<f32>> =
        c.routing.correction_bias.as_ref().map(|_| (0..e).map(|_| (rng.uniform() * 4.0).round() / 8.0).collect());
    let want: Vec<Vec<(usize, f32)>> =
        logits.chunks_exact(e).map(|row| route(row, &c.routing, bias.as_deref(), k)).collect();
    let logits_d = tensor(gpu, &logits, f32::to_ne_bytes, &[t, e], DType::F32)?;
    let ids = DeviceTensor::zeros(gpu, &[t, k], DType::I32)?;
    let weights = DeviceTensor::zeros(gpu, &[t, k], DType::F32)?;
    let routing = MoeRouting::new(gpu, &c.routing, e, bias.as_deref())?;
    gpu.moe_route(&ids.r(), &weights.r(), &logits_d.r(), &routing, k)?;
    let (got_ids, got_w) = (ids.download_i32(gpu, t * k)?, weights.download_f32(gpu, t * k)?);
    let mut err = Errors::default();
    let mut rerouted = 0;
    for (ti, w) in want.iter().enumerate() {
        let row = ti * k..(ti + 1) * k;
        let ids_ok = w.iter().zip(&got_ids[row.clone()]).all(|((i, _), g)| *i as i32 == *g);
        rerouted += usize::from(!ids_ok);
        for ((_, wv), g) in w.iter().zip(&got_w[row]) {
            err.push(*g, false, *wv);
        }
    }
    let mut r = outcome("moe_route", c.name, F32, &err);
    if rerouted > 0 {
        r.passed = false;
        r.note = format!("{rerouted} of {t} tokens chose other experts than the CPU rule");
    }
    Ok(vec![r])
}

/// One MoE layer shape.
struct MoeCase {
    t: usize,
    experts: usize,
    top_k: usize,
    hidden: usize,
    inter: usize,
    renormalize: bool,
    /// Tensor-parallel ranks simulated on this GPU: each holds its share of the experts and
    /// their partial outputs are summed, as the all-reduce does.
    ranks: usize,
    /// Shared experts, as a shared MLP of `shared × inter` (0: none).
    shared: usize,
}

fn moe(rec: &mut Recorder) {
    let case = |t, experts, top_k, hidden, inter, renormalize, ranks| MoeCase {
        t,
        experts,
        top_k,
        hidden,
        inter,
        renormalize,
        ranks,
        shared: 0,
    };
    let shared = |c: MoeCase, shared| MoeCase { shared, ..c };
    let cases = [
        case(1, 16, 4, 256, 128, true, 1),
        case(2, 16, 4, 256, 128, false, 1),
        case(7, 64, 8, 512, 256, true, 1),
        case(64, 128, 8, 256, 64, true, 1),
        case(7, 16, 4, 256, 128, true, 2),
        case(64, 64, 8, 256, 128, false, 4),
        // Grouped GEMM tiles: 16-row m-blocks in wide tiles (enough CTAs), 32-, 64- and 128-row
        // m-blocks, several m-blocks per expert, hidden and intermediate sizes that are not whole
        // tiles.
        case(48, 16, 4, 256, 128, true, 1),
        case(64, 128, 8, 512, 512, true, 1),
        case(300, 16, 4, 264, 200, true, 1),
        case(700, 32, 8, 512, 96, false, 2),
        case(2100, 8, 2, 128, 64, true, 1),
        // Shared experts (DeepSeekMoE): slices of the shared MLP as extra slots, on the last rank.
        shared(case(7, 16, 4, 256, 128, true, 1), 2),
        shared(case(64, 64, 6, 256, 128, true, 2), 1),
        shared(case(300, 16, 4, 256, 128, false, 1), 2),
    ];
    for c in &cases {
        let name = format!(
            "T={} E={} top-{} H={} I={}{}{}",
            c.t,
            c.experts,
            c.top_k,
            c.hidden,
            c.inter,
            if c.renormalize { " renormalized" } else { "" },
            if c.ranks > 1 { format!(", experts split over {} ranks, outputs summed", c.ranks) } else { String::new() }
        ) + &if c.shared > 0 { format!(", shared MLP of {} x I", c.shared) } else { String::new() };
        rec.case("moe_layer", &name, |gpu, rng| moe_case(gpu, rng, c, &name));
    }
}

/// Whether the k-th and (k+1)-th largest router logits of a row are so close that the GPU's
/// f32 logits (another summation order, ~1e-6 apart) may pick the other expert. Such a token
/// routes differently for a reason no kernel can fix, so it is left out of the comparison.
fn near_tie(logits: &[f32], k: usize) -> bool {
    if k >= logits.len() {
        return false;
    }
    let mut sorted = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[k - 1] - sorted[k] < 1e-4
}

fn moe_case(gpu: &Gpu, rng: &mut Rng, c: &MoeCase, name: &str) -> Result<Vec<CaseResult>, CudaError> {
    let (t, e, k, h, i) = (c.t, c.experts, c.top_k, c.hidden, c.inter);
    let x = rng.bf16s(t * h, 0.0, 1.0);
    let router = rng.bf16s(e * h, 0.0, 0.2);
    // Per expert: gate [I, H], up [I, H], down [H, I].
    let experts: Vec<[Vec<u16>; 3]> =
        (0..e).map(|_| [rng.bf16s(i * h, 0.0, 0.1), rng.bf16s(i * h, 0.0, 0.1), rng.bf16s(h * i, 0.0, 0.1)]).collect();
    // The shared MLP: gate [S·I, H], up [S·I, H], down [H, S·I].
    let si = c.shared * i;
    let shared_mlp = [rng.bf16s(si * h, 0.0, 0.1), rng.bf16s(si * h, 0.0, 0.1), rng.bf16s(h * si, 0.0, 0.1)];

    // CPU: Qwen3-MoE's SparseMoe from the hub layout, and its router alone for the tie check.
    let json = format!(
        r#"{{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32, "hidden_size": {h},
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 64,
            "num_experts": {e}, "num_experts_per_tok": {k}, "moe_intermediate_size": {i},
            "norm_topk_prob": {}}}"#,
        c.renormalize
    );
    let cfg = ModelConfig::from_json_str(&json, "kernel check config")?;
    let moe_cfg = cfg.moe.clone().ok_or_else(|| CudaError::Unsupported("kernel check: no MoE config".into()))?;
    let mut tensors = vec![named("gate.weight", &[e, h], &router)];
    for (ei, [gate, up, down]) in experts.iter().enumerate() {
        tensors.push(named(format!("experts.{ei}.gate_proj.weight"), &[i, h], gate));
        tensors.push(named(format!("experts.{ei}.up_proj.weight"), &[i, h], up));
        tensors.push(named(format!("experts.{ei}.down_proj.weight"), &[h, i], down));
    }
    if c.shared > 0 {
        tensors.push(named("shared_experts.gate_proj.weight", &[si, h], &shared_mlp[0]));
        tensors.push(named("shared_experts.up_proj.weight", &[si, h], &shared_mlp[1]));
        tensors.push(named("shared_experts.down_proj.weight", &[h, si], &shared_mlp[2]));
    }
    let (sparse, router_cpu) = cpu_module(&tensors, |w| {
        let mut spec = routed_moe(w.checkpoint(), w.prefix(), h, &moe_cfg)?;
        if c.shared > 0 {
            let at =
                if w.prefix().is_empty() { "shared_experts".into() } else { format!("{}.shared_experts", w.prefix()) };
            spec.shared = Some(gated_mlp(w.checkpoint(), &at, h, si)?);
        }
        Ok((SparseMoe::from_spec(w, &spec)?, Linear::new(&w.pp("gate"), h, e, false)?))
    })?;
    let xf = widen(&x);
    let want = sparse.forward(&xf, t)?;
    let logits = router_cpu.forward(&xf, t)?;
    let tied: Vec<bool> = logits.chunks_exact(e).map(|row| near_tie(row, k)).collect();

    // GPU: one MoeLayer per rank, each with its share of the experts stacked as the loader does.
    let x_d = bf16_tensor(gpu, &x, &[t, h])?;
    let buffers = MoeBuffers::new(gpu, t, h, &moe_cfg, c.shared)?;
    let per = e / c.ranks;
    let mut summed = vec![(0f32, false); t * h];
    for rank in 0..c.ranks {
        let mine = &experts[rank * per..(rank + 1) * per];
        let mut gate_up: Vec<u16> = mine.iter().flat_map(|[g, u, _]| g.iter().chain(u).copied()).collect();
        let mut down: Vec<u16> = mine.iter().flat_map(|[_, _, d]| d.iter().copied()).collect();
        // The last rank also holds the shared MLP's slices: gate/up rows, down columns.
        let extra = if rank + 1 == c.ranks { c.shared } else { 0 };
        for s in 0..extra {
            gate_up.extend_from_slice(&shared_mlp[0][s * i * h..(s + 1) * i * h]);
            gate_up.extend_from_slice(&shared_mlp[1][s * i * h..(s + 1) * i * h]);
            for row in 0..h {
                down.extend_from_slice(&shared_mlp[2][row * si + s * i..row * si + (s + 1) * i]);
            }
        }
        let layer = MoeLayer {
            router: bf16_tensor(gpu, &router, &[e, h])?,
            gate_up: bf16_tensor(gpu, &gate_up, &[per + extra, 2 * i, h])?,
            down: bf16_tensor(gpu, &down, &[per + extra, h, i])?,
            expert0: rank * per,
            top_k: k,
            shared: c.shared,
            routing: MoeRouting::new(
                gpu,
                &Routing {
                    scoring: Scoring::Softmax,
                    correction_bias: None,
                    group_limit: None,
                    renormalize: c.renormalize,
                    scaling: 1.0,
                },
                e,
                None,
            )?,
        };
        let out = Output::new(gpu, &[t, h], DType::BF16)?;
        layer.forward(gpu, &out.r()?, &x_d.r(), &buffers, &|_| Ok(()))?;
        for (s, (v, sentinel)) in summed.iter_mut().zip(out.values(gpu)?) {
            s.0 += v;
            s.1 |= sentinel;
        }
    }
    let mut err = Errors::default();
    for ((got, want), tie) in summed.chunks_exact(h).zip(want.chunks_exact(h)).zip(&tied) {
        if *tie {
            // Still every element must have been written.
            err.unwritten += got.iter().filter(|g| g.1).count();
        } else {
            err.values(got, want);
        }
    }
    let mut r = outcome("moe_layer", name, BF16, &err);
    let skipped = tied.iter().filter(|&&x| x).count();
    if skipped > 0 {
        r.note = format!("{skipped} of {t} tokens with near-tied k-th/(k+1)-th router logits not compared");
    }
    Ok(vec![r])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_flag_sentinels_non_finite_and_bit_differences() {
        let mut e = Errors::default();
        e.bf16(&[SENTINEL_BF16, 0x7fc0, 0x3f80, 0x4000], &[1.0, 1.0, 1.0, 2.0]);
        assert_eq!((e.elements, e.unwritten, e.non_finite, e.mismatched), (4, 1, 1, 1));
        assert_eq!(e.rel_err(), 0.0);
        let r = outcome("k", "c", BF16, &e);
        assert!(!r.passed);
        let mut e = Errors::default();
        e.bf16(&[0x3f81, 0x7f80], &[1.0, f32::INFINITY]);
        assert_eq!((e.mismatched, e.non_finite), (1, 0));
        assert!(outcome("k", "c", BF16, &e).passed);
        assert!(!outcome("k", "c", EXACT, &e).passed);
        assert!(e.rel_err() > 7e-3 && e.rel_err() < 8e-3);
    }

    #[test]
    fn cpu_modules_load_from_a_throwaway_checkpoint() {
        let w = [half::bf16::from_f32(2.0).to_bits(); 4];
        let norm = cpu_module(&[named("weight", &[4], &w)], |wv| RmsNorm::new(wv, 4, 0.0)).unwrap();
        let y = norm.forward(&[1.0, -1.0, 1.0, -1.0]);
        assert_eq!(y, [2.0, -2.0, 2.0, -2.0]);
    }

    #[test]
    fn near_ties_are_found_at_the_top_k_boundary() {
        assert!(near_tie(&[0.5, 0.1, 0.10001, -1.0], 2));
        assert!(!near_tie(&[0.5, 0.1, 0.2, -1.0], 2));
        assert!(!near_tie(&[0.5, 0.5], 2));
    }

    #[test]
    fn rope_table_matches_the_cpu_rotation() {
        let rope = Rope::new(&RopeConfig { theta: 10_000.0, scaling: RopeScaling::Default }, 8);
        let table = rope_table(&rope, 6);
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let orig = x.clone();
        rope.apply(&mut x, &[5], 1);
        let (cos, sin) = (&table[5 * 8..5 * 8 + 4], &table[5 * 8 + 4..6 * 8]);
        for p in 0..4 {
            assert_eq!(x[p], orig[p] * cos[p] - orig[p + 4] * sin[p]);
            assert_eq!(x[p + 4], orig[p + 4] * cos[p] + orig[p] * sin[p]);
        }
    }
}
