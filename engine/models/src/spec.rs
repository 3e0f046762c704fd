//! The one description of a decoder architecture that every backend builds from.
//!
//! [`DecoderSpec::new`] reads a resolved [`ModelConfig`] and the checkpoint's tensor index
//! (names, shapes and dtypes, no data) and states everything a backend needs to know: the
//! architecture, every tensor by its checkpoint name with its shape and [`WeightStorage`],
//! which biases and norms exist, the attention kind, the MLP kind of each layer, the rope
//! variant, tied embeddings and the sliding window. The CPU model (`models::layers`) and the
//! CUDA loader both walk the same spec, so an architecture or a weight format is added here
//! once. A backend that cannot serve a feature the spec states refuses it by name (see
//! [`DecoderSpec::features`]); nothing is silently dropped.
//!
//! The registry of architectures is [`Architecture`]: the error that lists the supported ones
//! is built from it too.

use std::fmt;

use llmd_options::Dtype;

use crate::ModelError;
use crate::config::{ModelConfig, MoeConfig, RopeConfig};
use crate::loader::Checkpoint;

/// The architectures llmd serves, keyed by HF `architectures[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Qwen3Moe,
}

impl Architecture {
    /// Every architecture, in the order error messages list them.
    pub const ALL: &'static [Architecture] =
        &[Architecture::Llama, Architecture::Mistral, Architecture::Qwen2, Architecture::Qwen3, Architecture::Qwen3Moe];

    /// The HF class name (`config.json` `architectures[0]`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// The architecture named `name`, or [`ModelError::UnknownArchitecture`] listing the
    /// supported ones.
    pub fn from_hf_name(name: &str) -> Result<Self, ModelError> {
        Architecture::ALL
            .iter()
            .copied()
            .find(|a| a.hf_name() == name)
            .ok_or_else(|| ModelError::UnknownArchitecture { name: name.to_string(), supported: supported_list() })
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}

/// The supported HF class names, comma-separated (for error messages and `llmctl`).
pub fn supported_list() -> String {
    Architecture::ALL.iter().map(|a| a.hf_name()).collect::<Vec<_>>().join(", ")
}

/// How a weight's values are stored in the checkpoint. Quantized kinds (FP8 with block
/// scales, int4 with group scales) join as variants here, each with its own scale tensors,
/// so an architecture never needs a second code path per format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightStorage {
    /// One float per element.
    Float(Dtype),
}

impl fmt::Display for WeightStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightStorage::Float(d) => write!(f, "{d}"),
        }
    }
}

/// One checkpoint tensor: its name, the shape the config implies (checked at load) and its
/// storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub storage: WeightStorage,
}

/// A linear layer `y = x W^T (+ b)`: `weight` is `[out, in]`, `bias` `[out]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearSpec {
    pub weight: WeightSpec,
    pub bias: Option<WeightSpec>,
}

impl LinearSpec {
    /// `[out, in]`.
    pub fn dims(&self) -> (usize, usize) {
        (self.weight.shape[0], self.weight.shape[1])
    }
}

/// The attention's shape: the variants are the attention kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    /// Multi-head attention with grouped KV heads (MHA when `kv_heads == heads`, MQA at 1).
    Grouped { heads: usize, kv_heads: usize, head_dim: usize },
}

/// One layer's attention weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionWeights {
    pub q_proj: LinearSpec,
    pub k_proj: LinearSpec,
    pub v_proj: LinearSpec,
    pub o_proj: LinearSpec,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3): `[head_dim]` each.
    pub q_norm: Option<WeightSpec>,
    pub k_norm: Option<WeightSpec>,
}

/// SwiGLU projections `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatedMlpWeights {
    pub gate_proj: LinearSpec,
    pub up_proj: LinearSpec,
    pub down_proj: LinearSpec,
}

/// Where routed experts' weights live: one tensor per expert and projection (hub layout), or
/// fused `[E, 2I, H]` gate-up and `[E, H, I]` down tensors (transformers 5's
/// `save_original_format=False`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpertWeights {
    PerExpert(Vec<GatedMlpWeights>),
    Fused { gate_up: WeightSpec, down: WeightSpec },
}

/// How router logits become each token's experts and their weights, as transformers routes for
/// the architecture; [`crate::models::routing::route`] is the rule, the GPU kernel its copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub scoring: Scoring,
    /// `e_score_correction_bias` `[E]` (DeepSeek-V3): added to the scores for choosing only.
    pub correction_bias: Option<WeightSpec>,
    /// Only the experts of the best groups compete (DeepSeek's `n_group` / `topk_group`).
    pub group_limit: Option<GroupLimit>,
    /// Divide the chosen experts' weights by their sum (`norm_topk_prob`).
    pub renormalize: bool,
    /// Multiplies the weights after renormalising (`routed_scaling_factor`; 1 for Qwen3-MoE).
    pub scaling: f32,
}

/// Router logits to scores, in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts (Qwen3-MoE, DeepSeek-V2).
    Softmax,
    /// Independent sigmoids (DeepSeek-V3).
    Sigmoid,
}

/// Group-limited choice: the experts form `groups` equal groups in id order, each group is
/// ranked by `rank` over its choice scores, the best `keep` groups stay, and the choice scores
/// of the other groups' experts become 0 (transformers' `masked_fill(…, 0.0)`: they still
/// compete, with 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    pub groups: usize,
    pub keep: usize,
    pub rank: GroupRank,
}

/// How a group of experts is ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRank {
    /// Its best expert's score (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of its two best (DeepSeek-V3 `noaux_tc`).
    TopTwoSum,
}

/// A routed-expert block.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedMoeSpec {
    /// `[num_experts, hidden]`.
    pub router: WeightSpec,
    pub num_experts: usize,
    pub top_k: usize,
    /// Hidden size of one expert's MLP.
    pub intermediate: usize,
    pub routing: Routing,
    pub experts: ExpertWeights,
    /// The MLP every token goes through besides the routed experts, added unweighted
    /// (DeepSeekMoE's `shared_experts`, whose intermediate size is n_shared × the experts').
    pub shared: Option<GatedMlpWeights>,
}

/// The feed-forward block of one layer.
// One per layer, built once at load: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum MlpSpec {
    Dense(GatedMlpWeights),
    Routed(RoutedMoeSpec),
}

/// One decoder layer: `x += attn(norm(x)); x += mlp(norm(x))`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub input_norm: WeightSpec,
    pub attention: AttentionWeights,
    pub post_attention_norm: WeightSpec,
    pub mlp: MlpSpec,
}

/// A feature a backend may not serve; [`DecoderSpec::features`] lists those a model uses, so
/// a backend refuses by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpecFeature {
    QkvBias,
    OProjBias,
    MlpBias,
    QkNorm,
    RoutedExperts,
    SharedExperts,
    TiedEmbeddings,
    /// Sliding-window attention that can matter for the served context.
    SlidingWindow,
}

impl fmt::Display for SpecFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpecFeature::QkvBias => "q/k/v projection bias",
            SpecFeature::OProjBias => "o_proj bias (attention_bias)",
            SpecFeature::MlpBias => "MLP bias (mlp_bias)",
            SpecFeature::QkNorm => "q/k norm",
            SpecFeature::RoutedExperts => "routed experts",
            SpecFeature::SharedExperts => "shared experts",
            SpecFeature::TiedEmbeddings => "tied embeddings",
            SpecFeature::SlidingWindow => "sliding-window attention",
        })
    }
}

/// A decoder-only causal LM as a backend builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub attention: AttentionKind,
    pub rope: RopeConfig,
    /// `[vocab, hidden]`.
    pub embed_tokens: WeightSpec,
    pub layers: Vec<LayerSpec>,
    /// `[hidden]`.
    pub final_norm: WeightSpec,
    /// `[vocab, hidden]`; `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<WeightSpec>,
    /// The window of sliding-window attention when the checkpoint enables it and it is shorter
    /// than `max_position_embeddings`. Neither backend applies a window, so contexts are
    /// capped at it (see [`ModelConfig::context_limit`]).
    pub sliding_window: Option<usize>,
}

/// What an architecture's family fixes beyond `config.json`.
struct Family {
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    qk_norm: bool,
    routed: bool,
}

fn family(arch: Architecture, cfg: &ModelConfig) -> Family {
    match arch {
        // Llama's `attention_bias` covers q/k/v/o; `mlp_bias` covers gate/up/down.
        Architecture::Llama | Architecture::Mistral => Family {
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias,
            mlp_bias: cfg.mlp_bias,
            qk_norm: false,
            routed: false,
        },
        // Qwen2 always has q/k/v bias and never an o_proj or MLP bias.
        Architecture::Qwen2 => Family { qkv_bias: true, o_bias: false, mlp_bias: false, qk_norm: false, routed: false },
        Architecture::Qwen3 | Architecture::Qwen3Moe => Family {
            qkv_bias: cfg.attention_bias,
            o_bias: cfg.attention_bias,
            mlp_bias: false,
            qk_norm: true,
            routed: arch == Architecture::Qwen3Moe,
        },
    }
}

/// Looks tensors up in the checkpoint index to give each its storage.
struct Index<'a> {
    ckpt: &'a Checkpoint,
}

impl Index<'_> {
    fn weight(&self, name: impl Into<String>, shape: &[usize]) -> Result<WeightSpec, ModelError> {
        let name = name.into();
        let storage = self.ckpt.storage(&name)?;
        Ok(WeightSpec { name, shape: shape.to_vec(), storage })
    }

    fn linear(&self, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<LinearSpec, ModelError> {
        Ok(LinearSpec {
            weight: self.weight(format!("{prefix}.weight"), &[out, inp])?,
            bias: if bias { Some(self.weight(format!("{prefix}.bias"), &[out])?) } else { None },
        })
    }

    fn gated(&self, prefix: &str, hidden: usize, inter: usize, bias: bool) -> Result<GatedMlpWeights, ModelError> {
        Ok(GatedMlpWeights {
            gate_proj: self.linear(&format!("{prefix}.gate_proj"), hidden, inter, bias)?,
            up_proj: self.linear(&format!("{prefix}.up_proj"), hidden, inter, bias)?,
            down_proj: self.linear(&format!("{prefix}.down_proj"), inter, hidden, bias)?,
        })
    }
}

impl DecoderSpec {
    /// The spec of the model `cfg` describes, with every tensor looked up in `ckpt` (missing
    /// tensors and unsupported storage are errors naming the tensor).
    pub fn new(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<Self, ModelError> {
        let arch = Architecture::from_hf_name(&cfg.architecture)?;
        let fam = family(arch, cfg);
        let ix = Index { ckpt };
        let (h, nh, nkv, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let moe = if fam.routed {
            Some(cfg.moe.as_ref().ok_or_else(|| ModelError::Config {
                file: "config.json".into(),
                message: format!("{} needs `num_experts` > 0", arch.hf_name()),
            })?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let norm = |n: &str| -> Result<Option<WeightSpec>, ModelError> {
                if fam.qk_norm { Ok(Some(ix.weight(format!("{a}.{n}.weight"), &[hd])?)) } else { Ok(None) }
            };
            let attention = AttentionWeights {
                q_proj: ix.linear(&format!("{a}.q_proj"), h, nh * hd, fam.qkv_bias)?,
                k_proj: ix.linear(&format!("{a}.k_proj"), h, nkv * hd, fam.qkv_bias)?,
                v_proj: ix.linear(&format!("{a}.v_proj"), h, nkv * hd, fam.qkv_bias)?,
                o_proj: ix.linear(&format!("{a}.o_proj"), nh * hd, h, fam.o_bias)?,
                q_norm: norm("q_norm")?,
                k_norm: norm("k_norm")?,
            };
            let mlp = match moe.filter(|m| m.is_sparse_layer(i)) {
                Some(m) => MlpSpec::Routed(routed(&ix, &format!("{p}.mlp"), h, m)?),
                None => MlpSpec::Dense(ix.gated(&format!("{p}.mlp"), h, cfg.intermediate_size, fam.mlp_bias)?),
            };
            layers.push(LayerSpec {
                input_norm: ix.weight(format!("{p}.input_layernorm.weight"), &[h])?,
                attention,
                post_attention_norm: ix.weight(format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let embed_tokens = ix.weight("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        // transformers ties the head exactly when the config says so (a saved
        // `lm_head.weight` is then the same matrix or ignored).
        let lm_head =
            if cfg.tie_word_embeddings { None } else { Some(ix.weight("lm_head.weight", &[cfg.vocab_size, h])?) };
        Ok(DecoderSpec {
            architecture: arch,
            hidden_size: h,
            vocab_size: cfg.vocab_size,
            rms_norm_eps: cfg.rms_norm_eps,
            attention: AttentionKind::Grouped { heads: nh, kv_heads: nkv, head_dim: hd },
            rope: cfg.rope.clone(),
            embed_tokens,
            layers,
            final_norm: ix.weight("model.norm.weight", &[h])?,
            lm_head,
            sliding_window: cfg.sliding_window_active(),
        })
    }

    /// The features this model uses that a backend might not serve.
    pub fn features(&self) -> Vec<SpecFeature> {
        let mut f = Vec::new();
        let mut add = |x: SpecFeature, on: bool| {
            if on && !f.contains(&x) {
                f.push(x);
            }
        };
        for l in &self.layers {
            let a = &l.attention;
            add(SpecFeature::QkvBias, a.q_proj.bias.is_some());
            add(SpecFeature::OProjBias, a.o_proj.bias.is_some());
            add(SpecFeature::QkNorm, a.q_norm.is_some());
            match &l.mlp {
                MlpSpec::Dense(m) => add(SpecFeature::MlpBias, m.gate_proj.bias.is_some()),
                MlpSpec::Routed(r) => {
                    add(SpecFeature::RoutedExperts, true);
                    add(SpecFeature::SharedExperts, r.shared.is_some());
                }
            }
        }
        add(SpecFeature::TiedEmbeddings, self.lm_head.is_none());
        add(SpecFeature::SlidingWindow, self.sliding_window.is_some());
        f
    }

    /// Refuses `features` this backend (`backend`, e.g. "the CUDA backend") cannot serve,
    /// naming the first one the model uses.
    pub fn refuse_unsupported(&self, backend: &str, unsupported: &[SpecFeature]) -> Result<(), ModelError> {
        match self.features().into_iter().find(|f| unsupported.contains(f)) {
            Some(f) => Err(ModelError::UnsupportedFeature {
                model: self.architecture.hf_name().to_string(),
                feature: f.to_string(),
                backend: backend.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// `(heads, kv_heads, head_dim)` of the grouped attention.
    pub fn heads(&self) -> (usize, usize, usize) {
        match self.attention {
            AttentionKind::Grouped { heads, kv_heads, head_dim } => (heads, kv_heads, head_dim),
        }
    }
}

/// The gated MLP under `prefix` (`{prefix}.gate_proj` … `.down_proj`, no biases) of `ckpt`,
/// e.g. a routed block's shared experts.
pub fn gated_mlp(ckpt: &Checkpoint, prefix: &str, hidden: usize, inter: usize) -> Result<GatedMlpWeights, ModelError> {
    Index { ckpt }.gated(prefix, hidden, inter, false)
}

/// The routed-expert block under `prefix` (`model.layers.{i}.mlp`) of `ckpt`, in whichever
/// expert layout the checkpoint has.
pub fn routed_moe(ckpt: &Checkpoint, prefix: &str, hidden: usize, m: &MoeConfig) -> Result<RoutedMoeSpec, ModelError> {
    routed(&Index { ckpt }, prefix, hidden, m)
}

fn routed(ix: &Index, prefix: &str, h: usize, m: &MoeConfig) -> Result<RoutedMoeSpec, ModelError> {
    let (e, i) = (m.num_experts, m.moe_intermediate_size);
    // An empty prefix is the checkpoint's root (the GPU self-check's standalone block).
    let under = |name: &str| if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
    let ep = under("experts");
    let fused =
        ix.ckpt.contains(&format!("{ep}.gate_up_proj")) && !ix.ckpt.contains(&format!("{ep}.0.gate_proj.weight"));
    let experts = if fused {
        ExpertWeights::Fused {
            gate_up: ix.weight(format!("{ep}.gate_up_proj"), &[e, 2 * i, h])?,
            down: ix.weight(format!("{ep}.down_proj"), &[e, h, i])?,
        }
    } else {
        ExpertWeights::PerExpert((0..e).map(|x| ix.gated(&format!("{ep}.{x}"), h, i, false)).collect::<Result<_, _>>()?)
    };
    Ok(RoutedMoeSpec {
        router: ix.weight(under("gate.weight"), &[e, h])?,
        num_experts: e,
        top_k: m.num_experts_per_tok,
        intermediate: i,
        routing: Routing {
            scoring: Scoring::Softmax,
            correction_bias: None,
            group_limit: None,
            renormalize: m.norm_topk_prob,
            scaling: 1.0,
        },
        experts,
        shared: None,
    })
}
