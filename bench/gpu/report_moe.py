"""Markdown report of the MoE benchmark (`ISSUE6_SHAPE=qwen3-30b-a3b bash bench/gpu/run-issue6.sh llmd`)
with every figure beside its limits, computed from the run's own measurements.

usage: python3 report_moe.py LLMD_JSON [--label TEXT] > report.md

Limits per decode step at concurrency c (bandwidth and GEMM rate measured in the same run):
- bandwidth: weight bytes read + KV bytes read. Weights: every non-expert tensor (attention, norms,
  routers, the LM head; of the embedding only the step's rows, left out) plus, per MoE layer, the experts some token of the step chose. With random
  routing the expected distinct experts of a layer are E·(1 − (1 − k/E)^c): k at c = 1 (the
  active-weight roofline), nearly all E from c = 64 (the all-experts roofline). KV: c sequences at
  the mean context of a request (prompt + half the output), K and V of every layer.
- compute: tokens per step × 2 × active parameters / bf16 GEMM rate, where a step carries the c
  decode tokens plus the prompt tokens admitted meanwhile (prompt/output tokens per output token).
The limit in tok/s is c / max(bandwidth time, compute time).
"""
import json
import sys


def limits(cfg, bw_gb_s, tflops, c, prompt, gen):
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    e, k, inter = cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]
    attn = h * heads * hd * 2 + 2 * h * kv * hd + 2 * h + 2 * hd  # q,o + k,v + 2 norms + q/k norms
    router = e * h
    expert = 3 * h * inter
    # The LM head (or the tied embedding as head) is read whole every step; of the embedding only
    # the step's rows, which is negligible.
    non_expert = layers * (attn + router) + vocab * h + h
    active = layers * (attn + router + k * expert) + vocab * h  # lm_head once; embedding is a row read
    distinct = e * (1 - (1 - k / e) ** c)
    weight_bytes = 2 * (non_expert + layers * distinct * expert)
    ctx = prompt + gen / 2
    kv_bytes = c * ctx * layers * 2 * kv * hd * 2
    t_bw = (weight_bytes + kv_bytes) / (bw_gb_s * 1e9)
    tokens = c * (1 + prompt / gen)
    t_fl = tokens * 2 * active / (tflops * 1e12)
    return {"c": c, "distinct_experts": distinct, "weight_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9,
            "t_bw_ms": t_bw * 1e3, "t_compute_ms": t_fl * 1e3, "limit_tok_s": c / max(t_bw, t_fl),
            "bound": "bandwidth" if t_bw >= t_fl else "compute", "active_params": active}


def main():
    args = sys.argv[1:]
    label = ""
    if "--label" in args:
        i = args.index("--label")
        label = args[i + 1]
        del args[i:i + 2]
    d = json.load(open(args[0]))
    cfg = d["weights"]["config"]
    bw = d["bandwidth"]["copy_gb_s"]
    tf = d["bandwidth"].get("bf16_gemm_tflops")
    env = d.get("env", {})
    print(f"### {label or 'llmd'}: {cfg['num_hidden_layers']}-layer Qwen3-MoE "
          f"({cfg['num_experts']} experts, {cfg['num_experts_per_tok']} per token), {env.get('nvidia_smi', '')}")
    print()
    print(f"- date {env.get('date_utc')}, commit {env.get('git_commit')}; checkpoint {d['weights']['bytes'] / 1e9:.1f} GB "
          f"in {d['weights']['files']} files; load (llmctl load until ready) {d.get('load', {}).get('load_s')} s")
    print(f"- measured copy bandwidth {bw:,.0f} GB/s, bf16 GEMM {tf} TFLOP/s")
    print()
    print("| streams | tok/s | limit tok/s (bound) | % of limit | TTFT p50 / p99 ms | TPOT p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for lv in d.get("levels", []):
        run = lv.get("run") or lv
        c = run.get("concurrency")
        rep = lv.get("loadgen")
        if not rep:
            print(f"| {c} | not measured: {lv.get('error')} | | | | | |")
            continue
        lim = limits(cfg, bw, tf, c, rep["prompt_tokens_measured"]["mean"], rep["max_tokens"])
        tps = rep["output_tokens_per_s"]
        errs = sum(rep.get("errors", {}).values()) if isinstance(rep.get("errors"), dict) else rep.get("errors")
        print(f"| {c} | {tps:,.0f} | {lim['limit_tok_s']:,.0f} ({lim['bound']}: {lim['weight_gb']:.1f} GB weights "
              f"+ {lim['kv_gb']:.1f} GB KV per step, {lim['distinct_experts']:.0f} experts/layer) | "
              f"{100 * tps / lim['limit_tok_s']:.0f}% | {rep['ttft']['p50_ms']:.1f} / {rep['ttft']['p99_ms']:.1f} | "
              f"{rep['tpot']['p50_ms']:.2f} / {rep['tpot']['p99_ms']:.2f} | {errs} |")
    print()


if __name__ == "__main__":
    main()
