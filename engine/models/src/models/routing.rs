//! The routing rule of a routed-expert block: one token's router logits to its experts and
//! their weights, as transformers computes it for Qwen3-MoE (softmax, top-k, optional
//! renormalisation), DeepSeek-V2 (softmax, group-limited greedy, scaling) and DeepSeek-V3
//! (sigmoid, correction bias for the choice only, groups ranked by their two best, weights from
//! the unbiased scores, renormalised, scaled). The GPU's `moe_route_f32` kernel follows it and
//! `llmd-cuda-check kernels` compares the two.

use crate::spec::{GroupRank, Routing, Scoring};

/// The `top_k` experts of a token with router logits `logits` (f32, one per expert), best
/// first (ties to the lower id, as torch.topk on CPU), with their weights. `bias` holds the
/// values of `routing.correction_bias` when it is set.
pub fn route(logits: &[f32], routing: &Routing, bias: Option<&[f32]>, top_k: usize) -> Vec<(usize, f32)> {
    let e = logits.len();
    let scores: Vec<f32> = match routing.scoring {
        Scoring::Softmax => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            exps.iter().map(|v| v / sum).collect()
        }
        Scoring::Sigmoid => logits.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(),
    };
    let mut choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    if let Some(g) = routing.group_limit {
        let size = e / g.groups;
        let rank = |group: &[f32]| -> f32 {
            match g.rank {
                GroupRank::Max => group.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                GroupRank::TopTwoSum => {
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &v in group {
                        if v > a {
                            (a, b) = (v, a);
                        } else if v > b {
                            b = v;
                        }
                    }
                    a + b
                }
            }
        };
        let group_scores: Vec<f32> = choice.chunks_exact(size).map(rank).collect();
        let mut order: Vec<usize> = (0..g.groups).collect();
        order.sort_by(|a, b| group_scores[*b].total_cmp(&group_scores[*a]));
        for &dropped in &order[g.keep.min(g.groups)..] {
            choice[dropped * size..(dropped + 1) * size].iter_mut().for_each(|c| *c = 0.0);
        }
    }
    let mut order: Vec<usize> = (0..e).collect();
    // Stable sort by descending choice score: ties go to the lower expert id.
    order.sort_by(|a, b| choice[*b].total_cmp(&choice[*a]));
    let chosen = &order[..top_k.min(e)];
    let mut out: Vec<(usize, f32)> = chosen.iter().map(|&i| (i, scores[i])).collect();
    // transformers adds 1e-20 to the sum (DeepSeek); a no-op in f32 for Qwen3-MoE's softmax sums.
    let norm = if routing.renormalize { out.iter().map(|(_, w)| w).sum::<f32>() + 1e-20 } else { 1.0 };
    for (_, w) in &mut out {
        *w = *w / norm * routing.scaling;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::GroupLimit;

    fn routing(scoring: Scoring, group_limit: Option<GroupLimit>, renormalize: bool, scaling: f32) -> Routing {
        Routing { scoring, correction_bias: None, group_limit, renormalize, scaling }
    }

    #[test]
    fn softmax_top_k_renormalised_ties_to_the_lower_id() {
        let r = routing(Scoring::Softmax, None, true, 1.0);
        let got = route(&[0.0, 1.0, 1.0, -1.0], &r, None, 2);
        assert_eq!((got[0].0, got[1].0), (1, 2));
        assert!((got[0].1 - 0.5).abs() < 1e-7 && (got[1].1 - 0.5).abs() < 1e-7);
        // Without renormalising: the softmax probabilities themselves.
        let got = route(&[0.0, 1.0, 1.0, -1.0], &routing(Scoring::Softmax, None, false, 1.0), None, 1);
        let p1 = 1f32.exp() / (1.0 + 2.0 * 1f32.exp() + (-1f32).exp());
        assert_eq!(got[0].0, 1);
        assert!((got[0].1 - p1).abs() < 1e-7);
    }

    #[test]
    fn sigmoid_choice_uses_the_bias_and_weights_do_not() {
        // Expert 0 has the best score, the bias makes expert 2 the choice; its weight is its
        // own unbiased sigmoid, times the scaling (no renormalisation).
        let r = routing(Scoring::Sigmoid, None, false, 2.5);
        let got = route(&[2.0, 0.0, 1.0, -3.0], &r, Some(&[0.0, 0.0, 1.5, 0.0]), 1);
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert_eq!(got[0].0, 2);
        assert!((got[0].1 - 2.5 * sig(1.0)).abs() < 1e-6);
    }

    #[test]
    fn groups_ranked_by_their_two_best_and_dropped_groups_score_zero() {
        // 3 groups of 2. Choice scores (sigmoid of the logits): group 0 holds the single best
        // expert but the worst pair sum; groups 1 and 2 are kept.
        let logits = [4.0, -4.0, 1.0, 1.0, 0.5, 0.5];
        let g = GroupLimit { groups: 3, keep: 2, rank: GroupRank::TopTwoSum };
        let r = routing(Scoring::Sigmoid, Some(g), true, 1.0);
        let got = route(&logits, &r, None, 2);
        assert_eq!((got[0].0, got[1].0), (2, 3));
        assert!((got[0].1 - 0.5).abs() < 1e-6);
        // Ranked by the best expert instead, group 0 stays and expert 0 wins.
        let g = GroupLimit { groups: 3, keep: 2, rank: GroupRank::Max };
        let got = route(&logits, &routing(Scoring::Sigmoid, Some(g), true, 1.0), None, 2);
        assert_eq!((got[0].0, got[1].0), (0, 2));
        // A dropped group's experts compete with score 0: the kept group's choice scores are
        // all negative, so expert 2, the first dropped one, wins with weight sig(0).
        let g = GroupLimit { groups: 3, keep: 1, rank: GroupRank::Max };
        let bias = [-1.0, -1.1, -1.4, -1.4, -1.3, -1.3];
        let got = route(&[0.0; 6], &routing(Scoring::Sigmoid, Some(g), false, 1.0), Some(&bias), 1);
        assert_eq!(got, [(2, 0.5)]);
        let g = GroupLimit { groups: 3, keep: 1, rank: GroupRank::Max };
        let bias = [-5.0, -5.0, 0.0, 0.0, -5.0, -5.0];
        let got = route(&logits, &routing(Scoring::Sigmoid, Some(g), false, 1.0), Some(&bias), 3);
        // Group 1 kept (max sig(1) ≈ 0.73); groups 0 and 2 become 0 and beat nothing kept.
        assert_eq!((got[0].0, got[1].0, got[2].0), (2, 3, 0));
    }
}
