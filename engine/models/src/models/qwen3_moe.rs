//! The routed-expert block on the CPU (Qwen3-MoE's `Qwen3MoeSparseMoeBlock`), built from a
//! [`RoutedMoeSpec`] in either expert layout the spec resolves (per-expert tensors of the hub
//! layout, or transformers 5's fused `gate_up_proj` `[E, 2I, H]` and `down_proj` `[E, H, I]`).
//! Routing is [`super::routing::route`] (transformers' rule for the architecture), then the
//! weighted sum of the expert outputs, plus the shared experts' MLP when the block has one.

use rayon::prelude::*;

use crate::ModelError;
use crate::config::MoeConfig;
use crate::loader::Weights;
use crate::models::layers::{Linear, Mlp};
use crate::spec::{ExpertWeights, RoutedMoeSpec, Routing};

/// One expert's tokens `(row, routing weight)` and its output rows.
type ExpertOutput = (Vec<(usize, f32)>, Vec<f32>);

/// A routed-expert block.
#[derive(Debug)]
pub struct SparseMoe {
    router: Linear,
    experts: Vec<Mlp>,
    top_k: usize,
    routing: Routing,
    /// The values of `routing.correction_bias`.
    bias: Option<Vec<f32>>,
    /// The shared experts' MLP, added to every token's routed output.
    shared: Option<Mlp>,
}

impl SparseMoe {
    /// Loads the router and experts `spec` names.
    pub fn from_spec(w: &Weights, spec: &RoutedMoeSpec) -> Result<Self, ModelError> {
        let i = spec.intermediate;
        let experts = match &spec.experts {
            ExpertWeights::Fused { gate_up, down } => {
                let gate_up = w.load(gate_up)?;
                let down = w.load(down)?;
                (0..spec.num_experts)
                    .map(|x| {
                        let gu = gate_up.get(x)?;
                        Ok(Mlp::from_parts(
                            Linear::from_weight(gu.narrow(0, 0, i)?.contiguous()?)?,
                            Linear::from_weight(gu.narrow(0, i, i)?.contiguous()?)?,
                            Linear::from_weight(down.get(x)?.contiguous()?)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, ModelError>>()?
            }
            ExpertWeights::PerExpert(e) => e.iter().map(|m| Mlp::from_spec(w, m)).collect::<Result<Vec<_>, _>>()?,
        };
        Ok(SparseMoe {
            router: Linear::from_weight(w.load(&spec.router)?)?,
            experts,
            top_k: spec.top_k,
            routing: spec.routing.clone(),
            bias: spec
                .routing
                .correction_bias
                .as_ref()
                .map(|b| -> Result<Vec<f32>, ModelError> { Ok(w.load(b)?.to_vec1::<f32>()?) })
                .transpose()?,
            shared: spec.shared.as_ref().map(|m| Mlp::from_spec(w, m)).transpose()?,
        })
    }

    /// Loads the block under the view `w` (`model.layers.{i}.mlp` or any prefix holding
    /// `gate.weight` and `experts.*`) for `moe`'s shapes; the GPU self-check builds its
    /// reference this way.
    pub fn new(hidden: usize, moe: &MoeConfig, w: &Weights) -> Result<Self, ModelError> {
        Self::from_spec(w, &crate::spec::routed_moe(w.checkpoint(), w.prefix(), hidden, moe)?)
    }

    /// `x` is `[rows, hidden]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        let e = self.experts.len();
        let hidden = x.len() / rows.max(1);
        let logits = self.router.forward(x, rows)?;
        // Per expert: (token row, routing weight).
        let mut assigned: Vec<Vec<(usize, f32)>> = vec![Vec::new(); e];
        for (r, row) in logits.chunks_exact(e).enumerate() {
            for (i, weight) in super::routing::route(row, &self.routing, self.bias.as_deref(), self.top_k) {
                assigned[i].push((r, weight));
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
        let mut out = match &self.shared {
            Some(m) => m.forward(x, rows)?,
            None => vec![0.0f32; rows * hidden],
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::{Checkpoint, Progress};
    use crate::spec::{gated_mlp, routed_moe};

    /// A block of 2 experts (top-1) with a shared MLP of 2 × the expert size, random f32
    /// weights, written as a real safetensors file.
    fn checkpoint(dir: &std::path::Path) -> Checkpoint {
        let (e, i, h) = (2usize, 4usize, 8usize);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![("gate.weight".into(), vec![e, h])];
        for x in 0..e {
            shapes.push((format!("experts.{x}.gate_proj.weight"), vec![i, h]));
            shapes.push((format!("experts.{x}.up_proj.weight"), vec![i, h]));
            shapes.push((format!("experts.{x}.down_proj.weight"), vec![h, i]));
        }
        shapes.push(("shared_experts.gate_proj.weight".into(), vec![2 * i, h]));
        shapes.push(("shared_experts.up_proj.weight".into(), vec![2 * i, h]));
        shapes.push(("shared_experts.down_proj.weight".into(), vec![h, 2 * i]));
        let mut seed = 1u32;
        let data: Vec<Vec<u8>> = shapes
            .iter()
            .map(|(_, s)| {
                (0..s.iter().product::<usize>())
                    .flat_map(|_| {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        ((seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5).to_le_bytes()
                    })
                    .collect()
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = shapes
            .iter()
            .zip(&data)
            .map(|((n, s), d)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())
            })
            .collect();
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        Checkpoint::open_files(&[path]).unwrap()
    }

    #[test]
    fn shared_experts_add_their_mlp_to_every_token() {
        let dir = std::env::temp_dir().join(format!("llmd-models-shared-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ckpt = checkpoint(&dir);
        let mut cb = |_: usize, _: usize| {};
        let progress = std::cell::RefCell::new(Progress::new(0, &mut cb));
        let w = Weights::new(&ckpt, &progress);
        let moe = MoeConfig {
            num_experts: 2,
            num_experts_per_tok: 1,
            moe_intermediate_size: 4,
            norm_topk_prob: false,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![],
        };
        let routed = routed_moe(&ckpt, "", 8, &moe).unwrap();
        let shared_spec = gated_mlp(&ckpt, "shared_experts", 8, 8).unwrap();
        let with_shared =
            SparseMoe::from_spec(&w, &RoutedMoeSpec { shared: Some(shared_spec.clone()), ..routed.clone() }).unwrap();
        let plain = SparseMoe::from_spec(&w, &routed).unwrap();
        let shared = Mlp::from_spec(&w, &shared_spec).unwrap();
        let x: Vec<f32> = (0..3 * 8).map(|v| ((v * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let (a, b, s) =
            (with_shared.forward(&x, 3).unwrap(), plain.forward(&x, 3).unwrap(), shared.forward(&x, 3).unwrap());
        for ((a, b), s) in a.iter().zip(&b).zip(&s) {
            assert!((a - (b + s)).abs() <= 1e-5 * (1.0 + s.abs()), "{a} vs {b} + {s}");
        }
        assert!(s.iter().any(|v| v.abs() > 1e-3), "the shared MLP contributes");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
