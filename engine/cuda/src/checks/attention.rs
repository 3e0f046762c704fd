//! GPU self-test of the prefill kernel, run by `llmd-cuda-check attention`: both attention
//! kernels on the same random inputs (bf16, block tables shuffled, unwritten cache slots
//! holding NaN), compared with each other and with an f64 host reference, then timed.
use std::fmt;

use cudarc::driver::sys::CUevent_flags;

use super::kernels::Rng;
use crate::device::{DType, DeviceTensor, Gpu, TensorRef};
use crate::error::CudaError;
use crate::prefill_attention::{HEAD_DIMS, PrefillTile, TileSeq, plan_tiles};

/// Largest error tolerated, relative to the largest |output| of the case: bf16 rounding of
/// the probabilities and the output.
pub const TOLERANCE: f64 = 2e-2;

/// Layout of one case: heads, head size, KV block size.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    head_dim: usize,
    kv_heads: usize,
    group: usize,
    block_size: usize,
}

/// Outcome of one correctness case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub head_dim: usize,
    pub group: usize,
    /// max |prefill − paged| / max |paged|.
    pub vs_paged: f64,
    /// max |prefill − reference| / max |reference| on the sampled rows.
    pub vs_host: f64,
    /// The same for the paged kernel (the oracle's own error).
    pub paged_vs_host: f64,
    /// Output elements still NaN (the output is pre-filled with NaN).
    pub unwritten: usize,
    pub passed: bool,
}

/// Both kernels on one prompt of `tokens` tokens.
#[derive(Debug, Clone)]
pub struct Timing {
    pub tokens: usize,
    pub paged_ms: f64,
    pub prefill_ms: f64,
    /// Tensor-core work of the causal attention (4·D·Hq·Σ keys seen) per prefill second.
    pub prefill_tflops: f64,
    pub vs_paged: f64,
    pub unwritten: usize,
    pub passed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub cases: Vec<CaseResult>,
    pub timings: Vec<Timing>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.cases.iter().all(|c| c.passed) && self.timings.iter().all(|t| t.passed)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<44} {:>4} {:>5} {:>9} {:>9} {:>11} {:>9}  result",
            "case", "D", "group", "vs paged", "vs f64", "paged/f64", "unwritten"
        )?;
        for c in &self.cases {
            writeln!(
                f,
                "{:<44} {:>4} {:>5} {:>9.2e} {:>9.2e} {:>11.2e} {:>9}  {}",
                c.name,
                c.head_dim,
                c.group,
                c.vs_paged,
                c.vs_host,
                c.paged_vs_host,
                c.unwritten,
                if c.passed { "ok" } else { "FAIL" }
            )?;
        }
        writeln!(f, "\none prompt, Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, block 16):")?;
        writeln!(
            f,
            "{:>7} {:>10} {:>11} {:>8} {:>9} {:>9}  result",
            "tokens", "paged ms", "prefill ms", "speedup", "TFLOP/s", "vs paged"
        )?;
        for t in &self.timings {
            writeln!(
                f,
                "{:>7} {:>10.3} {:>11.3} {:>7.1}x {:>9.1} {:>9.2e}  {}",
                t.tokens,
                t.paged_ms,
                t.prefill_ms,
                t.paged_ms / t.prefill_ms,
                t.prefill_tflops,
                t.vs_paged,
                if t.passed { "ok" } else { "FAIL" }
            )?;
        }
        write!(f, "{}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

fn f32_of(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

const NAN_BF16: u16 = 0x7fc0;

/// A batch of sequences `(context_before, len)` with random Q, K and V on the host.
struct Problem {
    g: Geometry,
    seqs: Vec<(usize, usize)>,
    t: usize,
    hq: usize,
    /// bf16 bits [t, hq, D].
    q: Vec<u16>,
    /// bf16 bits [blocks, block_size, Hkv, D]; slots no sequence reaches hold NaN.
    k: Vec<u16>,
    v: Vec<u16>,
    blocks: usize,
    stride: usize,
    tables: Vec<i32>,
    query_seq: Vec<i32>,
    query_pos: Vec<i32>,
    tiles: Vec<PrefillTile>,
}

impl Problem {
    fn new(g: Geometry, seqs: &[(usize, usize)], seed: u64) -> Problem {
        let mut rng = Rng(seed);
        let (d, bs, hkv) = (g.head_dim, g.block_size, g.kv_heads);
        let hq = hkv * g.group;
        let t: usize = seqs.iter().map(|s| s.1).sum();
        let per_seq: Vec<usize> = seqs.iter().map(|(before, len)| (before + len).div_ceil(bs)).collect();
        let blocks = per_seq.iter().sum::<usize>() + 2;
        // Shuffled block ids, so the gather through the table is exercised.
        let mut ids: Vec<usize> = (0..blocks).collect();
        rng.shuffle(&mut ids);
        let stride = per_seq.iter().copied().max().unwrap_or(1).max(1);
        let mut tables = vec![0i32; seqs.len() * stride];
        let mut next = ids.into_iter();
        for (s, n) in per_seq.iter().enumerate() {
            for j in 0..*n {
                tables[s * stride + j] = next.next().unwrap_or(0) as i32;
            }
        }
        let row = hkv * d;
        let mut k = vec![NAN_BF16; blocks * bs * row];
        let mut v = vec![NAN_BF16; blocks * bs * row];
        let mut query_seq = Vec::with_capacity(t);
        let mut query_pos = Vec::with_capacity(t);
        let mut tile_seqs = Vec::with_capacity(seqs.len());
        for (s, &(before, len)) in seqs.iter().enumerate() {
            for p in 0..before + len {
                let slot = tables[s * stride + p / bs] as usize * bs + p % bs;
                for i in 0..row {
                    k[slot * row + i] = rng.bf16(1.0);
                    v[slot * row + i] = rng.bf16(1.0);
                }
            }
            tile_seqs.push(TileSeq { seq: s, q_start: query_pos.len(), q_len: len, context_before: before });
            query_seq.extend(std::iter::repeat_n(s as i32, len));
            query_pos.extend((before..before + len).map(|p| p as i32));
        }
        // Logits of standard deviation ~1: peaked enough that the softmax matters.
        let q = (0..t * hq * d).map(|_| rng.bf16(3.0)).collect();
        let tiles = plan_tiles(&tile_seqs, g.group);
        Problem { g, seqs: seqs.to_vec(), t, hq, q, k, v, blocks, stride, tables, query_seq, query_pos, tiles }
    }

    fn max_context(&self) -> usize {
        self.seqs.iter().map(|(b, l)| b + l).max().unwrap_or(1)
    }

    /// f64 attention of query `qi`, head `h`: [D].
    fn reference(&self, qi: usize, h: usize) -> Vec<f64> {
        let (d, bs, hkv) = (self.g.head_dim, self.g.block_size, self.g.kv_heads);
        let (s, pos) = (self.query_seq[qi] as usize, self.query_pos[qi] as usize);
        let kvh = h / self.g.group;
        let scale = 1.0 / (d as f64).sqrt();
        let qv: Vec<f64> = (0..d).map(|i| f32_of(self.q[(qi * self.hq + h) * d + i]) as f64).collect();
        let at = |p: usize| (self.tables[s * self.stride + p / bs] as usize * bs + p % bs) * hkv * d + kvh * d;
        let scores: Vec<f64> =
            (0..=pos).map(|p| (0..d).map(|i| qv[i] * f32_of(self.k[at(p) + i]) as f64).sum::<f64>() * scale).collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = w.iter().sum();
        (0..d).map(|i| (0..=pos).map(|p| w[p] * f32_of(self.v[at(p) + i]) as f64).sum::<f64>() / l).collect()
    }
}

fn bytes_u16(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

fn bytes_i32(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// A problem on the device, with one output buffer per kernel.
struct OnDevice {
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    tables: DeviceTensor,
    query_seq: DeviceTensor,
    query_pos: DeviceTensor,
    tiles: DeviceTensor,
    /// bf16 outputs held in u32 words (so they can be downloaded), pre-filled with NaN.
    out_prefill: DeviceTensor,
    out_paged: DeviceTensor,
    part_acc: DeviceTensor,
    part_ml: DeviceTensor,
}

impl OnDevice {
    /// `max_tokens` sizes the paged kernel's split workspace as the runner does
    /// (runner.rs: max(max_num_batched_tokens, 512)·Hq·D·2).
    fn new(gpu: &Gpu, p: &Problem, max_tokens: usize) -> Result<OnDevice, CudaError> {
        let (d, bs, hkv) = (p.g.head_dim, p.g.block_size, p.g.kv_heads);
        let cache = [p.blocks, bs, hkv, d];
        let n_out = p.t * p.hq * d;
        let nan = vec![0xffu8; n_out * 2];
        let tiles: Vec<u8> = p.tiles.iter().flat_map(|t| t.to_ne_bytes()).collect();
        let ws = max_tokens.max(p.t).max(512) * p.hq * d * 2;
        Ok(OnDevice {
            q: DeviceTensor::from_bytes(gpu, &bytes_u16(&p.q), &[p.t, p.hq, d], DType::BF16)?,
            k: DeviceTensor::from_bytes(gpu, &bytes_u16(&p.k), &cache, DType::BF16)?,
            v: DeviceTensor::from_bytes(gpu, &bytes_u16(&p.v), &cache, DType::BF16)?,
            tables: DeviceTensor::from_bytes(gpu, &bytes_i32(&p.tables), &[p.seqs.len(), p.stride], DType::I32)?,
            query_seq: DeviceTensor::from_bytes(gpu, &bytes_i32(&p.query_seq), &[p.t], DType::I32)?,
            query_pos: DeviceTensor::from_bytes(gpu, &bytes_i32(&p.query_pos), &[p.t], DType::I32)?,
            tiles: DeviceTensor::from_bytes(gpu, &tiles, &[p.tiles.len(), 4], DType::I32)?,
            out_prefill: DeviceTensor::from_bytes(gpu, &nan, &[n_out / 2], DType::U32)?,
            out_paged: DeviceTensor::from_bytes(gpu, &nan, &[n_out / 2], DType::U32)?,
            part_acc: DeviceTensor::zeros(gpu, &[ws], DType::F32)?,
            part_ml: DeviceTensor::zeros(gpu, &[ws / d * 2], DType::F32)?,
        })
    }

    /// The u32 output buffer seen as the bf16 [t, hq, D] the kernels write.
    fn bf16_view(t: &DeviceTensor, p: &Problem) -> Result<TensorRef, CudaError> {
        t.r().view_bytes(0, &[p.t, p.hq, p.g.head_dim], DType::BF16)
    }

    fn run_prefill(&self, gpu: &Gpu, p: &Problem) -> Result<(), CudaError> {
        let scale = 1.0 / (p.g.head_dim as f32).sqrt();
        gpu.prefill_attention(
            &Self::bf16_view(&self.out_prefill, p)?,
            &self.q.r(),
            &self.k.r(),
            &self.v.r(),
            &self.tables.r(),
            &self.query_pos.r(),
            &self.tiles.r(),
            scale,
        )
    }

    fn run_paged(&self, gpu: &Gpu, p: &Problem) -> Result<(), CudaError> {
        let scale = 1.0 / (p.g.head_dim as f32).sqrt();
        gpu.paged_attention(
            &Self::bf16_view(&self.out_paged, p)?,
            &self.q.r(),
            &self.k.r(),
            &self.v.r(),
            &self.tables.r(),
            &self.query_seq.r(),
            &self.query_pos.r(),
            p.max_context(),
            &self.part_acc.r(),
            &self.part_ml.r(),
            scale,
        )
    }

    /// An output as f32 [t, hq, D].
    fn download(gpu: &Gpu, t: &DeviceTensor) -> Result<Vec<f32>, CudaError> {
        let words = t.download_u32(gpu, t.numel())?;
        Ok(words.iter().flat_map(|w| [f32_of(*w as u16), f32_of((*w >> 16) as u16)]).collect())
    }
}

/// max |a − b| / max |b| and the count of NaN in `a`.
fn compare(a: &[f32], b: &[f32]) -> (f64, usize) {
    let (mut err, mut top, mut nan) = (0f64, 0f64, 0usize);
    for (x, y) in a.iter().zip(b) {
        if x.is_nan() {
            nan += 1;
            continue;
        }
        err = err.max((*x as f64 - *y as f64).abs());
        top = top.max((*y as f64).abs());
    }
    (err / top.max(1e-30), nan)
}

/// Errors of both outputs against the f64 reference on a sample of queries (all when few).
fn against_reference(p: &Problem, prefill: &[f32], paged: &[f32]) -> (f64, f64) {
    let d = p.g.head_dim;
    let last: Vec<usize> = p
        .seqs
        .iter()
        .scan(0, |end, s| {
            *end += s.1;
            Some(*end - 1)
        })
        .collect();
    let (mut e_new, mut e_old, mut top) = (0f64, 0f64, 0f64);
    for qi in (0..p.t).filter(|&i| p.t <= 64 || i % 7 == 0 || last.contains(&i)) {
        for h in 0..p.hq {
            let r = p.reference(qi, h);
            let at = (qi * p.hq + h) * d;
            for (i, want) in r.iter().enumerate() {
                let (x, y) = (prefill[at + i] as f64, paged[at + i] as f64);
                // NaN counts as the largest error.
                e_new = e_new.max(if x.is_nan() { f64::INFINITY } else { (x - want).abs() });
                e_old = e_old.max(if y.is_nan() { f64::INFINITY } else { (y - want).abs() });
                top = top.max(want.abs());
            }
        }
    }
    (e_new / top.max(1e-30), e_old / top.max(1e-30))
}

fn run_case(gpu: &Gpu, name: &str, g: Geometry, seqs: &[(usize, usize)], seed: u64) -> Result<CaseResult, CudaError> {
    let p = Problem::new(g, seqs, seed);
    let dev = OnDevice::new(gpu, &p, p.t)?;
    dev.run_paged(gpu, &p)?;
    dev.run_prefill(gpu, &p)?;
    gpu.synchronize()?;
    let paged = OnDevice::download(gpu, &dev.out_paged)?;
    let prefill = OnDevice::download(gpu, &dev.out_prefill)?;
    let (vs_paged, unwritten) = compare(&prefill, &paged);
    let (vs_host, paged_vs_host) = against_reference(&p, &prefill, &paged);
    let passed = unwritten == 0 && vs_paged <= TOLERANCE && vs_host <= TOLERANCE;
    Ok(CaseResult {
        name: name.to_string(),
        head_dim: g.head_dim,
        group: g.group,
        vs_paged,
        vs_host,
        paged_vs_host,
        unwritten,
        passed,
    })
}

/// Mean milliseconds of `reps` runs of `f` (after one warm-up), timed with CUDA events.
fn time_ms(gpu: &Gpu, reps: usize, f: impl Fn() -> Result<(), CudaError>) -> Result<f64, CudaError> {
    f()?;
    let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(&gpu.stream)?;
    for _ in 0..reps {
        f()?;
    }
    end.record(&gpu.stream)?;
    Ok(start.elapsed_ms(&end)? as f64 / reps as f64)
}

fn run_timing(gpu: &Gpu, tokens: usize) -> Result<Timing, CudaError> {
    let g = Geometry { head_dim: 128, kv_heads: 8, group: 4, block_size: 16 };
    let p = Problem::new(g, &[(0, tokens)], 7 + tokens as u64);
    // As `llmd-cuda-check bench` loads the runner (max_num_batched_tokens 8192).
    let dev = OnDevice::new(gpu, &p, 8192)?;
    let reps = (20_000 / tokens).clamp(3, 20);
    let paged_ms = time_ms(gpu, reps, || dev.run_paged(gpu, &p))?;
    let prefill_ms = time_ms(gpu, reps, || dev.run_prefill(gpu, &p))?;
    let paged = OnDevice::download(gpu, &dev.out_paged)?;
    let prefill = OnDevice::download(gpu, &dev.out_prefill)?;
    let (vs_paged, unwritten) = compare(&prefill, &paged);
    let keys_seen = (tokens * (tokens + 1) / 2) as f64;
    let flops = 4.0 * (g.head_dim * p.hq) as f64 * keys_seen;
    Ok(Timing {
        tokens,
        paged_ms,
        prefill_ms,
        prefill_tflops: flops / (prefill_ms * 1e-3) / 1e12,
        vs_paged,
        unwritten,
        passed: unwritten == 0 && vs_paged <= TOLERANCE,
    })
}

/// Runs every case and the timings on `gpu`.
pub fn run(gpu: &Gpu) -> Result<Report, CudaError> {
    let prompts: &[(usize, usize)] = &[(0, 1), (0, 17), (0, 100), (0, 333), (0, 64)];
    // Decode rows (len 1) around two prompt chunks, one of them with a cached prefix.
    let mixed: &[(usize, usize)] = &[(14, 1), (200, 50), (0, 1), (899, 1), (0, 77), (15, 1), (16, 1)];
    // A decode step of many sequences (the runner tiles those too): one row each, contexts
    // from 1 to 1,171 tokens.
    let decode: Vec<(usize, usize)> = (0..40).map(|i| (i * 29 + i % 3, 1)).collect();
    let shapes: [(&str, &[(usize, usize)]); 5] = [
        ("one 512-token prompt", &[(0, 512)]),
        ("prompts of 1, 17, 100, 333, 64 tokens", prompts),
        ("chunk of 300 after 1,500 cached tokens", &[(1500, 300)]),
        ("2 chunks + 5 decode rows", mixed),
        ("decode step of 40 sequences", &decode),
    ];
    let mut report = Report::default();
    let mut seed = 1;
    for head_dim in HEAD_DIMS {
        for group in [1, 4, 8] {
            for (name, seqs) in shapes {
                let g = Geometry { head_dim, kv_heads: 2, group, block_size: 16 };
                report.cases.push(run_case(gpu, name, g, seqs, seed)?);
                seed += 1;
            }
        }
    }
    // Groups that split a token's heads across tiles (6) or fill a tile with 4 tokens (16),
    // and another block size.
    let geometry = |head_dim, kv_heads, group, block_size| Geometry { head_dim, kv_heads, group, block_size };
    let (name, g) = ("2 chunks + 5 decode rows", geometry(128, 2, 6, 16));
    report.cases.push(run_case(gpu, name, g, mixed, seed)?);
    let (name, g) = ("prompts of 1, 17, 100, 333, 64 tokens", geometry(64, 1, 16, 16));
    report.cases.push(run_case(gpu, name, g, prompts, seed + 1)?);
    let (name, g) = ("2 chunks + 5 decode rows, block size 32", geometry(128, 2, 4, 32));
    report.cases.push(run_case(gpu, name, g, mixed, seed + 2)?);
    for tokens in [512, 2048, 8192] {
        report.timings.push(run_timing(gpu, tokens)?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_hold_finite_data_exactly_where_sequences_reach() {
        let g = Geometry { head_dim: 64, kv_heads: 2, group: 3, block_size: 16 };
        let seqs = [(14, 1), (40, 20), (0, 33)];
        let p = Problem::new(g, &seqs, 5);
        let row = g.kv_heads * g.head_dim;
        let finite = |c: &[u16]| c.chunks(row).filter(|r| r.iter().all(|x| f32_of(*x).is_finite())).count();
        let reached: usize = seqs.iter().map(|(b, l)| b + l).sum();
        assert_eq!(finite(&p.k), reached);
        assert_eq!(finite(&p.v), reached);
        assert_eq!(p.t, 54);
        assert_eq!(p.query_pos[..3], [14, 40, 41]);
        assert_eq!(p.query_seq[20..22], [1, 2]);
        for qi in 0..p.t {
            for h in 0..p.hq {
                assert!(p.reference(qi, h).iter().all(|x| x.is_finite()), "query {qi} head {h}");
            }
        }
        // A query that sees one key returns that key's V.
        let slot = p.tables[0] as usize * g.block_size;
        let first = p.reference(21, 0);
        let v0: Vec<f64> = (0..g.head_dim).map(|i| f32_of(p.v[slot * row + i]) as f64).collect();
        assert_eq!(p.query_seq[21], 2);
        assert_eq!(p.query_pos[21], 0);
        let slot2 = p.tables[2 * p.stride] as usize * g.block_size;
        let v2: Vec<f64> = (0..g.head_dim).map(|i| f32_of(p.v[slot2 * row + i]) as f64).collect();
        assert_eq!(first, v2);
        assert_ne!(v0, v2);
    }

    #[test]
    fn compare_counts_nan_and_scales_by_the_largest_value() {
        let (err, nan) = compare(&[1.0, f32::NAN, -2.1], &[1.0, 0.5, -2.0]);
        assert_eq!(nan, 1);
        assert!((err - 0.05).abs() < 1e-6);
    }
}
