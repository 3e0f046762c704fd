//! How one token is picked from one row of logits: the exact rule a backend follows when the
//! serving core hands it a [`TokenPick`] instead of asking for the logits.
//!
//! The rule is written so that a GPU can follow it bit for bit with block-wide integer
//! reductions, and so that the same `uniform` gives the same token on every backend for the
//! same logits (seeded requests do not depend on the batch or on where sampling ran):
//! 1. `adjust`: penalties and masks, per listed token (NaN logits count as `-inf`);
//! 2. greedy (`temperature == 0`): the argmax, ties to the lowest id;
//! 3. otherwise `p_i = exp(x_i / T - max_j x_j / T)` in f32 (so the top token has `p == 1`),
//!    and the weight `w_i = floor(p_i * 2^32)` as an integer; tokens with `w == 0` drop out.
//!    Ordering "by probability" compares the bit patterns of `p` (monotone for `p >= 0`),
//!    ties going to the lower id;
//! 4. top-k: the `k` first tokens in that order;
//! 5. top-p: of those, the shortest prefix in that order whose weight sum reaches
//!    `floor(top_p * total)` (at least 1);
//! 6. min-p: drop tokens with `p < min_p` (relative to the top token, whose `p` is 1);
//! 7. draw: `target = floor(uniform * total)` over the survivors' integer weights, and the
//!    token is the first id, in id order, whose running sum exceeds `target`.
//!
//! Integer weights make every sum exact and order-independent, which is what lets a parallel
//! implementation agree with this sequential one.

/// Penalty or mask for one token, applied to its logit before anything else:
/// `x = if x > 0 { x / divide_positive } else { x * divide_positive } - subtract`.
/// `divide_positive` is the repetition penalty (1 when none); `subtract` is
/// `frequency_penalty * count + presence_penalty`, or `+inf` to mask the token.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct LogitAdjust {
    pub token: u32,
    pub divide_positive: f32,
    pub subtract: f32,
}

/// What to pick from one logits row; see the module doc for the exact rule.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenPick {
    /// Only ids below this are candidates (ids the tokenizer cannot decode are excluded).
    pub width: u32,
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 is no top-k.
    pub top_k: u32,
    /// 1 is no top-p.
    pub top_p: f32,
    /// 0 is no min-p.
    pub min_p: f32,
    /// The random draw in `[0, 1)` (unused when greedy).
    pub uniform: f64,
    /// At most one entry per token, sorted by token.
    pub adjust: Vec<LogitAdjust>,
}

/// Scale of the integer weights: `w = floor(p * 2^32)`, so the top token weighs `2^32`.
pub const WEIGHT_ONE: f32 = 4_294_967_296.0;

impl TokenPick {
    /// Greedy over ids below `width`, no penalties.
    pub fn greedy(width: u32) -> TokenPick {
        TokenPick { width, temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, uniform: 0.0, adjust: Vec::new() }
    }

    /// Step 1: NaN becomes `-inf`, then the adjustments. `row` holds ids `0..row.len()`.
    pub fn apply_adjustments(&self, row: &mut [f32]) {
        for x in row.iter_mut() {
            if x.is_nan() {
                *x = f32::NEG_INFINITY;
            }
        }
        for a in &self.adjust {
            if let Some(x) = row.get_mut(a.token as usize) {
                let v = if *x > 0.0 { *x / a.divide_positive } else { *x * a.divide_positive };
                let v = v - a.subtract;
                *x = if v.is_nan() { f32::NEG_INFINITY } else { v };
            }
        }
    }

    /// Steps 2–7 over an adjusted row (at least `width` long, or the whole row if shorter).
    pub fn choose(&self, adjusted: &[f32]) -> u32 {
        let l = &adjusted[..(self.width as usize).min(adjusted.len())];
        if self.temperature == 0.0 {
            return argmax(l);
        }
        let inv = 1.0 / self.temperature;
        let m = l.iter().map(|&x| x * inv).filter(|s| !s.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        if !m.is_finite() {
            return argmax(l);
        }
        let prob = |x: f32| -> f32 {
            let p = (x * inv - m).exp();
            if p.is_nan() { 0.0 } else { p }
        };
        let weight = |p: f32| (p * WEIGHT_ONE) as u64;
        let p: Vec<f32> = l.iter().map(|&x| prob(x)).collect();
        // Candidates in id order as (key, id); key orders by probability.
        let cand: Vec<(u32, u32)> =
            p.iter().enumerate().filter(|(_, p)| weight(**p) > 0).map(|(i, p)| (p.to_bits(), i as u32)).collect();
        let by_prob = |a: &(u32, u32), b: &(u32, u32)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
        // The survivors of top-k/top-p are "key > v, plus the first n_eq ids with key == v".
        let mut threshold: Option<(u32, usize)> = None;
        let in_set = |t: Option<(u32, usize)>, key: u32, eq_seen: &mut usize| -> bool {
            match t {
                None => true,
                Some((v, n_eq)) => {
                    if key > v {
                        true
                    } else if key == v {
                        *eq_seen += 1;
                        *eq_seen <= n_eq
                    } else {
                        false
                    }
                }
            }
        };
        let k = self.top_k as usize;
        if k > 0 && k < cand.len() {
            let mut sorted = cand.clone();
            sorted.select_nth_unstable_by(k - 1, by_prob);
            let v = sorted[k - 1].0;
            let gt = cand.iter().filter(|c| c.0 > v).count();
            threshold = Some((v, k - gt));
        }
        if self.top_p < 1.0 {
            let mut eq = 0;
            let mut kept: Vec<(u32, u32)> = cand.iter().copied().filter(|c| in_set(threshold, c.0, &mut eq)).collect();
            let total: u64 = kept.iter().map(|c| weight(f32::from_bits(c.0))).sum();
            let target = ((f64::from(self.top_p) * total as f64) as u64).max(1);
            kept.sort_unstable_by(by_prob);
            let mut cum = 0u64;
            let mut last = kept.len() - 1;
            for (i, c) in kept.iter().enumerate() {
                cum += weight(f32::from_bits(c.0));
                if cum >= target {
                    last = i;
                    break;
                }
            }
            let v = kept[last].0;
            let n_eq = kept[..=last].iter().filter(|c| c.0 == v).count();
            threshold = Some((v, n_eq));
        }
        let keep = |key: u32, eq: &mut usize| in_set(threshold, key, eq) && f32::from_bits(key) >= self.min_p;
        let mut eq = 0;
        let total: u64 = cand.iter().filter(|c| keep(c.0, &mut eq)).map(|c| weight(f32::from_bits(c.0))).sum();
        let target = ((self.uniform * total as f64) as u64).min(total.saturating_sub(1));
        let mut eq = 0;
        let mut cum = 0u64;
        let mut last = None;
        for c in &cand {
            if keep(c.0, &mut eq) {
                cum += weight(f32::from_bits(c.0));
                last = Some(c.1);
                if cum > target {
                    return c.1;
                }
            }
        }
        last.unwrap_or_else(|| argmax(l))
    }

    /// The whole rule on the host: adjusts a copy of `row` and picks.
    pub fn pick_host(&self, row: &[f32]) -> u32 {
        let mut l = row[..(self.width as usize).min(row.len())].to_vec();
        self.apply_adjustments(&mut l);
        self.choose(&l)
    }
}

/// Index of the largest value; ties go to the lowest index; NaN never wins.
pub fn argmax(l: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] || (l[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(temperature: f32, top_k: u32, top_p: f32, min_p: f32, uniform: f64) -> TokenPick {
        TokenPick { width: u32::MAX, temperature, top_k, top_p, min_p, uniform, adjust: Vec::new() }
    }

    fn ln(p: &[f32]) -> Vec<f32> {
        p.iter().map(|x| x.ln()).collect()
    }

    /// Which token each of `n` evenly spaced draws gives.
    fn sweep(t: &TokenPick, row: &[f32], n: usize) -> Vec<usize> {
        let mut h = vec![0; row.len()];
        for i in 0..n {
            let t = TokenPick { uniform: (i as f64 + 0.5) / n as f64, ..t.clone() };
            h[t.pick_host(row) as usize] += 1;
        }
        h
    }

    #[test]
    fn draw_walks_ids_in_order_with_exact_weights() {
        let row = ln(&[0.25, 0.5, 0.25]);
        assert_eq!(pick(1.0, 0, 1.0, 0.0, 0.0).pick_host(&row), 0);
        assert_eq!(pick(1.0, 0, 1.0, 0.0, 0.3).pick_host(&row), 1);
        assert_eq!(pick(1.0, 0, 1.0, 0.0, 0.9).pick_host(&row), 2);
        assert_eq!(pick(1.0, 0, 1.0, 0.0, 0.999_999_999).pick_host(&row), 2);
        let h = sweep(&pick(1.0, 0, 1.0, 0.0, 0.0), &row, 1000);
        assert_eq!(h, vec![250, 500, 250]);
    }

    #[test]
    fn greedy_ties_to_lowest_and_ignores_nan() {
        assert_eq!(pick(0.0, 0, 1.0, 0.0, 0.5).pick_host(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(pick(0.0, 0, 1.0, 0.0, 0.5).pick_host(&[f32::NAN, 0.5, 0.2]), 1);
        let t = TokenPick { width: 2, ..pick(0.0, 0, 1.0, 0.0, 0.0) };
        assert_eq!(t.pick_host(&[1.0, 2.0, 9.0]), 1, "ids past width are never picked");
    }

    #[test]
    fn top_k_keeps_lower_ids_on_ties_at_the_boundary() {
        // Four equal tokens; top-2 keeps ids 0 and 1 only.
        let row = [0.0f32; 4];
        assert_eq!(sweep(&pick(1.0, 2, 1.0, 0.0, 0.0), &row, 100), vec![50, 50, 0, 0]);
        let row = ln(&[0.1, 0.4, 0.2, 0.3]);
        assert_eq!(sweep(&pick(1.0, 2, 1.0, 0.0, 0.0), &row, 700), vec![0, 400, 0, 300]);
    }

    #[test]
    fn top_p_takes_shortest_prefix_reaching_p() {
        let row = ln(&[0.2, 0.5, 0.3]);
        let h = sweep(&pick(1.0, 0, 0.6, 0.0, 0.0), &row, 800);
        assert_eq!(h[0], 0);
        assert!(h[1] == 500 && h[2] == 300, "{h:?}");
        assert_eq!(sweep(&pick(1.0, 0, 0.45, 0.0, 0.0), &row, 100), vec![0, 100, 0]);
        // Ties at the top-p boundary: the lower ids of the tied group are taken first.
        let row = [0.0f32; 4];
        assert_eq!(sweep(&pick(1.0, 0, 0.5, 0.0, 0.0), &row, 100), vec![50, 50, 0, 0]);
        // top-p over what top-k kept.
        let row = ln(&[0.4, 0.3, 0.2, 0.1]);
        assert_eq!(sweep(&pick(1.0, 3, 0.5, 0.0, 0.0), &row, 70), vec![40, 30, 0, 0]);
    }

    #[test]
    fn min_p_is_relative_to_the_top_token() {
        let row = ln(&[0.6, 0.3, 0.1]);
        let h = sweep(&pick(1.0, 0, 1.0, 0.3, 0.0), &row, 900);
        assert_eq!(h, vec![600, 300, 0]);
    }

    #[test]
    fn temperature_sharpens() {
        let row = ln(&[0.6, 0.4]);
        let h = sweep(&pick(0.5, 0, 1.0, 0.0, 0.0), &row, 1300);
        // 0.6^2 : 0.4^2 = 9 : 4
        assert_eq!(h, vec![900, 400]);
    }

    #[test]
    fn adjustments_penalise_and_mask() {
        let t = TokenPick {
            adjust: vec![
                LogitAdjust { token: 0, divide_positive: 2.0, subtract: 0.0 },
                LogitAdjust { token: 1, divide_positive: 2.0, subtract: 0.5 },
                LogitAdjust { token: 3, divide_positive: 1.0, subtract: f32::INFINITY },
                LogitAdjust { token: 9, divide_positive: 1.0, subtract: f32::INFINITY },
            ],
            ..pick(0.0, 0, 1.0, 0.0, 0.0)
        };
        let mut row = vec![4.0, -1.0, 1.0, 8.0];
        t.apply_adjustments(&mut row);
        assert_eq!(row, vec![2.0, -2.5, 1.0, f32::NEG_INFINITY]);
        assert_eq!(t.pick_host(&[4.0, -1.0, 1.0, 8.0]), 0);
    }

    #[test]
    fn everything_masked_falls_back_to_argmax() {
        let row = [f32::NEG_INFINITY; 3];
        assert_eq!(pick(1.0, 0, 0.9, 0.1, 0.7).pick_host(&row), 0);
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        fn row() -> impl Strategy<Value = Vec<f32>> {
            // Coarse values make ties common; a few -inf (masked) and NaN entries.
            proptest::collection::vec(
                prop_oneof![
                    8 => (-40i32..40).prop_map(|x| x as f32 * 0.25),
                    1 => Just(f32::NEG_INFINITY),
                    1 => Just(f32::NAN),
                ],
                1..200,
            )
        }

        fn pick() -> impl Strategy<Value = TokenPick> {
            (
                prop_oneof![Just(0.0f32), 0.05f32..3.0],
                prop_oneof![Just(0u32), 1u32..20],
                prop_oneof![Just(1.0f32), 0.01f32..1.0],
                prop_oneof![Just(0.0f32), 0.0f32..1.0],
                0.0f64..1.0,
                1u32..250,
            )
                .prop_map(|(temperature, top_k, top_p, min_p, uniform, width)| TokenPick {
                    width,
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    uniform,
                    adjust: Vec::new(),
                })
        }

        proptest! {
            /// The picked id is inside the width, deterministic, finite unless nothing is,
            /// never below min-p, and within the top-k by (probability, lower id).
            #[test]
            fn pick_respects_every_constraint(row in row(), t in pick()) {
                let token = t.pick_host(&row);
                let width = (t.width as usize).min(row.len());
                prop_assert!((token as usize) < width);
                prop_assert_eq!(token, t.pick_host(&row));
                let l: Vec<f32> = row[..width].iter().map(|&x| if x.is_nan() { f32::NEG_INFINITY } else { x }).collect();
                let x = l[token as usize];
                if l.iter().any(|v| v.is_finite()) {
                    prop_assert!(x.is_finite(), "picked a masked id while finite ones exist");
                }
                if t.temperature > 0.0 && x.is_finite() {
                    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let p = (x / t.temperature - max / t.temperature).exp();
                    // The rule compares f32 products exactly; allow for the rounding of this check.
                    prop_assert!(p >= t.min_p * 0.999, "p {p} below min_p {}", t.min_p);
                    if t.top_k > 0 {
                        let better = l.iter().enumerate().filter(|&(i, &v)| v > x || (v == x && i < token as usize)).count();
                        prop_assert!(better < t.top_k as usize, "{better} ids rank above the pick with top_k {}", t.top_k);
                    }
                } else if x.is_finite() {
                    prop_assert_eq!(token, argmax(&l));
                }
            }
        }
    }
}
