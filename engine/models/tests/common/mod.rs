//! Shared test driver: loads fixtures and runs a plain greedy loop through a `ModelRunner`,
//! allocating KV blocks sequentially, the way the serving core would.

#![allow(dead_code)]

use std::path::PathBuf;

use llmd_models::{ForwardBatch, LoadConfig, LoadedModel, ModelRunner, SeqSlice, load_cpu};
use serde_json::Value;

pub const BLOCK_SIZE: usize = 4;

pub fn fixtures_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

pub const FIXTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "llama_mha", "llama_bias"];

pub fn load(name: &str) -> LoadedModel {
    let opts = LoadConfig { kv_cache_bytes: 8 * 1024 * 1024, block_size: BLOCK_SIZE };
    let mut last = (0, 0);
    let m = load_cpu(&fixtures_root().join(name), &opts, &mut |d, t| last = (d, t))
        .unwrap_or_else(|e| panic!("loading fixture {name}: {e}"));
    assert!(last.1 > 0 && last.0 == last.1, "progress must end at total, got {last:?}");
    m
}

pub struct Golden {
    pub vocab_size: usize,
    pub prompts: Vec<GoldenPrompt>,
    pub all_positions: Vec<Vec<f32>>,
}

pub struct GoldenPrompt {
    pub ids: Vec<u32>,
    pub greedy: Vec<u32>,
    pub last_logits: Vec<f32>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

pub fn golden(name: &str) -> Golden {
    let text = std::fs::read_to_string(fixtures_root().join(name).join("golden.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    Golden {
        vocab_size: v["vocab_size"].as_u64().unwrap() as usize,
        prompts: v["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| GoldenPrompt {
                ids: ids(&p["ids"]),
                greedy: ids(&p["greedy"]),
                last_logits: floats(&p["last_logits"]),
            })
            .collect(),
        all_positions: v["all_positions"]["logits"].as_array().unwrap().iter().map(floats).collect(),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// First index of the maximum, as torch.argmax.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Hands out block ids 0, 1, 2, ...
#[derive(Default)]
pub struct BlockAlloc {
    pub next: u32,
}

impl BlockAlloc {
    pub fn take(&mut self) -> u32 {
        self.next += 1;
        self.next - 1
    }
}

/// One sequence being generated: all its tokens, how many are in the cache, its blocks.
pub struct Seq {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    pub cached: usize,
    pub blocks: Vec<u32>,
    /// Logits of the first step that completed the prompt.
    pub first_logits: Option<Vec<f32>>,
}

impl Seq {
    pub fn new(prompt: &[u32]) -> Self {
        Seq { ids: prompt.to_vec(), prompt_len: prompt.len(), cached: 0, blocks: Vec::new(), first_logits: None }
    }

    pub fn generated(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }
}

/// Greedy generation of `new_tokens` for every sequence, batched together; prompts are fed
/// in chunks of at most `chunk` tokens per sequence per step.
pub fn generate(
    runner: &mut dyn ModelRunner,
    seqs: &mut [Seq],
    alloc: &mut BlockAlloc,
    chunk: usize,
    new_tokens: usize,
) {
    let bs = runner.kv_layout().block_size;
    loop {
        let mut batch = ForwardBatch::default();
        let mut active = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if s.generated().len() >= new_tokens {
                continue;
            }
            let len = (s.ids.len() - s.cached).min(chunk);
            let total = s.cached + len;
            while s.blocks.len() * bs < total {
                s.blocks.push(alloc.take());
            }
            let start = batch.tokens.len();
            batch.tokens.extend_from_slice(&s.ids[s.cached..total]);
            batch.positions.extend((s.cached..total).map(|p| p as u32));
            let wants_logits = total == s.ids.len();
            batch.seqs.push(SeqSlice {
                start,
                len,
                context_before: s.cached,
                block_table: s.blocks.clone(),
                wants_logits,
            });
            active.push((i, wants_logits, total));
        }
        if active.is_empty() {
            return;
        }
        let out = runner.forward(&batch).expect("forward");
        assert_eq!(out.rows.len(), active.iter().filter(|a| a.1).count());
        let mut rows = out.rows.into_iter();
        for (i, wants, total) in active {
            let s = &mut seqs[i];
            s.cached = total;
            if wants {
                let row = rows.next().unwrap();
                assert_eq!(row.len(), out.vocab_size);
                s.ids.push(argmax(&row));
                if s.first_logits.is_none() {
                    s.first_logits = Some(row);
                }
            }
        }
    }
}
