//! `Qwen3MoeForCausalLM`: Qwen3 attention (q/k norm) with routed experts.
//!
//! Sparse layers hold a router `mlp.gate.weight` `[num_experts, hidden]` and experts
//! `mlp.experts.{e}.{gate,up,down}_proj.weight` (hub layout). Checkpoints saved by
//! transformers 5 with `save_original_format=False` fuse them into
//! `mlp.experts.gate_up_proj` `[E, 2I, H]` and `mlp.experts.down_proj` `[E, H, I]`; both are read.
//! Routing follows transformers: softmax over all experts in f32, top-k, optional
//! renormalisation of the k weights (`norm_topk_prob`), weighted sum of the expert outputs.

use rayon::prelude::*;

use crate::ModelError;
use crate::config::{ModelConfig, MoeConfig};
use crate::loader::Weights;
use crate::models::layers::{AttentionOptions, CausalLm, FeedForward, Linear, Mlp};

/// One expert's tokens `(row, routing weight)` and its output rows.
type ExpertOutput = (Vec<(usize, f32)>, Vec<f32>);

/// A routed-expert block.
#[derive(Debug)]
pub struct SparseMoe {
    router: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
}

impl SparseMoe {
    /// Loads the router and experts under `w` (`model.layers.{i}.mlp`).
    pub fn new(cfg: &ModelConfig, moe: &MoeConfig, w: &Weights) -> Result<Self, ModelError> {
        let (h, e, i) = (cfg.hidden_size, moe.num_experts, moe.moe_intermediate_size);
        let router = Linear::new(&w.pp("gate"), h, e, false)?;
        let ew = w.pp("experts");
        let experts = if ew.contains("gate_up_proj") && !ew.contains("0.gate_proj.weight") {
            let gate_up = ew.get("gate_up_proj", &[e, 2 * i, h])?;
            let down = ew.get("down_proj", &[e, h, i])?;
            (0..e)
                .map(|x| {
                    let gu = gate_up.get(x)?;
                    Ok(Mlp::from_parts(
                        Linear::from_weight(gu.narrow(0, 0, i)?.contiguous()?)?,
                        Linear::from_weight(gu.narrow(0, i, i)?.contiguous()?)?,
                        Linear::from_weight(down.get(x)?.contiguous()?)?,
                    ))
                })
                .collect::<Result<Vec<_>, ModelError>>()?
        } else {
            (0..e).map(|x| Mlp::new(&ew.pp(x), h, i, false)).collect::<Result<Vec<_>, _>>()?
        };
        Ok(SparseMoe { router, experts, top_k: moe.num_experts_per_tok, norm_topk_prob: moe.norm_topk_prob })
    }

    /// `x` is `[rows, hidden]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        let e = self.experts.len();
        let hidden = x.len() / rows.max(1);
        let logits = self.router.forward(x, rows)?;
        // Per expert: (token row, routing weight).
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for (r, row) in logits.chunks_exact(e).enumerate() {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = row.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            let probs: Vec<f32> = exps.iter().map(|v| v / sum).collect();
            let mut order: Vec<usize> = (0..e).collect();
            // Stable sort by descending probability: ties go to the lower expert index, as
            // torch.topk does on CPU.
            order.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
            let top = &order[..self.top_k];
            let norm: f32 = if self.norm_topk_prob { top.iter().map(|&i| probs[i]).sum() } else { 1.0 };
            for &i in top {
                assigned[i].push((r, probs[i] / norm));
            }
        }
        let partial: Vec<Result<Option<ExpertOutput>, ModelError>> = assigned
            .into_par_iter()
            .enumerate()
            .map(|(ei, toks)| {
                if toks.is_empty() {
                    return Ok(None);
                }
                let mut xs = Vec::with_capacity(toks.len() * hidden);
                for &(r, _) in &toks {
                    xs.extend_from_slice(&x[r * hidden..(r + 1) * hidden]);
                }
                let y = self.experts[ei].forward(&xs, toks.len())?;
                Ok(Some((toks, y)))
            })
            .collect();
        let mut out = vec![0.0f32; rows * hidden];
        for p in partial {
            if let Some((toks, y)) = p? {
                for (j, (r, wgt)) in toks.into_iter().enumerate() {
                    for (o, v) in out[r * hidden..(r + 1) * hidden].iter_mut().zip(&y[j * hidden..(j + 1) * hidden]) {
                        *o += v * wgt;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Builds a Qwen3-MoE model; layers outside the sparse rule use a dense MLP of
/// `intermediate_size`.
pub fn load(cfg: &ModelConfig, w: &Weights) -> Result<CausalLm, ModelError> {
    let moe = cfg.moe.as_ref().ok_or_else(|| ModelError::Config {
        file: "config.json".into(),
        message: "Qwen3MoeForCausalLM needs `num_experts` > 0".into(),
    })?;
    let attn = AttentionOptions { qkv_bias: cfg.attention_bias, o_bias: cfg.attention_bias, qk_norm: true };
    CausalLm::build(cfg, w, attn, |i, mw| {
        if moe.is_sparse_layer(i) {
            Ok(FeedForward::Sparse(SparseMoe::new(cfg, moe, mw)?))
        } else {
            Ok(FeedForward::Dense(Mlp::new(mw, cfg.hidden_size, cfg.intermediate_size, false)?))
        }
    })
}
