//! Building blocks shared by the decoder-only architectures: linear layers, RMSNorm, rotary
//! embeddings, attention over the paged KV cache, the SwiGLU MLP and the decoder layer.
//!
//! Activations are row-major `Vec<f32>` of `[tokens, features]`; weights are f32 candle
//! tensors and every matrix product goes through candle's CPU gemm. Numerics follow
//! transformers' eager f32 path (RMSNorm in f32, softmax in f32, `rotate_half` RoPE), so
//! logits agree with it to ~1e-6.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::ModelError;
use crate::config::{RopeConfig, RopeScaling};
use crate::cpu::attention::paged_attention;
use crate::cpu::kv::{BatchPlan, PagedKvCache};
use crate::loader::Weights;
use crate::models::qwen3_moe::SparseMoe;
use crate::spec::{AttentionWeights, DecoderSpec, GatedMlpWeights, LayerSpec, LinearSpec, MlpSpec, WeightSpec};

/// `y = x W^T (+ b)` with `W` of shape `[out, in]` as stored by PyTorch.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Vec<f32>>,
    in_features: usize,
    out_features: usize,
}

impl Linear {
    /// Loads `weight` (and `bias` when `bias` is true) under the view `w`.
    pub fn new(w: &Weights, in_features: usize, out_features: usize, bias: bool) -> Result<Self, ModelError> {
        let weight = w.get("weight", &[out_features, in_features])?;
        let bias = if bias { Some(w.get("bias", &[out_features])?.to_vec1::<f32>()?) } else { None };
        Ok(Linear { weight, bias, in_features, out_features })
    }

    /// Loads the layer `spec` describes (weight and optional bias, full checkpoint names).
    pub fn from_spec(w: &Weights, spec: &LinearSpec) -> Result<Self, ModelError> {
        let (out_features, in_features) = spec.dims();
        let weight = w.load(&spec.weight)?;
        let bias = spec.bias.as_ref().map(|b| w.load(b)?.to_vec1::<f32>().map_err(ModelError::from)).transpose()?;
        Ok(Linear { weight, bias, in_features, out_features })
    }

    /// Wraps an already loaded `[out, in]` weight (tied embeddings, fused expert tensors).
    pub fn from_weight(weight: Tensor) -> Result<Self, ModelError> {
        let (out_features, in_features) = weight.dims2()?;
        Ok(Linear { weight, bias: None, in_features, out_features })
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        let xt = Tensor::from_slice(x, (rows, self.in_features), &Device::Cpu)?;
        let mut y = xt.matmul(&self.weight.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(self.out_features) {
                for (v, bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
        Ok(y)
    }
}

/// Root-mean-square norm: `x / sqrt(mean(x^2) + eps) * weight`, per row of `dim`.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    /// Loads `weight` of `[dim]` under `w`.
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self, ModelError> {
        Ok(RmsNorm { weight: w.get("weight", &[dim])?.to_vec1::<f32>()?, eps: eps as f32 })
    }

    /// Loads the `[dim]` weight `spec` names.
    pub fn from_spec(w: &Weights, spec: &WeightSpec, eps: f64) -> Result<Self, ModelError> {
        Ok(RmsNorm { weight: w.load(spec)?.to_vec1::<f32>()?, eps: eps as f32 })
    }

    /// Normalises every `dim`-sized row of `x` in place.
    pub fn forward_inplace(&self, x: &mut [f32]) {
        let dim = self.weight.len();
        for row in x.chunks_exact_mut(dim) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            for (v, w) in row.iter_mut().zip(&self.weight) {
                *v = *w * (*v * inv);
            }
        }
    }

    /// Returns the normalised copy of `x`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        self.forward_inplace(&mut y);
        y
    }
}

/// Rotary position embedding with transformers' `rotate_half` layout (first and second half
/// of each head are the pairs).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
}

impl Rope {
    /// Inverse frequencies for `head_dim` following the config's rope type.
    pub fn new(rope: &RopeConfig, head_dim: usize) -> Self {
        let half = head_dim / 2;
        let base: Vec<f64> = (0..half).map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        let inv: Vec<f64> = match &rope.scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // transformers' _compute_llama3_parameters.
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Rope { inv_freq: inv.into_iter().map(|f| f as f32).collect(), head_dim }
    }

    /// Inverse frequencies, `head_dim / 2` of them (for backends that build cos/sin tables).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Rotates `x` of `[tokens, heads, head_dim]` in place; `positions[t]` is token t's position.
    pub fn apply(&self, x: &mut [f32], positions: &[u32], heads: usize) {
        let hd = self.head_dim;
        let half = hd / 2;
        x.par_chunks_mut(heads * hd).zip(positions.par_iter()).for_each(|(tok, &pos)| {
            let (sin, cos): (Vec<f32>, Vec<f32>) = self.inv_freq.iter().map(|f| (pos as f32 * f).sin_cos()).unzip();
            for head in tok.chunks_exact_mut(hd) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
    }
}

/// What one forward step shares across layers: the validated batch and the KV storage.
pub struct StepCtx<'a> {
    pub plan: &'a BatchPlan,
    pub kv: &'a mut PagedKvCache,
    pub positions: &'a [u32],
}

/// Multi-head attention with grouped KV heads (MHA, GQA and MQA are the same code).
#[derive(Debug)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    rope: Rope,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads the projections (and q/k norms) of one layer as `model` and `a` describe them.
    pub fn from_spec(model: &DecoderSpec, a: &AttentionWeights, w: &Weights) -> Result<Self, ModelError> {
        let (nh, nkv, hd) = model.heads();
        let norm =
            |n: &Option<WeightSpec>| n.as_ref().map(|n| RmsNorm::from_spec(w, n, model.rms_norm_eps)).transpose();
        Ok(Attention {
            q_proj: Linear::from_spec(w, &a.q_proj)?,
            k_proj: Linear::from_spec(w, &a.k_proj)?,
            v_proj: Linear::from_spec(w, &a.v_proj)?,
            o_proj: Linear::from_spec(w, &a.o_proj)?,
            q_norm: norm(&a.q_norm)?,
            k_norm: norm(&a.k_norm)?,
            rope: Rope::new(&model.rope, hd),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `x` is the normalised hidden state `[tokens, hidden]`; writes this layer's K/V of the
    /// new tokens into their cache slots and attends over each sequence's cached context.
    pub fn forward(&self, x: &[f32], layer: usize, ctx: &mut StepCtx) -> Result<Vec<f32>, ModelError> {
        let t = ctx.positions.len();
        let mut q = self.q_proj.forward(x, t)?;
        let mut k = self.k_proj.forward(x, t)?;
        let v = self.v_proj.forward(x, t)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            qn.forward_inplace(&mut q);
            kn.forward_inplace(&mut k);
        }
        self.rope.apply(&mut q, ctx.positions, self.num_heads);
        self.rope.apply(&mut k, ctx.positions, self.num_kv_heads);
        ctx.kv.write(layer, &k, &v, ctx.plan);
        let attn = paged_attention(&q, ctx.kv, layer, ctx.plan, self.num_heads, self.head_dim);
        self.o_proj.forward(&attn, t)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

/// SiLU (swish), `x · sigmoid(x)`: the MLP activation of every supported architecture. Public so
/// that the GPU kernel self-check (`llmd-cuda-check kernels`) compares against this very function.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Mlp {
    /// Loads the three projections `spec` names.
    pub fn from_spec(w: &Weights, spec: &GatedMlpWeights) -> Result<Self, ModelError> {
        Ok(Mlp {
            gate_proj: Linear::from_spec(w, &spec.gate_proj)?,
            up_proj: Linear::from_spec(w, &spec.up_proj)?,
            down_proj: Linear::from_spec(w, &spec.down_proj)?,
        })
    }

    /// Builds from loaded projections (fused MoE expert tensors).
    pub fn from_parts(gate_proj: Linear, up_proj: Linear, down_proj: Linear) -> Self {
        Mlp { gate_proj, up_proj, down_proj }
    }

    /// `x` is `[rows, hidden]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        let mut g = self.gate_proj.forward(x, rows)?;
        let u = self.up_proj.forward(x, rows)?;
        for (gv, uv) in g.iter_mut().zip(&u) {
            *gv = silu(*gv) * uv;
        }
        self.down_proj.forward(&g, rows)
    }
}

/// Dense or routed-expert feed-forward block.
#[derive(Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    fn forward(&self, x: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        match self {
            FeedForward::Dense(m) => m.forward(x, rows),
            FeedForward::Sparse(m) => m.forward(x, rows),
        }
    }
}

/// Pre-norm decoder layer: `x += attn(norm(x)); x += ffn(norm(x))`.
#[derive(Debug)]
pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: FeedForward,
}

impl DecoderLayer {
    /// Loads layer `l` of `model`.
    pub fn from_spec(model: &DecoderSpec, l: &LayerSpec, w: &Weights) -> Result<Self, ModelError> {
        let eps = model.rms_norm_eps;
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::from_spec(w, &l.input_norm, eps)?,
            self_attn: Attention::from_spec(model, &l.attention, w)?,
            post_attention_layernorm: RmsNorm::from_spec(w, &l.post_attention_norm, eps)?,
            mlp: match &l.mlp {
                MlpSpec::Dense(m) => FeedForward::Dense(Mlp::from_spec(w, m)?),
                MlpSpec::Routed(r) => FeedForward::Sparse(SparseMoe::from_spec(w, r)?),
            },
        })
    }

    fn forward(&self, x: &mut [f32], layer: usize, ctx: &mut StepCtx) -> Result<(), ModelError> {
        let t = ctx.positions.len();
        let h = self.input_layernorm.forward(x);
        let a = self.self_attn.forward(&h, layer, ctx)?;
        for (xv, av) in x.iter_mut().zip(&a) {
            *xv += av;
        }
        let h = self.post_attention_layernorm.forward(x);
        let m = self.mlp.forward(&h, t)?;
        for (xv, mv) in x.iter_mut().zip(&m) {
            *xv += mv;
        }
        Ok(())
    }
}

/// A decoder-only causal LM: embeddings, layers, final norm, LM head. Holds weights only;
/// the KV cache arrives with every forward call.
#[derive(Debug)]
pub struct CausalLm {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    hidden_size: usize,
    vocab_size: usize,
}

impl CausalLm {
    /// Loads every tensor `spec` names; a tied head shares the embedding matrix.
    pub fn from_spec(spec: &DecoderSpec, w: &Weights) -> Result<Self, ModelError> {
        let embed_tokens = w.load(&spec.embed_tokens)?;
        let layers = spec.layers.iter().map(|l| DecoderLayer::from_spec(spec, l, w)).collect::<Result<_, _>>()?;
        let norm = RmsNorm::from_spec(w, &spec.final_norm, spec.rms_norm_eps)?;
        let lm_head = match &spec.lm_head {
            Some(head) => Linear::from_weight(w.load(head)?)?,
            // Tied: the head shares the embedding matrix (a cheap handle, no copy).
            None => Linear::from_weight(embed_tokens.clone())?,
        };
        Ok(CausalLm { embed_tokens, layers, norm, lm_head, hidden_size: spec.hidden_size, vocab_size: spec.vocab_size })
    }

    /// Rows of the vocabulary (the logits width).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Runs the batch described by `plan` (validated against the cache layout) and returns
    /// the logits of each sequence's last new token where the plan asks for them.
    pub fn forward(
        &self,
        tokens: &[u32],
        positions: &[u32],
        plan: &BatchPlan,
        kv: &mut PagedKvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.flatten_all()?.to_vec1::<f32>()?;
        let mut ctx = StepCtx { plan, kv, positions };
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(&mut x, i, &mut ctx)?;
        }
        // Only the rows that need logits go through the final norm and the LM head.
        let h = self.hidden_size;
        let rows = plan.logit_rows();
        let mut last = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        self.norm.forward_inplace(&mut last);
        let logits = self.lm_head.forward(&last, rows.len())?;
        Ok(logits.chunks_exact(self.vocab_size.max(1)).map(<[f32]>::to_vec).collect())
    }
}
