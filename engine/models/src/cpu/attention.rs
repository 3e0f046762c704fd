//! Attention over the paged KV cache on the CPU.
//!
//! Every new token attends to positions `0 ..= its own position` of its sequence, read
//! through the sequence's block table. Because the token's own K/V were written into the
//! cache before this runs, one code path serves a whole prompt, a prompt chunk after earlier
//! chunks, a prompt behind a cached prefix and a decode step: the causal mask inside a chunk
//! and the visibility of the cached prefix both follow from `token_ctx`.

use rayon::prelude::*;

use super::kv::{BatchPlan, PagedKvCache};

/// `q` is `[tokens, num_heads, head_dim]` (RoPE applied). Returns the attention output in the
/// same layout. Query head `h` reads KV head `h / (num_heads / num_kv_heads)` (GQA/MQA).
pub fn paged_attention(
    q: &[f32],
    kv: &PagedKvCache,
    layer: usize,
    plan: &BatchPlan,
    num_heads: usize,
    head_dim: usize,
) -> Vec<f32> {
    let layout = kv.layout();
    let num_kv_heads = layout.num_kv_heads;
    let group = num_heads / num_kv_heads;
    let slot_width = num_kv_heads * head_dim;
    let scale = (head_dim as f64).powf(-0.5) as f32;
    let (kc, vc) = (kv.k(layer), kv.v(layer));
    let mut out = vec![0.0f32; q.len()];
    // One work item per (token, head): decode steps have few tokens but many heads.
    out.par_chunks_mut(head_dim).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
        let (t, h) = (idx / num_heads, idx % num_heads);
        let kvh = h / group;
        let qh = &q[idx * head_dim..(idx + 1) * head_dim];
        let slots = &plan.seq_slots[plan.token_seq[t]][..plan.token_ctx[t]];
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for &s in slots {
            let base = s * slot_width + kvh * head_dim;
            let k = &kc[base..base + head_dim];
            let dot: f32 = qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale;
            max = max.max(dot);
            scores.push(dot);
        }
        let mut denom = 0.0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            denom += *sc;
        }
        let inv = 1.0 / denom;
        for (&s, &p) in slots.iter().zip(scores.iter()) {
            let base = s * slot_width + kvh * head_dim;
            let w = p * inv;
            for (ov, vv) in o.iter_mut().zip(&vc[base..base + head_dim]) {
                *ov += w * vv;
            }
        }
    });
    out
}
