//! `llmd-cuda-check moe-bench`: time of one routed-expert layer's phases on the GPU, per token
//! count and per compiled GEMM tile shape, at a real model's shapes (default Qwen3-30B-A3B:
//! 128 experts, 8 per token, hidden 2048, expert intermediate 768), with random routing.
//! Prints the weight bytes of the experts the step touched per second of the two grouped GEMMs,
//! to set beside the copy bandwidth. Eight inputs with different routing rotate so that the L2
//! cache does not hold the touched experts from one run to the next.

use cudarc::driver::sys::CUevent_flags;

use crate::checks::kernels::Rng;
use crate::device::{DType, DeviceTensor, Gpu};
use crate::error::CudaError;
use crate::module::moe_gemm::TILES;
use crate::moe::{ExpertGroups, MoeRouting, block_m, max_mblocks, pick_tile};
use llmd_models::spec::{Routing, Scoring};

/// The shape benchmarked.
#[derive(Debug, Clone, Copy)]
pub struct MoeShape {
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
}

/// Mean milliseconds of `reps` runs of `f(i)` (after one warm-up round), timed with CUDA events.
fn time_ms(gpu: &Gpu, reps: usize, f: impl Fn(usize) -> Result<(), CudaError>) -> Result<f64, CudaError> {
    for i in 0..8 {
        f(i)?;
    }
    let start = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    let end = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    start.record(&gpu.stream)?;
    for i in 0..reps {
        f(i)?;
    }
    end.record(&gpu.stream)?;
    Ok(start.elapsed_ms(&end)? as f64 / reps as f64)
}

/// One routed input: its tokens, routing and grouping.
struct Routed {
    x: DeviceTensor,
    ids: DeviceTensor,
    weights: DeviceTensor,
    sorted: DeviceTensor,
    block_expert: DeviceTensor,
    count: DeviceTensor,
    touched: usize,
}

pub fn run(gpu: &Gpu, shape: MoeShape, tokens: &[usize], print: &mut dyn FnMut(String)) -> Result<(), CudaError> {
    let MoeShape { experts: e, top_k: k, hidden: h, inter: i } = shape;
    let mut rng = Rng(7);
    let bits =
        |rng: &mut Rng, n: usize, amp: f32| -> Vec<u8> { (0..n).flat_map(|_| rng.bf16(amp).to_ne_bytes()).collect() };
    let router = DeviceTensor::from_bytes(gpu, &bits(&mut rng, e * h, 0.05), &[e, h], DType::BF16)?;
    // Random weights, so that every tile's output can be compared with the picked tile's (which
    // `llmd-cuda-check kernels` compares with the CPU).
    let gate_up = DeviceTensor::from_bytes(gpu, &bits(&mut rng, e * 2 * i * h, 0.05), &[e, 2 * i, h], DType::BF16)?;
    let down = DeviceTensor::from_bytes(gpu, &bits(&mut rng, e * h * i, 0.05), &[e, h, i], DType::BF16)?;
    let expert_bytes = (3 * h * i * 2) as f64;
    let routing = MoeRouting::new(
        gpu,
        &Routing {
            scoring: Scoring::Softmax,
            correction_bias: None,
            group_limit: None,
            renormalize: true,
            scaling: 1.0,
        },
        e,
        None,
    )?;
    print(format!(
        "MoE layer: {e} experts, top-{k}, hidden {h}, intermediate {i}; {:.1} MB per expert; GPU {} ({} SMs)",
        expert_bytes / 1e6,
        gpu.name,
        gpu.sm_count
    ));
    print("| tokens | block_m | experts touched | tile | route+align+sum us | gate_up us | down us | GB/s of touched experts | rel. diff vs picked |".into());
    print("|---|---|---|---|---|---|---|---|---|".into());
    for &t in tokens {
        let pairs = t * k;
        let bm = block_m(pairs, e);
        let mblocks = max_mblocks(pairs, e, bm);
        let mut routed = Vec::new();
        for _ in 0..8 {
            let x = DeviceTensor::from_bytes(gpu, &bits(&mut rng, t * h, 1.0), &[t, h], DType::BF16)?;
            let logits = DeviceTensor::zeros(gpu, &[t, e], DType::F32)?;
            let ids = DeviceTensor::zeros(gpu, &[t, k], DType::I32)?;
            let weights = DeviceTensor::zeros(gpu, &[t, k], DType::F32)?;
            gpu.linear(&logits.r(), &x.r(), &router.r())?;
            gpu.moe_route(&ids.r(), &weights.r(), &logits.r(), &routing, k)?;
            let r = Routed {
                x,
                ids,
                weights,
                sorted: DeviceTensor::zeros(gpu, &[mblocks * bm], DType::I32)?,
                block_expert: DeviceTensor::zeros(gpu, &[mblocks], DType::I32)?,
                count: DeviceTensor::zeros(gpu, &[1], DType::I32)?,
                touched: 0,
            };
            let g = groups(&r, bm)?;
            gpu.moe_align(&g, &r.ids.r().reshape(&[pairs])?, 0, e)?;
            let host = r.ids.download_i32(gpu, pairs)?;
            let mut seen = vec![false; e];
            host.iter().for_each(|&id| seen[(id.max(0) as usize).min(e - 1)] = true);
            routed.push(Routed { touched: seen.iter().filter(|&&s| s).count(), ..r });
        }
        let touched = routed.iter().map(|r| r.touched).sum::<usize>() as f64 / routed.len() as f64;
        let act = DeviceTensor::zeros(gpu, &[mblocks * bm, i], DType::BF16)?;
        let pair_out = DeviceTensor::zeros(gpu, &[pairs, h], DType::BF16)?;
        let out = DeviceTensor::zeros(gpu, &[t, h], DType::BF16)?;
        let logits = DeviceTensor::zeros(gpu, &[t, e], DType::F32)?;
        let reps = 40;
        // The small kernels around the GEMMs: router, routing, align, slot sum.
        let small = time_ms(gpu, reps, |n| {
            let r = &routed[n % routed.len()];
            gpu.linear(&logits.r(), &r.x.r(), &router.r())?;
            gpu.moe_route(&r.ids.r(), &r.weights.r(), &logits.r(), &routing, k)?;
            gpu.moe_align(&groups(r, bm)?, &r.ids.r().reshape(&[pairs])?, 0, e)?;
            gpu.moe_sum_slots(&out.r(), &pair_out.r(), &r.ids.r().reshape(&[pairs])?, 0, e)
        })?;
        let picked = (pick_tile(bm, pairs.min(e), 2 * i, gpu.sm_count), pick_tile(bm, pairs.min(e), h, gpu.sm_count));
        // The layer's pair outputs for input 0 through the picked tiles, the reference below.
        let pair_outputs = |gu: &crate::module::moe_gemm::Tile, dn: &crate::module::moe_gemm::Tile| {
            let r = &routed[0];
            let w = r.weights.r().reshape(&[pairs])?;
            gpu.moe_gemm_gate_up(&act.r(), &r.x.r(), &gate_up.r(), &groups(r, bm)?, k, gu)?;
            gpu.moe_gemm_down(&pair_out.r(), &act.r(), &down.r(), &groups(r, bm)?, &w, dn)?;
            pair_out.download_bf16(gpu, pairs * h)
        };
        let reference = pair_outputs(&picked.0, &picked.1)?;
        for tile in TILES.iter().filter(|t| t.block_m == bm) {
            let got = pair_outputs(tile, tile)?;
            let (mut num, mut den) = (0f64, 0f64);
            for (g, w) in got.iter().zip(&reference) {
                num += f64::from(g - w).powi(2);
                den += f64::from(*w).powi(2);
            }
            let rel = (num / den.max(1e-30)).sqrt();
            let gu = time_ms(gpu, reps, |n| {
                let r = &routed[n % routed.len()];
                gpu.moe_gemm_gate_up(&act.r(), &r.x.r(), &gate_up.r(), &groups(r, bm)?, k, tile)
            })?;
            let dn = time_ms(gpu, reps, |n| {
                let r = &routed[n % routed.len()];
                let w = r.weights.r().reshape(&[pairs])?;
                gpu.moe_gemm_down(&pair_out.r(), &act.r(), &down.r(), &groups(r, bm)?, &w, tile)
            })?;
            let mark = match (picked.0 == *tile, picked.1 == *tile) {
                (true, true) => " (picked)",
                (true, false) => " (picked for gate_up)",
                (false, true) => " (picked for down)",
                _ => "",
            };
            print(format!(
                "| {t} | {bm} | {touched:.1} | {}x{}, {} stages, {}x{} warps{mark} | {:.1} | {:.1} | {:.1} | {:.0} | {rel:.1e} |",
                tile.block_n,
                tile.block_k,
                tile.stages,
                tile.warps.0,
                tile.warps.1,
                small * 1e3,
                gu * 1e3,
                dn * 1e3,
                touched * expert_bytes / ((gu + dn) * 1e-3) / 1e9
            ));
        }
    }
    Ok(())
}

fn groups(r: &Routed, bm: usize) -> Result<ExpertGroups, CudaError> {
    Ok(ExpertGroups { sorted: r.sorted.r(), block_expert: r.block_expert.r(), count: r.count.r(), block_m: bm })
}
