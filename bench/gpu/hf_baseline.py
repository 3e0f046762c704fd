"""HF transformers baseline for issue 6 (run on the GPU machine by `run-issue6.sh hf`).

Loads the Llama-3-8B-shaped random checkpoint with transformers (bf16, eager attention, on
cuda) and, for each concurrency c, runs ONE static batch of c random prompts of --prompt tokens
generating exactly --gen tokens (greedy, KV cache on, no stop at EOS). Per level it measures:

- ttft_s: a separate generate(max_new_tokens=1) on the same batch after a warm-up generate,
  i.e. the prefill of the whole batch plus its first token;
- total_s: generate(min_new_tokens = max_new_tokens = --gen) on the same batch;
- output_tok_s = c * gen / total_s; itl_mean_ms = (total_s - ttft_s) / (gen - 1).

A CUDA out-of-memory at a level is recorded as "OOM". A level whose estimated time (from the
previous level's TTFT and step time, scaled linearly with the batch: an upper bound) exceeds
what is left of --budget-s is recorded as "skipped: time budget". The JSON is rewritten after
every level, so a killed run still leaves what it measured.

usage: python3 hf_baseline.py CHECKPOINT_DIR OUT_JSON [--levels 1,8,32,64,256] [--prompt 512]
                              [--gen 256] [--budget-s 540] [--merge KEY=FILE.json ...]
"""
import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time

START = time.monotonic()


def nvidia_smi():
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
        return q
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("out_json")
    ap.add_argument("--levels", default="1,8,32,64,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="seconds this script may take, counted from its start")
    ap.add_argument("--merge", action="append", default=[], metavar="KEY=FILE",
                    help="put FILE's JSON under KEY in the output (the caller's environment record, say)")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]

    def left():
        return args.budget_s - (time.monotonic() - START)

    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    result = {
        "phase": "hf",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "nvidia_smi": nvidia_smi(),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "checkpoint": os.path.abspath(args.checkpoint),
        "prompt_tokens": args.prompt,
        "gen_tokens": args.gen,
        "budget_s": args.budget_s,
        "settings": "AutoModelForCausalLM.from_pretrained(dtype=bfloat16, attn_implementation='eager', "
                    "device_map='cuda'); one static batch per level; generate(do_sample=False, use_cache=True, "
                    "min_new_tokens=max_new_tokens); random prompt ids, attention mask all ones",
        "levels": [],
    }
    for m in args.merge:
        key, _, path = m.partition("=")
        try:
            with open(path) as f:
                result[key] = json.load(f)
        except (OSError, ValueError) as e:
            result[key] = {"error": f"{path}: {e}"}

    def save():
        result["elapsed_s"] = round(time.monotonic() - START, 2)
        tmp = args.out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out_json)

    save()
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, attn_implementation="eager",
                                                     device_map="cuda", **{dtype_kw: torch.bfloat16})
    except (ImportError, ValueError) as e:  # no accelerate: load on the CPU, then move
        print(f"device_map load failed ({e}); loading on the CPU and moving to cuda", flush=True)
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, attn_implementation="eager",
                                                     **{dtype_kw: torch.bfloat16}).to("cuda")
    model.eval()
    torch.cuda.synchronize()
    result["load_s"] = round(time.perf_counter() - t0, 3)
    p = next(model.parameters())
    result["model_dtype"] = str(p.dtype)
    result["model_device"] = str(p.device)
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    result["weights_gib"] = round(sum(t.numel() * t.element_size() for t in model.parameters()) / 2**30, 3)
    print(f"loaded in {result['load_s']} s: {result['model_dtype']} on {result['model_device']}, "
          f"attention {result['attn_implementation']}, {result['weights_gib']} GiB", flush=True)
    save()
    if p.dtype != torch.bfloat16 or p.device.type != "cuda":
        result["error"] = "model is not bf16 on cuda"
        save()
        sys.exit(1)

    vocab = model.config.vocab_size
    gen_common = dict(do_sample=False, use_cache=True, pad_token_id=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    prev = None  # (c, ttft_s, step_s) of the last measured level
    for c in levels:
        entry = {"concurrency": c}
        result["levels"].append(entry)
        if prev is not None:
            pc, pttft, pstep = prev
            r = c / pc
            est = 3 * pttft * r + (args.gen + 1) * pstep * r
            entry["estimated_s"] = round(est, 1)
            if est > left():
                entry["status"] = f"skipped: time budget (estimated {est:.0f} s, {left():.0f} s left)"
                print(f"c={c}: {entry['status']}", flush=True)
                save()
                continue
        ids = mask = out = None
        try:
            torch.cuda.reset_peak_memory_stats()
            ids = torch.randint(0, vocab, (c, args.prompt), device="cuda", generator=g)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, **gen_common)
                torch.cuda.synchronize()
                t = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, min_new_tokens=1, **gen_common)
                torch.cuda.synchronize()
                ttft = time.perf_counter() - t
                t = time.perf_counter()
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.gen,
                                     min_new_tokens=args.gen, **gen_common)
                torch.cuda.synchronize()
                total = time.perf_counter() - t
            new_tokens = int(out.shape[1] - args.prompt)
            step = (total - ttft) / max(args.gen - 1, 1)
            entry.update(status="ok", ttft_s=round(ttft, 4), total_s=round(total, 3), new_tokens_per_seq=new_tokens,
                         output_tokens=c * new_tokens, output_tok_s=round(c * new_tokens / total, 1),
                         itl_mean_ms=round(step * 1e3, 2),
                         peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
            prev = (c, ttft, step)
            print(f"c={c}: TTFT {ttft * 1e3:.1f} ms, total {total:.2f} s, {entry['output_tok_s']} output tok/s, "
                  f"ITL mean {entry['itl_mean_ms']} ms, {new_tokens} new tokens/seq, peak {entry['peak_mem_gib']} GiB",
                  flush=True)
        except torch.cuda.OutOfMemoryError as e:
            entry.update(status="OOM", message=str(e).splitlines()[0][:300])
            print(f"c={c}: OOM", flush=True)
        finally:
            del ids, mask, out
            gc.collect()
            torch.cuda.empty_cache()
        save()
    save()


if __name__ == "__main__":
    main()
