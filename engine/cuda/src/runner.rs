//! [`CudaRunner`]: a dense decoder (Llama, Mistral, Qwen2, Qwen3) in bf16 on one GPU, with
//! its paged KV cache in device memory.
//!
//! Per step: host arrays (ids, positions, KV slots, block tables) are uploaded once, then every
//! layer runs as fused RMSNorm → one QKV GEMM → bias/q-k-norm/RoPE/KV-write kernel → paged
//! attention → O GEMM → fused residual+RMSNorm → one gate/up GEMM → SiLU·mul → down GEMM.
//! Only the rows that need logits go through the LM head, and only those logits come back.

use std::path::Path;

use llmd_models::ModelError;
use llmd_models::config::{GenerationConfig, ModelConfig};
use llmd_models::cpu::LoadedModel;
use llmd_models::loader::Checkpoint;
use llmd_models::models::layers::Rope;
use llmd_models::runner::{ForwardBatch, KvCacheLayout, ModelRunner, StepLogits};
use safetensors::Dtype;

use crate::device::{DType, DeviceTensor, Gpu, TensorRef};
use crate::error::CudaError;

/// How to load a model on a GPU.
#[derive(Debug, Clone)]
pub struct CudaLoadConfig {
    pub ordinal: usize,
    /// Fraction of the GPU's free memory (after weights and activations) given to the KV cache.
    pub gpu_memory_utilization: f32,
    pub block_size: usize,
    /// Most tokens in one step; activation buffers are sized for it.
    pub max_num_batched_tokens: usize,
    /// Longest context; sizes the RoPE table and block tables.
    pub max_model_len: usize,
}

struct Layer {
    input_norm: DeviceTensor,
    qkv: DeviceTensor,
    qkv_bias: Option<DeviceTensor>,
    q_norm: Option<DeviceTensor>,
    k_norm: Option<DeviceTensor>,
    o: DeviceTensor,
    post_norm: DeviceTensor,
    gate_up: DeviceTensor,
    down: DeviceTensor,
    k_cache: DeviceTensor,
    v_cache: DeviceTensor,
}

/// Activation buffers, allocated once for `max_tokens` rows.
struct Activations {
    ids: DeviceTensor,
    positions: DeviceTensor,
    slots: DeviceTensor,
    query_seq: DeviceTensor,
    block_tables: DeviceTensor,
    logit_rows: DeviceTensor,
    residual: DeviceTensor,
    normed: DeviceTensor,
    qkv: DeviceTensor,
    q: DeviceTensor,
    attn: DeviceTensor,
    x: DeviceTensor,
    gate_up: DeviceTensor,
    act: DeviceTensor,
    part_acc: DeviceTensor,
    part_ml: DeviceTensor,
    selected: DeviceTensor,
    logits: DeviceTensor,
}

/// The model on one GPU. Owns weights, KV cache and activation buffers.
pub struct CudaRunner {
    gpu: Gpu,
    cfg: ModelConfig,
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
        other => Err(CudaError::Model(ModelError::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?}") })),
    }
}

/// Loads tensors `names` (each [rows_i, cols]) into one bf16 device matrix [sum rows_i, cols]
/// (fused QKV and gate/up projections), converting f32/f16 checkpoints on the device.
fn load_concat(gpu: &Gpu, ckpt: &Checkpoint, names: &[String], shapes: &[Vec<usize>]) -> Result<DeviceTensor, CudaError> {
    let cols = shapes[0].get(1).copied().unwrap_or(1);
    let rows: usize = shapes.iter().map(|s| s[0]).sum();
    let out_shape: Vec<usize> = if shapes[0].len() == 1 { vec![rows] } else { vec![rows, cols] };
    let mut out = DeviceTensor::zeros(gpu, &out_shape, DType::BF16)?;
    let mut offset_elems = 0usize;
    for (name, shape) in names.iter().zip(shapes) {
        let raw = ckpt.raw(name, shape)?;
        let numel: usize = shape.iter().product();
        let dst = TensorRef { ptr: out.r().ptr + (offset_elems * 2) as u64, shape: vec![numel], dtype: DType::BF16 };
        if to_dtype(raw.dtype, name)? {
            let src_dtype = if raw.dtype == Dtype::F32 { DType::F32 } else { DType::BF16 /* f16 staged as 2-byte words */ };
            let staged = DeviceTensor::from_bytes(gpu, raw.bytes, &[numel], src_dtype)?;
            gpu.to_bf16(&dst, &staged.r(), raw.dtype == Dtype::F16)?;
            gpu.synchronize()?;
        } else {
            out.upload_at(gpu, offset_elems * 2, raw.bytes)?;
        }
        offset_elems += numel;
    }
    Ok(out)
}

fn load_one(gpu: &Gpu, ckpt: &Checkpoint, name: &str, shape: &[usize]) -> Result<DeviceTensor, CudaError> {
    load_concat(gpu, ckpt, &[name.to_string()], &[shape.to_vec()])
}

/// Loads an HF dense decoder onto GPU `opts.ordinal` and sizes its KV cache.
pub fn load_cuda(dir: &Path, opts: &CudaLoadConfig, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel, ModelError> {
    Ok(load_inner(dir, opts, progress)?)
}

fn load_inner(dir: &Path, opts: &CudaLoadConfig, progress: &mut dyn FnMut(usize, usize)) -> Result<LoadedModel, CudaError> {
    let cfg = ModelConfig::from_dir(dir)?;
    let generation = GenerationConfig::from_dir(dir)?;
    match cfg.architecture.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM" => {}
        other => return Err(CudaError::Unsupported(format!("{other} (the CUDA backend serves dense Llama/Mistral/Qwen2/Qwen3 models)"))),
    }
    let gpu = Gpu::open(opts.ordinal)?;
    let (h, d, hq, hkv, inter) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size);
    if hq % hkv != 0 || !gpu.kernels.supports_attention(d, hq / hkv) {
        return Err(CudaError::Unsupported(format!("head_dim {d} with {hq} heads / {hkv} KV heads")));
    }
    let ckpt = Checkpoint::open_dir(dir)?;
    let total = cfg.num_hidden_layers + 3;
    let mut done = 0;
    let embed = load_one(&gpu, &ckpt, "model.embed_tokens.weight", &[cfg.vocab_size, h])?;
    let lm_head = if ckpt.contains("lm_head.weight") && !cfg.tie_word_embeddings {
        Some(load_one(&gpu, &ckpt, "lm_head.weight", &[cfg.vocab_size, h])?)
    } else {
        None
    };
    let final_norm = load_one(&gpu, &ckpt, "model.norm.weight", &[h])?;
    done += 3;
    progress(done, total);
    let max_tokens = opts.max_num_batched_tokens.max(1);
    let max_seqs = max_tokens.min(1024);
    let block_size = opts.block_size;
    let max_blocks_per_seq = opts.max_model_len.div_ceil(block_size);
    let attn_ws_elems = max_tokens.max(512) * hq * d * 2;

    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    let qkv_rows = [hq * d, hkv * d, hkv * d];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let proj = |n: &str| format!("{p}.self_attn.{n}_proj.weight");
        let qkv = load_concat(&gpu, &ckpt, &[proj("q"), proj("k"), proj("v")], &qkv_rows.map(|r| vec![r, h]))?;
        let qkv_bias = if ckpt.contains(&format!("{p}.self_attn.q_proj.bias")) {
            let names = ["q", "k", "v"].map(|n| format!("{p}.self_attn.{n}_proj.bias"));
            Some(load_concat(&gpu, &ckpt, &names, &qkv_rows.map(|r| vec![r]))?)
        } else {
            None
        };
        let norm = |n: &str| -> Result<Option<DeviceTensor>, CudaError> {
            let name = format!("{p}.self_attn.{n}.weight");
            if ckpt.contains(&name) { Ok(Some(load_one(&gpu, &ckpt, &name, &[d])?)) } else { Ok(None) }
        };
        let (q_norm, k_norm) = (norm("q_norm")?, norm("k_norm")?);
        let mlp = |n: &str| format!("{p}.mlp.{n}_proj.weight");
        let layer = Layer {
            input_norm: load_one(&gpu, &ckpt, &format!("{p}.input_layernorm.weight"), &[h])?,
            qkv,
            qkv_bias,
            q_norm,
            k_norm,
            o: load_one(&gpu, &ckpt, &proj("o"), &[h, hq * d])?,
            post_norm: load_one(&gpu, &ckpt, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
            gate_up: load_concat(&gpu, &ckpt, &[mlp("gate"), mlp("up")], &[vec![inter, h], vec![inter, h]])?,
            down: load_one(&gpu, &ckpt, &mlp("down"), &[h, inter])?,
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
    let qkv_width = (hq + 2 * hkv) * d;
    let act = Activations {
        ids: z(&[max_tokens], DType::U32)?,
        positions: z(&[max_tokens], DType::I32)?,
        slots: z(&[max_tokens], DType::I64)?,
        query_seq: z(&[max_tokens], DType::I32)?,
        block_tables: z(&[max_seqs, max_blocks_per_seq], DType::I32)?,
        logit_rows: z(&[max_seqs], DType::I32)?,
        residual: z(&[max_tokens, h], DType::BF16)?,
        normed: z(&[max_tokens, h], DType::BF16)?,
        qkv: z(&[max_tokens, qkv_width], DType::BF16)?,
        q: z(&[max_tokens, hq, d], DType::BF16)?,
        attn: z(&[max_tokens, hq, d], DType::BF16)?,
        x: z(&[max_tokens, h], DType::BF16)?,
        gate_up: z(&[max_tokens, 2 * inter], DType::BF16)?,
        act: z(&[max_tokens, inter], DType::BF16)?,
        part_acc: z(&[attn_ws_elems], DType::F32)?,
        part_ml: z(&[attn_ws_elems / d * 2], DType::F32)?,
        selected: z(&[max_seqs, h], DType::BF16)?,
        logits: z(&[max_seqs, cfg.vocab_size], DType::F32)?,
    };
    gpu.synchronize()?;

    // KV cache from what is left: a fraction of free memory, as vLLM's gpu_memory_utilization.
    let (free, total_mem) = gpu.mem_info()?;
    let budget = (free as f64 * opts.gpu_memory_utilization as f64) as u64;
    let num_blocks = KvCacheLayout::blocks_for_budget(cfg.num_hidden_layers, hkv, d, block_size, 2, budget);
    let min_blocks = max_blocks_per_seq;
    if num_blocks < min_blocks {
        return Err(CudaError::OutOfMemory(format!(
            "{} MiB free after loading weights leaves room for {num_blocks} KV blocks; one sequence of max_model_len {} needs {min_blocks} (lower max_model_len or raise gpu_memory_utilization)",
            free >> 20,
            opts.max_model_len
        )));
    }
    for layer in &mut layers {
        layer.k_cache = DeviceTensor::zeros(&gpu, &[num_blocks, block_size, hkv, d], DType::BF16)?;
        layer.v_cache = DeviceTensor::zeros(&gpu, &[num_blocks, block_size, hkv, d], DType::BF16)?;
    }
    gpu.synchronize()?;
    let layout = KvCacheLayout { num_layers: cfg.num_hidden_layers, num_kv_heads: hkv, head_dim: d, block_size, num_blocks, dtype_bytes: 2 };
    tracing::info!(
        gpu = %gpu.name,
        total_mib = total_mem >> 20,
        kv_blocks = num_blocks,
        kv_mib = (layout.bytes_per_block() * num_blocks) >> 20,
        "CUDA memory budget: weights and activations loaded, KV cache sized from gpu_memory_utilization {}",
        opts.gpu_memory_utilization
    );
    progress(total, total);

    let weight_bytes = {
        let mut b = embed.bytes() + final_norm.bytes() + lm_head.as_ref().map_or(0, |t| t.bytes());
        for l in &layers {
            b += l.input_norm.bytes() + l.qkv.bytes() + l.o.bytes() + l.post_norm.bytes() + l.gate_up.bytes() + l.down.bytes();
            b += l.qkv_bias.as_ref().map_or(0, |t| t.bytes()) + l.q_norm.as_ref().map_or(0, |t| t.bytes()) + l.k_norm.as_ref().map_or(0, |t| t.bytes());
        }
        b as u64
    };
    let eos_token_ids = llmd_models::config::eos_token_ids(&cfg, &generation);
    let runner = CudaRunner { gpu, cfg: cfg.clone(), embed, lm_head, final_norm, cos_sin, layers, act, layout, max_tokens, max_seqs, max_blocks_per_seq };
    Ok(LoadedModel {
        runner: Box::new(runner),
        num_params: ckpt.num_elements(),
        weight_bytes,
        dtype: "bfloat16".to_string(),
        max_position_embeddings: cfg.max_position_embeddings,
        vocab_size: cfg.vocab_size,
        eos_token_ids,
        config: cfg,
        generation,
    })
}

impl CudaRunner {
    fn step(&mut self, batch: &ForwardBatch) -> Result<StepLogits, CudaError> {
        let t = batch.num_tokens();
        let s = batch.seqs.len();
        if t == 0 || t > self.max_tokens || s > self.max_seqs {
            return Err(CudaError::Shape(format!("batch of {t} tokens / {s} sequences (limits {} / {})", self.max_tokens, self.max_seqs)));
        }
        let bs = self.layout.block_size;
        // Host-side metadata for this step.
        let mut slots = vec![0i64; t];
        let mut query_seq = vec![0i32; t];
        let mut tables = vec![0i32; s * self.max_blocks_per_seq];
        let mut logit_rows = Vec::new();
        let mut max_context = 0usize;
        for (si, seq) in batch.seqs.iter().enumerate() {
            let ctx = seq.context_before + seq.len;
            if seq.block_table.len() * bs < ctx || seq.block_table.len() > self.max_blocks_per_seq {
                return Err(CudaError::Shape(format!("sequence {si}: {} blocks for {ctx} tokens (max {} blocks)", seq.block_table.len(), self.max_blocks_per_seq)));
            }
            if let Some(&b) = seq.block_table.iter().find(|&&b| b as usize >= self.layout.num_blocks) {
                return Err(CudaError::Shape(format!("sequence {si}: block id {b} >= {} blocks", self.layout.num_blocks)));
            }
            max_context = max_context.max(ctx);
            for (j, &b) in seq.block_table.iter().enumerate() {
                tables[si * self.max_blocks_per_seq + j] = b as i32;
            }
            for k in 0..seq.len {
                let pos = seq.context_before + k;
                let ti = seq.start + k;
                slots[ti] = seq.block_table[pos / bs] as i64 * bs as i64 + (pos % bs) as i64;
                query_seq[ti] = si as i32;
            }
            if seq.wants_logits {
                logit_rows.push((seq.start + seq.len - 1) as i32);
            }
        }
        let positions: Vec<i32> = batch.positions.iter().map(|&p| p as i32).collect();
        if let Some(&bad) = batch.tokens.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(CudaError::Shape(format!("token id {bad} >= vocab size {}", self.cfg.vocab_size)));
        }
        let gpu = &self.gpu;
        let a = &mut self.act;
        a.ids.upload(gpu, &batch.tokens)?;
        a.positions.upload(gpu, &positions)?;
        a.slots.upload(gpu, &slots)?;
        a.query_seq.upload(gpu, &query_seq)?;
        a.block_tables.upload(gpu, &tables)?;
        a.logit_rows.upload(gpu, &logit_rows)?;

        let cfg = &self.cfg;
        let (d, hq) = (cfg.head_dim, cfg.num_attention_heads);
        let eps = cfg.rms_norm_eps as f32;
        let scale = 1.0 / (d as f32).sqrt();
        let ids = a.ids.rows(0, t);
        let residual = a.residual.rows(0, t);
        let normed = a.normed.rows(0, t);
        let qkv = a.qkv.rows(0, t);
        let q = a.q.rows(0, t);
        let attn = a.attn.rows(0, t);
        let x = a.x.rows(0, t);
        let gate_up = a.gate_up.rows(0, t);
        let act = a.act.rows(0, t);
        let positions_r = a.positions.rows(0, t);
        let slots_r = a.slots.rows(0, t);
        let query_seq_r = a.query_seq.rows(0, t);
        let tables_r = a.block_tables.rows(0, s);

        gpu.embedding(&residual, &self.embed.r(), &ids)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let prev = if li == 0 { None } else { Some(&x) };
            gpu.add_rmsnorm(&normed, &residual, prev, &layer.input_norm.r(), eps)?;
            gpu.linear(&qkv, &normed, &layer.qkv.r())?;
            gpu.qkv_rope_cache(
                &qkv,
                layer.qkv_bias.as_ref().map(|b| b.r()).as_ref(),
                layer.q_norm.as_ref().map(|b| b.r()).as_ref(),
                layer.k_norm.as_ref().map(|b| b.r()).as_ref(),
                eps,
                &self.cos_sin.r(),
                &positions_r,
                &slots_r,
                &q,
                &layer.k_cache.r(),
                &layer.v_cache.r(),
            )?;
            gpu.paged_attention(&attn, &q, &layer.k_cache.r(), &layer.v_cache.r(), &tables_r, &query_seq_r, &positions_r, max_context, &a.part_acc.r(), &a.part_ml.r(), scale)?;
            gpu.linear(&x, &attn.reshape(&[t, hq * d]), &layer.o.r())?;
            gpu.add_rmsnorm(&normed, &residual, Some(&x), &layer.post_norm.r(), eps)?;
            gpu.linear(&gate_up, &normed, &layer.gate_up.r())?;
            gpu.silu_mul(&act, &gate_up)?;
            gpu.linear(&x, &act, &layer.down.r())?;
        }
        gpu.add_rmsnorm(&normed, &residual, Some(&x), &self.final_norm.r(), eps)?;
        let r = logit_rows.len();
        if r == 0 {
            gpu.synchronize()?;
            return Ok(StepLogits { vocab_size: cfg.vocab_size, rows: Vec::new() });
        }
        let selected = a.selected.rows(0, r);
        gpu.gather_rows(&selected, &normed, &a.logit_rows.rows(0, r))?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed).r();
        let logits = a.logits.rows(0, r);
        gpu.linear(&logits, &selected, &head)?;
        let flat = a.logits.download_f32(gpu, r * cfg.vocab_size)?;
        let rows = flat.chunks_exact(cfg.vocab_size).map(<[f32]>::to_vec).collect();
        Ok(StepLogits { vocab_size: cfg.vocab_size, rows })
    }
}

impl ModelRunner for CudaRunner {
    fn kv_layout(&self) -> KvCacheLayout {
        self.layout
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<StepLogits, ModelError> {
        Ok(self.step(batch)?)
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), ModelError> {
        let n = self.layout.num_blocks as u32;
        if src >= n || dst >= n {
            return Err(ModelError::InvalidBatch(format!("copy_block {src} -> {dst} with {n} blocks")));
        }
        let per_block = self.layout.block_size * self.layout.num_kv_heads * self.layout.head_dim * 2;
        for layer in &self.layers {
            for cache in [&layer.k_cache, &layer.v_cache] {
                cache.copy_within(&self.gpu, src as usize * per_block, dst as usize * per_block, per_block).map_err(ModelError::from)?;
            }
        }
        Ok(())
    }

    fn device_name(&self) -> String {
        format!("cuda:{}", self.gpu.ordinal)
    }
}
