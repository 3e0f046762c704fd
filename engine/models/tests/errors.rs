//! Bad inputs fail with errors that name the problem: unknown architecture, missing tensor,
//! shape mismatch, unsupported dtype, truncated file, hostile header length, KV budget too
//! small, malformed batches. Each test works on a copy of a fixture in a temp folder.

mod common;

use std::path::Path;

use common::*;
use llmd_models::loader::{Checkpoint, MAX_HEADER_BYTES};
use llmd_models::{ForwardBatch, LoadConfig, ModelError, SeqSlice, load_cpu};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixtures_root().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

fn try_load(dir: &Path) -> Result<llmd_models::LoadedModel, ModelError> {
    load_cpu(dir, &LoadConfig { kv_cache_bytes: 1 << 20, block_size: 4 }, &mut |_, _| {})
}

fn load_err(dir: &Path) -> ModelError {
    match try_load(dir) {
        Ok(_) => panic!("load of {} should fail", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites `model.safetensors` of `dir` through `edit(name, dtype, shape, data)`, which
/// returns the replacement or None to drop the tensor.
fn rewrite(dir: &Path, edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(t) = edit(&name, view.dtype(), view.shape().to_vec(), view.data().to_vec()) {
            kept.push((name, t));
        }
    }
    let views: Vec<(String, TensorView)> =
        kept.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn unknown_architecture_is_named() {
    let d = copy_fixture("llama");
    let cfg = std::fs::read_to_string(d.path().join("config.json")).unwrap();
    std::fs::write(d.path().join("config.json"), cfg.replace("LlamaForCausalLM", "GPTNeoXForCausalLM")).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, ModelError::UnknownArchitecture { name, .. } if name == "GPTNeoXForCausalLM"), "{e}");
    assert!(e.to_string().contains("Qwen3MoeForCausalLM"), "message lists the supported ones: {e}");
}

#[test]
fn missing_tensor_is_named() {
    let d = copy_fixture("qwen2");
    rewrite(d.path(), |n, dt, s, b| (n != "model.layers.1.self_attn.k_proj.bias").then_some((dt, s, b)));
    let e = load_err(d.path());
    assert!(matches!(&e, ModelError::MissingTensor(n) if n == "model.layers.1.self_attn.k_proj.bias"), "{e}");
}

#[test]
fn untied_model_without_lm_head_fails() {
    let d = copy_fixture("llama");
    rewrite(d.path(), |n, dt, s, b| (n != "lm_head.weight").then_some((dt, s, b)));
    let e = load_err(d.path());
    assert!(matches!(&e, ModelError::MissingTensor(n) if n == "lm_head.weight"), "{e}");
}

#[test]
fn shape_mismatch_is_named() {
    let d = copy_fixture("llama");
    rewrite(d.path(), |n, dt, s, b| {
        if n == "model.norm.weight" { Some((dt, vec![32], b[..32 * 4].to_vec())) } else { Some((dt, s, b)) }
    });
    let e = load_err(d.path());
    match &e {
        ModelError::ShapeMismatch { name, expected, actual } => {
            assert_eq!(name, "model.norm.weight");
            assert_eq!((expected.as_slice(), actual.as_slice()), (&[64usize][..], &[32usize][..]));
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let d = copy_fixture("llama");
    rewrite(d.path(), |n, dt, s, b| if n == "model.norm.weight" { Some((Dtype::I32, s, b)) } else { Some((dt, s, b)) });
    let e = load_err(d.path());
    assert!(matches!(&e, ModelError::UnsupportedDtype { name, .. } if name == "model.norm.weight"), "{e}");
}

#[test]
fn truncated_file_is_rejected() {
    let d = copy_fixture("llama");
    let path = d.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 100).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, ModelError::Safetensors { path: p, .. } if p.ends_with("model.safetensors")), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn hostile_header_length_is_rejected_without_allocating() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("model.safetensors");
    // Claims a 1 TiB header in a 24-byte file.
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\":1}         ");
    std::fs::write(&path, &bytes).unwrap();
    let e = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap_err().to_string();
    assert!(e.contains("header length") && e.contains(&MAX_HEADER_BYTES.to_string()), "{e}");

    // Within the limit but past the end of the file.
    let mut bytes = 4096u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, &bytes).unwrap();
    let e = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap_err().to_string();
    assert!(e.contains("runs past the end"), "{e}");

    // Shorter than the length prefix itself.
    std::fs::write(&path, b"abc").unwrap();
    let e = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap_err().to_string();
    assert!(e.contains("8-byte"), "{e}");
}

#[test]
fn corrupt_header_json_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("model.safetensors");
    let header = b"{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 999]}}";
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[0u8; 16]);
    std::fs::write(&path, &bytes).unwrap();
    let e = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(matches!(e, ModelError::Safetensors { .. }), "{e}");
}

#[test]
fn sharded_checkpoint_with_missing_shard_fails() {
    let d = copy_fixture("qwen3");
    std::fs::remove_file(d.path().join("model-00003-of-00006.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, ModelError::Io { path, .. } if path.ends_with("model-00003-of-00006.safetensors")), "{e}");
}

#[test]
fn kv_budget_smaller_than_one_block_fails() {
    let e =
        load_cpu(&fixtures_root().join("llama"), &LoadConfig { kv_cache_bytes: 100, block_size: 16 }, &mut |_, _| {})
            .unwrap_err();
    assert!(matches!(e, ModelError::InsufficientMemory(_)), "{e}");
    assert!(e.to_string().contains("100 bytes"), "{e}");
}

#[test]
fn loaded_model_facts() {
    let m = load("qwen2");
    assert_eq!(m.config.architecture, "Qwen2ForCausalLM");
    assert_eq!(m.dtype, llmd_models::Dtype::Float32);
    assert_eq!(m.vocab_size, 576);
    assert_eq!(m.max_position_embeddings, 256);
    // generation_config.json lists [<|im_end|>, <|endoftext|>].
    assert_eq!(m.eos_token_ids, vec![507, 505]);
    assert_eq!(m.weight_bytes, m.num_params * 4);
    assert_eq!(m.runner.device_name(), "cpu");
    let l = m.runner.kv_layout();
    assert_eq!((l.num_layers, l.num_kv_heads, l.head_dim, l.block_size, l.dtype_bytes), (2, 2, 16, 4, 4));
    assert_eq!(l.num_blocks, 8 * 1024 * 1024 / l.bytes_per_block());
    // The dtype computed in, whatever the checkpoint stores (bfloat16 and float16 here).
    assert_eq!(load("llama_mha").dtype, llmd_models::Dtype::Float32);
    assert_eq!(load("mistral").dtype, llmd_models::Dtype::Float32);
}

#[test]
fn malformed_batches_are_rejected() {
    let mut m = load("llama");
    let n = m.runner.kv_layout().num_blocks as u32;
    let good = ForwardBatch {
        tokens: vec![1, 2, 3],
        positions: vec![0, 1, 2],
        seqs: vec![SeqSlice { start: 0, len: 3, context_before: 0, block_table: vec![0], wants_logits: true }],
    };
    assert_eq!(m.runner.forward(&good).unwrap().rows.len(), 1);

    let cases: Vec<(ForwardBatch, &str)> = vec![
        (ForwardBatch { positions: vec![0, 1], ..good.clone() }, "positions"),
        (ForwardBatch { tokens: vec![1, 2, 9999], ..good.clone() }, "vocab"),
        (ForwardBatch { positions: vec![0, 1, 5], ..good.clone() }, "positions[2]"),
        (
            ForwardBatch {
                seqs: vec![SeqSlice { start: 0, len: 3, context_before: 0, block_table: vec![n], wants_logits: true }],
                ..good.clone()
            },
            "num_blocks",
        ),
        (
            ForwardBatch {
                seqs: vec![SeqSlice { start: 0, len: 3, context_before: 2, block_table: vec![0], wants_logits: true }],
                ..good.clone()
            },
            "block_table",
        ),
        (
            ForwardBatch {
                seqs: vec![SeqSlice { start: 0, len: 2, context_before: 0, block_table: vec![0], wants_logits: true }],
                ..good.clone()
            },
            "cover",
        ),
    ];
    for (batch, needle) in cases {
        let e = m.runner.forward(&batch).unwrap_err();
        assert!(matches!(e, ModelError::InvalidBatch(_)), "{e}");
        assert!(e.to_string().contains(needle), "`{e}` should mention {needle}");
    }
    let e = m.runner.copy_block(0, n).unwrap_err();
    assert!(e.to_string().contains("num_blocks"), "{e}");
}

#[test]
fn sliding_window_caps_the_served_context() {
    // Mistral v0.1 style: a 64-token window inside a 256-token context.
    let d = copy_fixture("mistral");
    let path = d.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::json!(64);
    std::fs::write(&path, cfg.to_string()).unwrap();
    let m = try_load(d.path()).unwrap();
    assert_eq!(m.config.sliding_window_active(), Some(64));
    assert_eq!(m.max_position_embeddings, 64, "the default context stops at the window");
    let e = m.config.context_limit(Some(128)).unwrap_err().to_string();
    assert!(e.contains("`max_model_len` = 128") && e.contains("`sliding_window` = 64"), "{e}");
    assert_eq!(m.config.context_limit(Some(32)).unwrap(), 32);
}

#[test]
fn missing_bias_the_config_promises_is_named() {
    let d = copy_fixture("llama");
    let path = d.path().join("config.json");
    let cfg = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, cfg.replace("\"mlp_bias\": false", "\"mlp_bias\": true")).unwrap();
    let e = load_err(d.path());
    assert!(matches!(&e, ModelError::MissingTensor(n) if n == "model.layers.0.mlp.gate_proj.bias"), "{e}");
}

#[test]
fn spec_lists_features_and_refuses_by_name() {
    use llmd_models::spec::{DecoderSpec, SpecFeature};
    let dir = fixtures_root().join("qwen3_moe");
    let cfg = llmd_models::ModelConfig::from_dir(&dir).unwrap();
    let spec = DecoderSpec::new(&cfg, &Checkpoint::open_dir(&dir).unwrap()).unwrap();
    let f = spec.features();
    assert!(f.contains(&SpecFeature::QkNorm) && f.contains(&SpecFeature::RoutedExperts), "{f:?}");
    assert!(!f.contains(&SpecFeature::OProjBias) && !f.contains(&SpecFeature::TiedEmbeddings), "{f:?}");
    let e = spec.refuse_unsupported("a test backend", &[SpecFeature::RoutedExperts]).unwrap_err().to_string();
    assert_eq!(e, "Qwen3MoeForCausalLM uses routed experts, which a test backend does not serve");
    spec.refuse_unsupported("a test backend", &[SpecFeature::SharedExperts]).unwrap();
}
