"""Markdown report of issue 6's benchmark from the JSON that `run-issue6.sh` writes.

usage: python3 report_issue6.py PATH... > report.md

Each PATH is a phase's JSON (`llmd.json`, `offline.json`, `hf.json`, told apart by their
"phase" field) or a folder holding them. Only measured values are printed: anything missing
reads "not measured", with the reason when the JSON gives one.
"""
import json
import os
import sys

LEVELS = (1, 8, 32, 64, 256)
NM = "not measured"


def load_phases(paths):
    phases = {}
    for p in paths:
        files = [os.path.join(p, f"{n}.json") for n in ("llmd", "offline", "hf")] if os.path.isdir(p) else [p]
        for f in files:
            if not os.path.exists(f):
                if not os.path.isdir(p):
                    sys.exit(f"no such file: {f}")
                continue
            with open(f) as fh:
                d = json.load(fh)
            phase = d.get("phase")
            if phase not in ("llmd", "offline", "hf"):
                sys.exit(f"{f}: unknown phase {phase!r}")
            phases[phase] = d
    return phases


def num(x, nd=1, unit=""):
    if x is None:
        return NM
    s = f"{x:,.{nd}f}"
    return f"{s} {unit}".rstrip() if unit else s


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def llmd_level(llmd, c):
    """(loadgen report or None, reason when None) for concurrency c."""
    for lv in (llmd or {}).get("levels") or []:
        run = lv.get("run") or lv
        if run.get("concurrency") != c:
            continue
        if lv.get("loadgen"):
            return lv["loadgen"], None
        return None, lv.get("error") or NM
    return None, NM if llmd else "llmd phase not run"


def hf_level(hf, c):
    for lv in (hf or {}).get("levels") or []:
        if lv.get("concurrency") == c:
            return lv
    return None


def hf_status(lv, hf):
    if hf is None:
        return "HF phase not run"
    if lv is None:
        return NM
    return lv.get("status") or NM


def level_ok(rep):
    return rep is not None and rep.get("succeeded", 0) > 0


def pair(p, a, b, nd=1):
    if p is None:
        return NM
    return f"{p[a]:,.{nd}f} / {p[b]:,.{nd}f}"


def yes_no(ok):
    return {True: "yes", False: "no", None: NM}[ok]


def gb(b):
    return f"{b / 1e9:.2f} GB ({b / 2**30:.2f} GiB)"


def report(ph):
    llmd, off_phase, hf = ph.get("llmd"), ph.get("offline"), ph.get("hf")
    out = []
    w = out.append
    w("# Issue 6 benchmark: llmd vs HF transformers, Llama-3-8B-shaped random bf16 checkpoint")
    w("")
    env = get(llmd, "env") or get(off_phase, "env") or get(hf, "env") or {}
    smi = env.get("nvidia_smi") or get(hf, "nvidia_smi")
    parts = [x.strip() for x in smi.split(",")] if smi else []
    w(f"- Device: {parts[0] if parts else NM}" + (f" ({parts[1]})" if len(parts) > 1 else ""))
    w(f"- Driver: {parts[2] if len(parts) > 2 else NM}; CUDA (driver): {env.get('cuda_version') or NM}")
    for name, d in (("llmd", llmd), ("offline", off_phase), ("hf", hf)):
        if d is None:
            continue
        date = get(d, "env", "date_utc") or d.get("date_utc")
        w(f"- Phase `{name}`: {date or 'date not recorded'}, {d.get('elapsed_s', '?')} s"
          + (f" of a {get(d, 'env', 'budget_s')} s budget" if get(d, "env", "budget_s") else "")
          + (f"; commit {get(d, 'env', 'git_commit')}" if get(d, "env", "git_commit") else ""))
    if hf:
        w(f"- HF: transformers {hf.get('transformers', NM)}, torch {hf.get('torch', NM)}, "
          f"attention `{hf.get('attn_implementation', NM)}`, {hf.get('model_dtype', NM)} on {hf.get('model_device', NM)}")
    ck = get(llmd, "checkpoint") or get(off_phase, "checkpoint") or get(hf, "checkpoint")
    wt = get(llmd, "weights") or get(off_phase, "weights") or get(hf, "weights")
    if ck:
        made = "written in this run" if ck.get("created_in_phase") is True else "already on disk"
        w(f"- Checkpoint: `{ck.get('path')}` ({made}"
          + (f", {ck['create_s']} s to write" if ck.get("create_s") is not None else "") + ")")
    w("")

    w("## Memory bandwidth and the single-stream decode roofline")
    w("")
    w("| quantity | value |")
    w("|---|---|")
    bw = get(llmd, "bandwidth", "copy_gb_s")
    w(f"| device copy bandwidth (4 GiB torch copy, read + write) | {num(bw, 0, 'GB/s')} |")
    w(f"| weight bytes (sum of the safetensors files) | {gb(wt['bytes']) if wt and wt.get('bytes') else NM}"
      + (f", {wt['files']} files |" if wt and wt.get("files") else " |"))
    roof = get(llmd, "roofline_tok_s")
    w(f"| roofline: bandwidth / weight bytes | {num(roof, 1, 'tokens/s')} |")
    w("")

    w("## Load")
    w("")
    w("| what | seconds |")
    w("|---|---|")

    def load_s(d):
        ld = get(d, "load")
        if not ld:
            return NM
        if ld.get("rc") != 0:
            return f"failed (exit code {ld.get('rc')}): {ld.get('output', '')[-200:]}"
        return num(ld.get("load_s"), 2)

    w(f"| llmd: `llmctl load` until ready (page cache warm) | {load_s(llmd)} |")
    if off_phase:
        w(f"| llmd, `offline` phase's load | {load_s(off_phase)} |")
    w(f"| HF: `from_pretrained(..., device_map='cuda')` | {num(get(hf, 'load_s'), 2)} |")
    pc = get(llmd, "warm", "page_cache_read_s") or get(hf, "warm", "page_cache_read_s")
    w(f"| reading the checkpoint's files before loading (`cat > /dev/null`) | {num(pc, 2)} |")
    w("")

    w("## Throughput and latency by concurrency")
    w("")
    w("llmd: `llmd-loadgen` over HTTP (`/v1/completions`, streaming, `ignore_eos`, temperature 0.8); TTFT and ITL "
      "as the client sees them (ITL = gap between SSE chunks with text), TPOT = (E2E − TTFT) / (tokens − 1) per "
      "request. HF: one static batch of c prompts, greedy, TTFT = a separate 1-token generate of the batch, "
      "ITL = (total − TTFT) / 255.")
    w("")
    w("| streams | llmd requests ok / started | prompt tokens, mean (min–max) | llmd output tok/s | TTFT p50 / p99 ms "
      "| ITL p50 / p99 ms | TPOT p50 ms | HF output tok/s | HF TTFT ms | HF ITL mean ms | llmd / HF |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for c in LEVELS:
        rep, why = llmd_level(llmd, c)
        hl = hf_level(hf, c)
        hs = hf_status(hl, hf)
        hf_ok = hl is not None and hl.get("status") == "ok"
        if rep is not None:
            errs = rep.get("errors") or {}
            reqs = f"{rep['succeeded']} / {rep.get('started', rep['requests'])}"
            if errs:
                reqs += " (errors: " + ", ".join(f"{k}: {v}" for k, v in errs.items()) + ")"
            pm = rep.get("prompt_tokens_measured")
            prompt = f"{pm['mean']:.0f} ({pm['min']}–{pm['max']})" if pm else NM
            cells = [reqs, prompt, num(rep.get("output_tokens_per_s")) if level_ok(rep) else NM,
                     pair(rep.get("ttft"), "p50_ms", "p99_ms"), pair(rep.get("itl"), "p50_ms", "p99_ms"),
                     num(get(rep, "tpot", "p50_ms"), 2)]
        else:
            cells = [why] + [NM] * 5
        if hf_ok:
            cells += [num(hl.get("output_tok_s")), num(hl.get("ttft_s") * 1e3), num(hl.get("itl_mean_ms"), 2)]
        else:
            cells += [hs, "—", "—"]
        if level_ok(rep) and hf_ok:
            ratios[c] = rep["output_tokens_per_s"] / hl["output_tok_s"]
            cells.append(f"{ratios[c]:.2f}×")
        elif level_ok(rep) and hl is not None and hl.get("status") == "OOM":
            ratios[c] = "HF OOM"
            cells.append("HF OOM")
        else:
            cells.append(NM)
        w(f"| {c} | " + " | ".join(cells) + " |")
    w("")

    w("## Single-stream decode")
    w("")
    w("| measure (concurrency 1) | tokens/s | % of roofline |")
    w("|---|---|---|")
    rep1, _ = llmd_level(llmd, 1)
    itl1 = get(rep1, "itl", "p50_ms")
    tpot1 = get(rep1, "tpot", "p50_ms")
    dec_itl = 1e3 / itl1 if itl1 else None
    dec_tpot = 1e3 / tpot1 if tpot1 else None
    hf1 = hf_level(hf, 1)
    hf_dec = 1e3 / hf1["itl_mean_ms"] if hf1 and hf1.get("status") == "ok" and hf1.get("itl_mean_ms") else None

    def pct(x):
        return f"{100 * x / roof:.1f}%" if x is not None and roof else NM

    w(f"| llmd: 1 / ITL p50 | {num(dec_itl)} | {pct(dec_itl)} |")
    w(f"| llmd: 1 / TPOT p50 | {num(dec_tpot)} | {pct(dec_tpot)} |")
    out1 = rep1.get("output_tokens_per_s") if level_ok(rep1) else None
    w(f"| llmd: output tok/s (prefill and TTFT included) | {num(out1)} | {pct(out1)} |")
    w(f"| HF: 1 / ITL mean | {num(hf_dec)} | {pct(hf_dec)} |")
    if rep1 and rep1.get("text_chunks") is not None and rep1.get("output_tokens"):
        w("")
        w(f"SSE chunks with text at concurrency 1: {rep1['text_chunks']:,} for {rep1['output_tokens']:,} tokens "
          "(a token that ends inside a UTF-8 character sends no text, so its time joins the next gap; "
          "TPOT counts every token).")
    w("")

    w("## Offline run: 1,000 requests submitted at once")
    w("")
    runs = [(name, get(d, "offline")) for name, d in (("llmd", llmd), ("offline", off_phase))]
    measured = [(name, o["loadgen"]) for name, o in runs if o is not None and o.get("loadgen")]
    reasons = [f"`{name}` phase: " + (o.get("skipped") or o.get("error") or NM)
               for name, o in runs if o is not None and not o.get("loadgen")]
    if not measured:
        w(NM + (": " + "; ".join(reasons) if reasons else "."))
    else:
        w("| phase | requests ok / started | prompt tokens, mean | wall time s | output tokens | output tok/s "
          "| TTFT p50 / p99 ms | TPOT p50 ms |")
        w("|---|---|---|---|---|---|---|---|")
        for name, o in measured:
            errs = o.get("errors") or {}
            pm = o.get("prompt_tokens_measured")
            w(f"| {name} | {o['succeeded']} / {o.get('started', o['requests'])}"
              + (" (errors: " + ", ".join(f"{k}: {v}" for k, v in errs.items()) + ")" if errs else "")
              + f" | {num(pm['mean'], 0) if pm else NM} | {num(o.get('duration_s'), 1)} | {o.get('output_tokens', 0):,} "
              f"| {num(o.get('output_tokens_per_s'))} | {pair(o.get('ttft'), 'p50_ms', 'p99_ms')} "
              f"| {num(get(o, 'tpot', 'p50_ms'), 2)} |")
        if reasons:
            w("")
            w("Not run: " + "; ".join(reasons) + ".")
    w("")

    met = get(llmd, "metrics")
    if met:
        def m(name):
            vals = [v for k, v in met.items() if k.split("{")[0] == name]
            return sum(vals) if vals else None

        s, n = m("llmd:time_to_first_token_seconds_sum"), m("llmd:time_to_first_token_seconds_count")
        w("## Engine-side metrics (`/metrics` at the end of the `llmd` phase, all its requests)")
        w("")
        w("| metric | value |")
        w("|---|---|")
        w(f"| TTFT histogram: sum / count | {num(s, 2)} s / {num(n, 0)} → mean "
          + (f"{1e3 * s / n:,.1f} ms |" if s is not None and n else f"{NM} |"))
        for name in ("llmd:generation_tokens_total", "llmd:prompt_tokens_total", "llmd:request_success_total",
                     "llmd:num_preemptions_total", "llmd:request_errors_total"):
            v = m(name)
            if v is not None:
                w(f"| `{name}` | {v:,.0f} |")
        w("")

    w("## Targets (one H100)")
    w("")
    w("| target | measured | goal | met |")
    w("|---|---|---|---|")

    def row(name, measured, goal, ok):
        w(f"| {name} | {measured} | {goal} | {yes_no(ok)} |")

    for label, x in (("1 / ITL p50", dec_itl), ("1 / TPOT p50", dec_tpot)):
        ok = None if x is None or not roof else x >= 0.8 * roof
        shown = NM if x is None else (f"{num(x)} tok/s = {pct(x)} of {num(roof)}" if roof
                                       else f"{num(x)} tok/s (roofline {NM})")
        row(f"single-stream decode ({label})", shown, "≥ 80% of roofline", ok)
    for c, goal in ((8, 1000), (64, 3000)):
        rep, _ = llmd_level(llmd, c)
        x = rep.get("output_tokens_per_s") if level_ok(rep) else None
        ok = None if x is None else (x > goal and not rep.get("errors"))
        row(f"{c} streams, output tok/s", num(x) + (" (with errors)" if rep and rep.get("errors") else ""),
            f"> {goal:,}", ok)
    t1 = get(rep1, "ttft", "p50_ms")
    row("TTFT at 1 stream (p50)", num(t1, 1, "ms") + (f" (p99 {get(rep1, 'ttft', 'p99_ms'):,.1f} ms)" if t1 else ""),
        "< 35 ms", None if t1 is None else t1 < 35)
    ld = get(llmd, "load")
    lx = ld.get("load_s") if ld and ld.get("rc") == 0 else None
    row("load (`llmctl load` until ready)", num(lx, 2, "s"), "< 10 s", None if lx is None else lx < 10)
    parts, oks = [], []
    for c in LEVELS:
        r = ratios.get(c)
        if isinstance(r, float):
            parts.append(f"c={c}: {r:.2f}×")
            oks.append(r > 1)
        elif r == "HF OOM":
            parts.append(f"c={c}: HF OOM")
            oks.append(True)
        else:
            parts.append(f"c={c}: {NM}")
            oks.append(None)
    ok = False if False in oks else (None if None in oks else True)
    row("more output tok/s than HF transformers at every concurrency", "; ".join(parts), "> 1× at each", ok)
    w("")
    return "\n".join(out)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(report(load_phases(sys.argv[1:])))


if __name__ == "__main__":
    main()
