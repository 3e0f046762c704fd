//! Routed experts of Qwen3-MoE on the GPU (kernels in `kernels/moe.cuh`).
//!
//! A sparse layer runs as: router GEMM (the existing [`Gpu::linear`], f32 logits) → top-k
//! softmax routing → per (token, slot) pair a gate/up GEMV of the chosen expert fused with
//! SiLU·up → per token a down GEMV over its slots fused with their weighted sum. Every launch
//! has a grid fixed by the token count and no host synchronisation, so decode steps stay
//! capturable as CUDA graphs; no float atomics, so results do not depend on the batch.
//!
//! Tensor parallelism splits the experts: rank `r` of `tp` holds experts
//! `[r·E/tp, (r+1)·E/tp)` (router replicated), pairs routed elsewhere contribute zero, and the
//! all-reduce after the MLP sums the ranks' partial outputs as for a dense MLP.
//!
//! Performance: each pair reads its expert's weights once, which is close to the memory
//! roofline for decode (few tokens per expert) but re-reads an expert's weights once per token
//! routed to it in long prefills, where a grouped GEMM (tokens sorted by expert) would read them
//! once. That is left for later.

use std::ops::Range;

use cudarc::driver::PushKernelArg;
use llmd_models::config::MoeConfig;
use llmd_models::spec::{ExpertWeights, RoutedMoeSpec, WeightSpec};

use crate::device::{DType, DeviceTensor, Gpu, TensorRef};
use crate::error::CudaError;
use crate::launch::{cfg, check, i32_of, launch, u32_of};
use crate::shard::Shard;

/// Most routed experts the top-k kernel takes (`MOE_MAX_EXPERTS` in `kernels/moe.cuh`).
pub const MAX_EXPERTS: usize = 1024;

/// The experts rank `shard` holds, after checking that the model's MoE can run on the GPU
/// split that way.
pub(crate) fn local_experts(moe: &MoeConfig, hidden: usize, shard: Shard) -> Result<Range<usize>, CudaError> {
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
    Ok(shard.rank * per..(shard.rank + 1) * per)
}

/// Rows `rows` of checkpoint tensor `name` of `shape`, seen as a matrix
/// [product of all dimensions but the last, last dimension].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRows {
    pub name: String,
    pub shape: Vec<usize>,
    pub rows: Range<usize>,
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
/// layout), or rows of transformers 5's fused `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I].
pub(crate) fn expert_sources(r: &RoutedMoeSpec, hidden: usize, experts: Range<usize>) -> ExpertSources {
    let (i, h) = (r.intermediate, hidden);
    let rows = |w: &WeightSpec, rows: Range<usize>| TensorRows { name: w.name.clone(), shape: w.shape.clone(), rows };
    match &r.experts {
        ExpertWeights::Fused { gate_up, down } => ExpertSources {
            gate_up: vec![rows(gate_up, experts.start * 2 * i..experts.end * 2 * i)],
            down: vec![rows(down, experts.start * h..experts.end * h)],
        },
        ExpertWeights::PerExpert(e) => {
            let whole = |w: &WeightSpec| rows(w, 0..w.shape[0]);
            ExpertSources {
                gate_up: experts
                    .clone()
                    .flat_map(|x| [whole(&e[x].gate_proj.weight), whole(&e[x].up_proj.weight)])
                    .collect(),
                down: experts.map(|x| whole(&e[x].down_proj.weight)).collect(),
            }
        }
    }
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
    /// `norm_topk_prob`.
    pub renormalize: bool,
}

impl MoeLayer {
    pub fn bytes(&self) -> usize {
        self.router.bytes() + self.gate_up.bytes() + self.down.bytes()
    }

    /// out[T, H] = this rank's share of the layer's expert MLP of x[T, H] (both bf16), using
    /// `buf` as scratch. No host synchronisation.
    pub fn forward(&self, gpu: &Gpu, out: &TensorRef, x: &TensorRef, buf: &MoeBuffers) -> Result<(), CudaError> {
        let t = x.shape()[0];
        if t > buf.max_tokens {
            return Err(CudaError::Shape(format!("MoE of {t} tokens with buffers for {}", buf.max_tokens)));
        }
        let k = self.top_k;
        let logits = buf.logits.rows(0, t)?;
        let (ids, weights) = (buf.ids.rows(0, t)?, buf.weights.rows(0, t)?);
        let act = buf.act.rows(0, t * k)?;
        gpu.linear(&logits, x, &self.router.r())?;
        gpu.moe_topk_softmax(&ids, &weights, &logits, self.renormalize)?;
        let (ids, weights) = (ids.reshape(&[t * k])?, weights.reshape(&[t * k])?);
        gpu.moe_gate_up_silu(&act, x, &ids, &self.gate_up.r(), self.expert0)?;
        gpu.moe_down_sum(out, &act, &ids, &weights, &self.down.r(), self.expert0)
    }
}

/// Scratch of the sparse layers (shared by all of them), sized for `max_tokens` tokens.
pub(crate) struct MoeBuffers {
    max_tokens: usize,
    /// Router logits, f32 [T, E].
    logits: DeviceTensor,
    /// Chosen experts, i32 [T, k].
    ids: DeviceTensor,
    /// Their routing weights, f32 [T, k].
    weights: DeviceTensor,
    /// SiLU(gate)·up per (token, slot), bf16 [T·k, I].
    act: DeviceTensor,
}

impl MoeBuffers {
    pub fn new(gpu: &Gpu, max_tokens: usize, moe: &MoeConfig) -> Result<MoeBuffers, CudaError> {
        let (e, k, i) = (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size);
        Ok(MoeBuffers {
            max_tokens,
            logits: DeviceTensor::zeros(gpu, &[max_tokens, e], DType::F32)?,
            ids: DeviceTensor::zeros(gpu, &[max_tokens, k], DType::I32)?,
            weights: DeviceTensor::zeros(gpu, &[max_tokens, k], DType::F32)?,
            act: DeviceTensor::zeros(gpu, &[max_tokens * k, i], DType::BF16)?,
        })
    }
}

/// Warps per block of the GEMV kernels (one output value per warp).
const WARPS: usize = 8;

impl Gpu {
    /// Top-k softmax routing of T tokens over E experts: ids[T, k] (global expert ids, best
    /// first, ties to the lower id) and weights[T, k] (softmax probabilities, divided by their
    /// sum over the k chosen when `renormalize`).
    /// logits: f32 [T, E] (E <= [`MAX_EXPERTS`]); ids: i32 [T, k]; weights: f32 [T, k]; k <= E.
    pub fn moe_topk_softmax(
        &self,
        ids: &TensorRef,
        weights: &TensorRef,
        logits: &TensorRef,
        renormalize: bool,
    ) -> Result<(), CudaError> {
        let (t, e, k) = (logits.shape()[0], logits.shape()[1], ids.shape()[1]);
        check(logits, "logits", DType::F32, &[t, e])?;
        check(ids, "ids", DType::I32, &[t, k])?;
        check(weights, "weights", DType::F32, &[t, k])?;
        if e > MAX_EXPERTS || k == 0 || k > e {
            return Err(CudaError::Shape(format!("top-{k} routing over {e} experts (at most {MAX_EXPERTS})")));
        }
        let (e_i, k_i, norm) = (i32_of(e, "experts")?, i32_of(k, "top_k")?, i32::from(renormalize));
        launch!(
            self,
            &self.kernels.moe.topk_softmax,
            cfg((u32_of(t, "tokens")?, 1, 1), 32),
            ids.arg(),
            weights.arg(),
            logits.arg(),
            &e_i,
            &k_i,
            &norm
        )
    }

    /// act[p, :] = silu(x[p / k] · gate_upₑ[:I]ᵀ) · (x[p / k] · gate_upₑ[I:]ᵀ) for every
    /// (token, slot) pair p of T·k whose expert e = ids[p] − expert0 is one of the E_local here
    /// (other rows of `act` are left as they were).
    /// x: bf16 [T, H]; ids: i32 [T·k]; gate_up: bf16 [E_local, 2I, H]; act: bf16 [T·k, I];
    /// H a multiple of 8.
    pub fn moe_gate_up_silu(
        &self,
        act: &TensorRef,
        x: &TensorRef,
        ids: &TensorRef,
        gate_up: &TensorRef,
        expert0: usize,
    ) -> Result<(), CudaError> {
        let (t, h) = (x.shape()[0], x.shape()[1]);
        let pairs = ids.shape()[0];
        if t == 0 || !pairs.is_multiple_of(t) || gate_up.shape().len() != 3 {
            return Err(CudaError::Shape(format!("MoE gate/up of {pairs} pairs for {t} tokens")));
        }
        let (el, i) = (gate_up.shape()[0], gate_up.shape()[1] / 2);
        check(x, "x", DType::BF16, &[t, h])?;
        check(ids, "ids", DType::I32, &[pairs])?;
        check(gate_up, "gate_up", DType::BF16, &[el, 2 * i, h])?;
        check(act, "act", DType::BF16, &[pairs, i])?;
        if !h.is_multiple_of(8) {
            return Err(CudaError::Shape(format!("MoE hidden size {h} is not a multiple of 8")));
        }
        let (k, h_i, i_i, e0, el_i) = (
            i32_of(pairs / t, "top_k")?,
            i32_of(h, "hidden")?,
            i32_of(i, "moe_intermediate")?,
            i32_of(expert0, "expert0")?,
            i32_of(el, "local experts")?,
        );
        launch!(
            self,
            &self.kernels.moe.gate_up_silu,
            cfg((u32_of(pairs, "pairs")?, u32_of(i.div_ceil(WARPS), "blocks")?, 1), 32 * WARPS as u32),
            act.arg(),
            x.arg(),
            ids.arg(),
            gate_up.arg(),
            &k,
            &h_i,
            &i_i,
            &e0,
            &el_i
        )
    }

    /// out[t, :] = Σⱼ weights[t·k + j] · (act[t·k + j] · downₑⱼᵀ) over the slots j (in order)
    /// whose expert eⱼ = ids[t·k + j] − expert0 is one of the E_local here; f32 sums, one bf16
    /// rounding. act: bf16 [T·k, I]; ids: i32 [T·k]; weights: f32 [T·k];
    /// down: bf16 [E_local, H, I]; out: bf16 [T, H]; I a multiple of 8.
    pub fn moe_down_sum(
        &self,
        out: &TensorRef,
        act: &TensorRef,
        ids: &TensorRef,
        weights: &TensorRef,
        down: &TensorRef,
        expert0: usize,
    ) -> Result<(), CudaError> {
        let (t, h) = (out.shape()[0], out.shape()[1]);
        let pairs = ids.shape()[0];
        if t == 0 || !pairs.is_multiple_of(t) || down.shape().len() != 3 {
            return Err(CudaError::Shape(format!("MoE down of {pairs} pairs for {t} tokens")));
        }
        let (el, i) = (down.shape()[0], down.shape()[2]);
        check(out, "out", DType::BF16, &[t, h])?;
        check(act, "act", DType::BF16, &[pairs, i])?;
        check(ids, "ids", DType::I32, &[pairs])?;
        check(weights, "weights", DType::F32, &[pairs])?;
        check(down, "down", DType::BF16, &[el, h, i])?;
        if !i.is_multiple_of(8) {
            return Err(CudaError::Shape(format!("MoE intermediate size {i} is not a multiple of 8")));
        }
        let (k, h_i, i_i, e0, el_i) = (
            i32_of(pairs / t, "top_k")?,
            i32_of(h, "hidden")?,
            i32_of(i, "moe_intermediate")?,
            i32_of(expert0, "expert0")?,
            i32_of(el, "local experts")?,
        );
        launch!(
            self,
            &self.kernels.moe.down_sum,
            cfg((u32_of(t, "tokens")?, u32_of(h.div_ceil(WARPS), "blocks")?, 1), 32 * WARPS as u32),
            out.arg(),
            act.arg(),
            ids.arg(),
            weights.arg(),
            down.arg(),
            &k,
            &h_i,
            &i_i,
            &e0,
            &el_i
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
        assert_eq!(local_experts(&moe(16), 64, Shard::SINGLE).unwrap(), 0..16);
        assert_eq!(local_experts(&moe(16), 64, Shard { rank: 1, world: 2 }).unwrap(), 8..16);
        assert_eq!(local_experts(&moe(16), 64, Shard { rank: 3, world: 4 }).unwrap(), 12..16);
        let err = local_experts(&moe(6), 64, Shard { rank: 0, world: 4 }).unwrap_err().to_string();
        assert!(err.contains("num_experts 6") && err.contains("tensor-parallel size 4"), "{err}");
        assert!(local_experts(&moe(2048), 64, Shard::SINGLE).is_err());
        assert!(local_experts(&moe(16), 60, Shard::SINGLE).is_err());
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
        assert!(src.gate_up.iter().all(|r| r.shape == [i, h] && r.rows == (0..i)));
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
            [TensorRows { name: tensors[0].0.clone(), shape: vec![e, 2 * i, h], rows: 4 * i..8 * i }]
        );
        assert_eq!(src.down, [TensorRows { name: tensors[1].0.clone(), shape: vec![e, h, i], rows: 2 * h..4 * h }]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
