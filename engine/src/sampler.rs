//! Token sampling for one sequence from one row of logits.
//!
//! Order of processing (as in HF transformers / vLLM):
//! 1. `min_tokens`: while fewer tokens were generated, EOS (unless `ignore_eos`) and
//!    `stop_token_ids` get `-inf`;
//! 2. repetition penalty (HF semantics) over every token seen in the prompt and the output:
//!    a positive logit is divided by the penalty, a negative one multiplied;
//! 3. presence / frequency penalties (OpenAI semantics) over output tokens:
//!    `logit -= frequency_penalty * count + presence_penalty * (count > 0)`;
//! 4. temperature (skipped when greedy);
//! 5. **logprobs are taken here**: the log-softmax of the logits after steps 1–4, before any
//!    truncation, so `top_logprobs` may list tokens that top-k/top-p would never pick. With
//!    temperature 0 (greedy) that is the log-softmax of the penalised logits. A masked token
//!    (`-inf`) reports [`MASKED_LOGPROB`] so the value stays representable in JSON;
//! 6. top-k, then top-p (smallest set whose probability reaches `top_p`), then min-p
//!    (drop tokens below `min_p` times the most likely token's probability);
//! 7. greedy (`temperature == 0`): argmax, ties to the lowest id; otherwise one draw from the
//!    sequence's own ChaCha20 generator.
//!
//! Steps 1–3 become a [`TokenPick`]'s adjustments and steps 6–7 follow its exact rule
//! (`llmd_models::pick`), so a backend can pick on its device: the same draw gives the same
//! token from the same logits on the CPU or the GPU. Only logprobs need the row on the host.
//!
//! Each sequence owns its RNG, seeded from the request's `seed` with the choice index as the
//! ChaCha stream, so a seeded request gives the same tokens whatever else is in the batch,
//! and choice 0 of an `n > 1` request matches the same request with `n == 1`.

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use llmd_models::pick::{LogitAdjust, TokenPick};

use crate::request::SamplingParams;

/// Logprob reported for a token the sampler masked out (its true value is `-inf`).
pub const MASKED_LOGPROB: f32 = -9999.0;

/// One sampled token with its logprob and, if asked, the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` (see the module doc for which distribution).
    pub logprob: f32,
    /// The `logprobs` most likely tokens, most likely first; empty when not asked.
    pub top: Vec<(u32, f32)>,
}

/// Sampling state of one sequence: its RNG and the token statistics penalties need.
#[derive(Debug, Clone)]
pub struct SeqSampler {
    rng: ChaCha20Rng,
    /// Every token of the prompt and the output (repetition penalty only).
    seen: HashSet<u32>,
    track_seen: bool,
    /// Output token counts (presence / frequency penalties).
    output_counts: HashMap<u32, u32>,
    num_output: u32,
    /// Tokens masked while `num_output < min_tokens`.
    min_tokens_mask: Vec<u32>,
}

impl SeqSampler {
    /// State for choice `choice` of a request with `params` and `prompt`; `eos` are the
    /// model's end-of-sequence ids.
    pub fn new(params: &SamplingParams, prompt: &[u32], choice: u32, eos: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::rng().random());
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        rng.set_stream(u64::from(choice));
        let mut min_tokens_mask = params.stop_token_ids.clone();
        if !params.ignore_eos {
            min_tokens_mask.extend_from_slice(eos);
        }
        SeqSampler {
            rng,
            seen: if params.repetition_penalty != 1.0 { prompt.iter().copied().collect() } else { HashSet::new() },
            track_seen: params.repetition_penalty != 1.0,
            output_counts: HashMap::new(),
            num_output: 0,
            min_tokens_mask,
        }
    }

    /// Tokens sampled so far.
    pub fn num_output(&self) -> u32 {
        self.num_output
    }

    /// The device-independent pick for the next token ([`TokenPick`]): this sequence's penalties
    /// and masks as adjustments, and one uniform draw from its generator (none when greedy).
    /// Call once per token, then [`Self::accept`] the token a backend picked with it, or hand it
    /// to [`Self::sample`].
    pub fn pick(&mut self, params: &SamplingParams, width: u32) -> TokenPick {
        let mut adjust: BTreeMap<u32, LogitAdjust> = BTreeMap::new();
        let entry = |t: u32| LogitAdjust { token: t, divide_positive: 1.0, subtract: 0.0 };
        if params.repetition_penalty != 1.0 {
            for &t in &self.seen {
                adjust.entry(t).or_insert_with(|| entry(t)).divide_positive = params.repetition_penalty;
            }
        }
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                adjust.entry(t).or_insert_with(|| entry(t)).subtract +=
                    params.frequency_penalty * c as f32 + params.presence_penalty;
            }
        }
        if self.num_output < params.min_tokens {
            for &t in &self.min_tokens_mask {
                adjust.entry(t).or_insert_with(|| entry(t)).subtract = f32::INFINITY;
            }
        }
        let greedy = params.temperature == 0.0;
        TokenPick {
            width,
            temperature: params.temperature,
            top_k: params.top_k.unwrap_or(0),
            top_p: params.top_p,
            min_p: params.min_p,
            uniform: if greedy { 0.0 } else { self.rng.random::<f64>() },
            adjust: adjust.into_values().collect(),
        }
    }

    /// Records a token a backend picked with [`Self::pick`]'s rule.
    pub fn accept(&mut self, token: u32) -> Sampled {
        self.record(token);
        Sampled { token, logprob: 0.0, top: Vec::new() }
    }

    /// Picks the next token from `logits` (one vocabulary row, ids below `width` are
    /// candidates) with `pick` (from [`Self::pick`], or a fresh one when `None`), computes the
    /// logprobs asked for, and records the token.
    pub fn sample(&mut self, params: &SamplingParams, logits: &[f32], width: u32, pick: Option<TokenPick>) -> Sampled {
        let pick = pick.unwrap_or_else(|| self.pick(params, width));
        let mut l = logits[..(width as usize).min(logits.len())].to_vec();
        pick.apply_adjustments(&mut l);
        let token = pick.choose(&l);
        let (logprob, top) = match params.logprobs {
            Some(k) => {
                if params.temperature != 0.0 && params.temperature != 1.0 {
                    let inv = 1.0 / params.temperature;
                    for x in l.iter_mut() {
                        *x *= inv;
                    }
                }
                let lse = log_sum_exp(&l);
                let lp = |x: f32| if x.is_finite() { x - lse } else { MASKED_LOGPROB };
                let top = top_k_indices(&l, k as usize).into_iter().map(|t| (t, lp(l[t as usize]))).collect();
                (lp(l[token as usize]), top)
            }
            None => (0.0, Vec::new()),
        };
        self.record(token);
        Sampled { token, logprob, top }
    }

    fn record(&mut self, token: u32) {
        self.num_output += 1;
        *self.output_counts.entry(token).or_default() += 1;
        if self.track_seen {
            self.seen.insert(token);
        }
    }
}

fn log_sum_exp(l: &[f32]) -> f32 {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = l.iter().map(|&x| f64::from(x - max).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` indices with the largest values, largest first, ties to the lowest id.
fn top_k_indices(l: &[f32], k: usize) -> Vec<u32> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..l.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { seed: Some(42), ..SamplingParams::default() }
    }

    fn ln_probs(p: &[f32]) -> Vec<f32> {
        p.iter().map(|x| x.ln()).collect()
    }

    fn histogram(p: &SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = SeqSampler::new(p, &[], 0, &[]);
        let mut h = vec![0; logits.len()];
        for _ in 0..draws {
            // Fresh counts each time: penalties are off in these tests anyway.
            h[s.sample(p, logits, u32::MAX, None).token as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_takes_argmax_lowest_id_on_ties() {
        let p = SamplingParams { temperature: 0.0, ..params() };
        let mut s = SeqSampler::new(&p, &[], 0, &[]);
        assert_eq!(s.sample(&p, &[0.1, 3.0, 3.0, -1.0], u32::MAX, None).token, 1);
        assert_eq!(s.sample(&p, &[f32::NAN, 0.5, 0.2], u32::MAX, None).token, 1);
    }

    #[test]
    fn temperature_sampling_follows_softmax() {
        let p = params();
        let logits = ln_probs(&[0.7, 0.2, 0.1]);
        let h = histogram(&p, &logits, 20_000);
        let f: Vec<f64> = h.iter().map(|&c| c as f64 / 20_000.0).collect();
        assert!((f[0] - 0.7).abs() < 0.02 && (f[1] - 0.2).abs() < 0.02 && (f[2] - 0.1).abs() < 0.02, "{f:?}");
        // Low temperature sharpens towards the argmax.
        let cold = SamplingParams { temperature: 0.1, ..params() };
        assert!(histogram(&cold, &logits, 2000)[0] > 1990);
    }

    #[test]
    fn top_k_limits_candidates() {
        let p = SamplingParams { top_k: Some(2), ..params() };
        let h = histogram(&p, &ln_probs(&[0.3, 0.25, 0.25, 0.2]), 5000);
        assert!(h[0] > 0 && h[1] + h[2] > 0);
        // Tie at rank 2 goes to the lower id.
        assert_eq!(h[2] + h[3], 0, "{h:?}");
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        let p = SamplingParams { top_p: 0.6, ..params() };
        let h = histogram(&p, &ln_probs(&[0.2, 0.5, 0.3]), 5000);
        assert_eq!(h[0], 0, "{h:?}");
        assert!(h[1] > 0 && h[2] > 0);
        let p = SamplingParams { top_p: 0.45, ..params() };
        let h = histogram(&p, &ln_probs(&[0.2, 0.5, 0.3]), 500);
        assert_eq!(h[1], 500);
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        let p = SamplingParams { min_p: 0.3, ..params() };
        let h = histogram(&p, &ln_probs(&[0.6, 0.3, 0.1]), 5000);
        assert_eq!(h[2], 0, "{h:?}");
        assert!(h[0] > 0 && h[1] > 0);
    }

    #[test]
    fn repetition_penalty_hf_semantics() {
        let p = SamplingParams { temperature: 0.0, repetition_penalty: 2.0, logprobs: Some(0), ..params() };
        let prompt = [0u32, 2];
        let mut s = SeqSampler::new(&p, &prompt, 0, &[]);
        let mut l = vec![4.0, 3.0, -1.0, 0.0];
        s.pick(&p, u32::MAX).apply_adjustments(&mut l);
        assert_eq!(l, vec![2.0, 3.0, -2.0, 0.0]);
        // Token 0 was the argmax, now token 1 wins; then 1 is penalised too (it is in the output).
        let mut s = SeqSampler::new(&p, &prompt, 0, &[]);
        assert_eq!(s.sample(&p, &[4.0, 3.0, -1.0, 0.0], u32::MAX, None).token, 1);
        assert_eq!(s.sample(&p, &[4.0, 3.9, -1.0, 0.0], u32::MAX, None).token, 0);
    }

    #[test]
    fn presence_and_frequency_penalties_openai_semantics() {
        let p = SamplingParams { temperature: 0.0, presence_penalty: 0.5, frequency_penalty: 1.0, ..params() };
        let mut s = SeqSampler::new(&p, &[1, 1, 1], 0, &[]);
        // Prompt tokens are not penalised.
        assert_eq!(s.sample(&p, &[0.0, 5.0, 0.0], u32::MAX, None).token, 1);
        assert_eq!(s.sample(&p, &[0.0, 5.0, 0.0], u32::MAX, None).token, 1);
        let mut l = vec![0.0, 5.0, 0.0];
        s.pick(&p, u32::MAX).apply_adjustments(&mut l);
        assert_eq!(l, vec![0.0, 5.0 - 2.0 - 0.5, 0.0]);
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_ids_until_reached() {
        let p = SamplingParams { temperature: 0.0, min_tokens: 2, stop_token_ids: vec![3], ..params() };
        let mut s = SeqSampler::new(&p, &[], 0, &[0]);
        let l = [9.0, 1.0, 0.0, 8.0];
        assert_eq!(s.sample(&p, &l, u32::MAX, None).token, 1);
        assert_eq!(s.sample(&p, &l, u32::MAX, None).token, 1);
        assert_eq!(s.sample(&p, &l, u32::MAX, None).token, 0, "min_tokens reached");
        // ignore_eos: EOS is an ordinary token, not masked.
        let p = SamplingParams { ignore_eos: true, ..p };
        let mut s = SeqSampler::new(&p, &[], 0, &[0]);
        assert_eq!(s.sample(&p, &l, u32::MAX, None).token, 0);
    }

    #[test]
    fn logprobs_are_log_softmax_of_processed_logits() {
        let p = SamplingParams { temperature: 0.5, logprobs: Some(2), ..params() };
        let mut s = SeqSampler::new(&p, &[], 0, &[]);
        let l = [1.0f32, 2.0, 0.5];
        let out = s.sample(&p, &l, u32::MAX, None);
        let scaled: Vec<f32> = l.iter().map(|x| x / 0.5).collect();
        let lse = scaled.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((out.logprob - (scaled[out.token as usize] - lse)).abs() < 1e-5);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((out.top[0].1 - (scaled[1] - lse)).abs() < 1e-5);
        // Masked tokens report a finite sentinel.
        let p = SamplingParams { temperature: 0.0, min_tokens: 1, logprobs: Some(3), ..params() };
        let mut s = SeqSampler::new(&p, &[], 0, &[1]);
        let out = s.sample(&p, &l, u32::MAX, None);
        assert_eq!(out.token, 0);
        assert_eq!(out.top[2], (1, MASKED_LOGPROB));
    }

    #[test]
    fn same_seed_same_tokens_whatever_the_batch() {
        let p = SamplingParams { seed: Some(7), temperature: 1.0, ..SamplingParams::default() };
        let row = |step: usize| -> Vec<f32> { (0..50).map(|i| ((i * 31 + step * 17) % 13) as f32 * 0.3).collect() };
        let mut alone = SeqSampler::new(&p, &[1, 2], 0, &[]);
        let a: Vec<u32> = (0..40).map(|i| alone.sample(&p, &row(i), u32::MAX, None).token).collect();
        // Same request interleaved with other sequences sampling in between (another batch).
        let other = SamplingParams { seed: None, ..p.clone() };
        let mut mine = SeqSampler::new(&p, &[1, 2], 0, &[]);
        let mut noise: Vec<SeqSampler> = (0..3).map(|c| SeqSampler::new(&other, &[5], c, &[])).collect();
        let mut b = Vec::new();
        for i in 0..40 {
            for n in noise.iter_mut().take(i % 4) {
                n.sample(&other, &row(i + 3), u32::MAX, None);
            }
            b.push(mine.sample(&p, &row(i), u32::MAX, None).token);
        }
        assert_eq!(a, b);
        // Another seed, or another choice index, gives another stream.
        let mut c1 = SeqSampler::new(&p, &[1, 2], 1, &[]);
        let c: Vec<u32> = (0..40).map(|i| c1.sample(&p, &row(i), u32::MAX, None).token).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn device_pick_path_and_host_path_give_the_same_tokens() {
        // A request with logprobs samples on the host; without, the backend follows the TokenPick
        // (here the host rule standing in for the device). Same seed, same tokens.
        let p = SamplingParams {
            seed: Some(11),
            temperature: 0.9,
            top_k: Some(7),
            top_p: 0.8,
            min_p: 0.02,
            repetition_penalty: 1.3,
            presence_penalty: 0.4,
            frequency_penalty: 0.2,
            ..SamplingParams::default()
        };
        let row = |step: usize| -> Vec<f32> { (0..64).map(|i| ((i * 37 + step * 11) % 17) as f32 * 0.25).collect() };
        let mut host = SeqSampler::new(&p, &[3, 5], 0, &[]);
        let mut device = SeqSampler::new(&p, &[3, 5], 0, &[]);
        let with_logprobs = SamplingParams { logprobs: Some(2), ..p.clone() };
        for step in 0..60 {
            let a = host.sample(&with_logprobs, &row(step), 60, None).token;
            let pick = device.pick(&p, 60);
            let b = device.accept(pick.pick_host(&row(step))).token;
            assert_eq!(a, b, "step {step}");
            assert!(a < 60);
        }
    }
}
