#!/usr/bin/env python3
"""Bounded soak of the real llmd daemon on loopback (issue 11).

Starts `llmd` with a temp config (127.0.0.1, free port), loads a tiny fixture model through
`llmctl load`, then runs CLIENTS concurrent streaming clients for DURATION seconds. Each
client loops: a chat or completions request (stream=true), a short or a long prompt, a random
max_tokens; with probability --cancel-rate it cancels the stream after a random number of
chunks (closes the socket), with --disconnect-rate it disconnects before reading anything.

Checks, after the clients stop:
  * no 5xx other than 503 (429 and 503 are refusals by design and are counted apart);
  * every completed stream ended with `data: [DONE]`;
  * KV blocks return to zero used (`llmctl ps --json`, and `llmd:kv_cache_usage_perc` 0);
  * RSS bounded: VmRSS at the end is at most --rss-growth x VmRSS after the warm-up quarter.
Records TTFT and end-to-end latency percentiles, requests by outcome, RSS samples, and writes
them as JSON (--out). Exit 0 when every check passes, 1 otherwise.

Only the standard library: raw HTTP/1.1 over asyncio streams.

    python3 bench/soak/soak.py --llmd target/release/llmd --llmctl target/release/llmctl \
        --model tests/fixtures/models/qwen2 --clients 300 --duration 90 --out soak.json
"""

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
         "hex bold zebras under amber skies near old stone bridges").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "Threads"):
                out[k] = int(v.split()[0])  # kB for Vm*, count for Threads
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(p / 100 * len(v)))] * 1000, 1)


class Stats:
    def __init__(self):
        self.outcomes = {}
        self.status = {}
        self.ttft = []
        self.e2e = []
        self.tokens = 0
        self.bad = []

    def count(self, key):
        self.outcomes[key] = self.outcomes.get(key, 0) + 1


async def one_request(port, model, rng, stats, args):
    long_prompt = rng.random() < 0.3
    n_words = rng.randint(30, 45) if long_prompt else rng.randint(1, 6)
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    max_tokens = rng.randint(4, 48)
    if rng.random() < 0.5:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": text}]}
    else:
        path = "/v1/completions"
        body = {"model": model, "prompt": text}
    body.update({"max_tokens": max_tokens, "stream": True, "temperature": rng.choice([0, 0.7, 1.0]),
                 "stream_options": {"include_usage": True}})
    payload = json.dumps(body).encode()
    mode = "full"
    r = rng.random()
    if r < args.disconnect_rate:
        mode = "disconnect"
    elif r < args.disconnect_rate + args.cancel_rate:
        mode = "cancel"
    cancel_after = rng.randint(1, 6)
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        if mode == "disconnect":
            stats.count("disconnected")
            return
        line = await reader.readline()
        m = re.match(rb"HTTP/1\.1 (\d+)", line)
        code = int(m.group(1)) if m else 0
        stats.status[code] = stats.status.get(code, 0) + 1
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        if code != 200:
            rest = await reader.read(2000)
            if code in (429, 503):
                stats.count("refused_by_design")
            else:
                stats.count("error")
                stats.bad.append((code, rest[-300:].decode(errors="replace")))
            return
        chunks = 0
        first = None
        done = False
        # Chunked transfer encoding around SSE: read lines, look at `data:` lines only.
        while True:
            raw = await reader.readline()
            if not raw:
                break
            if not raw.startswith(b"data: "):
                continue
            data = raw[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                stats.count("stream_error")
                stats.bad.append((200, data[:300].decode(errors="replace")))
                return
            if event.get("usage"):
                stats.tokens += event["usage"].get("completion_tokens", 0)
            if event.get("choices"):
                chunks += 1
                if first is None:
                    first = time.monotonic() - start
                    stats.ttft.append(first)
                if mode == "cancel" and chunks >= cancel_after:
                    stats.count("cancelled")
                    return
        if done:
            stats.e2e.append(time.monotonic() - start)
            stats.count("completed")
        elif mode == "cancel":
            stats.count("cancelled")  # finished before the cancel point but stream cut
        else:
            stats.count("truncated")
            stats.bad.append((200, "stream ended without [DONE]"))
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def client(i, port, model, deadline, stats, args):
    rng = random.Random(args.seed * 100003 + i)
    while time.monotonic() < deadline:
        try:
            await one_request(port, model, rng, stats, args)
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as e:
            stats.count("connection_error")
            stats.bad.append((0, repr(e)))


def llmctl(args, sock, *cmd):
    return subprocess.run([args.llmctl, "--socket", sock, *cmd], capture_output=True, text=True, timeout=120)


def metric(port, name):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    total = 0.0
    for line in raw.decode(errors="replace").splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmd", required=True)
    ap.add_argument("--llmctl", required=True)
    ap.add_argument("--model", required=True, help="fixture model folder")
    ap.add_argument("--clients", type=int, default=300)
    ap.add_argument("--duration", type=float, default=90)
    ap.add_argument("--cancel-rate", type=float, default=0.15)
    ap.add_argument("--disconnect-rate", type=float, default=0.05)
    ap.add_argument("--rss-growth", type=float, default=1.5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="llmd-soak-")
    port = free_port()
    sock = os.path.join(tmp, "llmd.sock")
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    with open(os.path.join(tmp, "llmd.toml"), "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1:{port}"\nshutdown_timeout_secs = 5\n'
                f'[control]\nsocket = "{sock}"\ngroup = "{group}"\ndbus = "off"\n'
                f'[storage]\nmodels_dir = "{tmp}/models"\n[log]\nlevel = "warn"\ntarget = "stderr"\n')
    log = open(os.path.join(tmp, "llmd.log"), "w")
    daemon = subprocess.Popen([args.llmd, "--config", os.path.join(tmp, "llmd.toml")], stdout=log, stderr=log,
                              env={"PATH": os.environ.get("PATH", ""), "HOME": tmp})
    failures = []
    try:
        for _ in range(300):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        r = llmctl(args, sock, "load", os.path.abspath(args.model), "--name", "soak")
        if r.returncode != 0:
            raise SystemExit(f"load failed: {r.stdout}{r.stderr}")
        rss = {"loaded": proc_status(daemon.pid)}
        stats = Stats()
        start = time.monotonic()
        deadline = start + args.duration
        samples = []

        async def sampler():
            while time.monotonic() < deadline:
                await asyncio.sleep(5)
                samples.append((round(time.monotonic() - start, 1), proc_status(daemon.pid)["VmRSS"]))

        await asyncio.gather(sampler(), *(client(i, port, "soak", deadline, stats, args) for i in range(args.clients)))
        elapsed = time.monotonic() - start
        # Cancelled and disconnected requests free their blocks at once; give the engine a moment.
        kv_used, kv_perc = None, None
        for _ in range(100):
            ps = json.loads(llmctl(args, sock, "ps", "--json").stdout)
            kv_used = sum(m["kv_blocks_used"] for m in ps["models"])
            running = sum(m["running"] + m["waiting"] for m in ps["models"])
            kv_perc = metric(port, "llmd:kv_cache_usage_perc")
            if kv_used == 0 and running == 0 and kv_perc == 0:
                break
            time.sleep(0.1)
        rss["end"] = proc_status(daemon.pid)
        warm = [v for t, v in samples if t >= args.duration / 4]
        rss_warm = warm[0] if warm else rss["loaded"]["VmRSS"]
        five_xx = {c: n for c, n in stats.status.items() if c >= 500 and c != 503}
        if five_xx:
            failures.append(f"5xx answers: {five_xx}")
        for k in ("error", "stream_error", "truncated", "connection_error"):
            if stats.outcomes.get(k):
                failures.append(f"{stats.outcomes[k]} requests {k}: {stats.bad[:3]}")
        if kv_used != 0 or kv_perc != 0:
            failures.append(f"KV blocks still used after the soak: {kv_used} (kv_cache_usage_perc {kv_perc})")
        if rss["end"]["VmRSS"] > args.rss_growth * rss_warm:
            failures.append(f"RSS grew from {rss_warm} kB (after warm-up) to {rss['end']['VmRSS']} kB")
        if daemon.poll() is not None:
            failures.append(f"llmd exited with {daemon.returncode}")
        result = {
            "clients": args.clients,
            "duration_s": round(elapsed, 1),
            "requests": sum(stats.outcomes.values()),
            "outcomes": stats.outcomes,
            "http_status": {str(k): v for k, v in sorted(stats.status.items())},
            "completion_tokens": stats.tokens,
            "ttft_ms": {"p50": pct(stats.ttft, 50), "p90": pct(stats.ttft, 90), "p99": pct(stats.ttft, 99)},
            "e2e_ms": {"p50": pct(stats.e2e, 50), "p90": pct(stats.e2e, 90), "p99": pct(stats.e2e, 99)},
            "kv_blocks_used_after": kv_used,
            "kv_cache_usage_perc_after": kv_perc,
            "rss_kb": {"after_load": rss["loaded"]["VmRSS"], "after_warmup": rss_warm,
                       "end": rss["end"]["VmRSS"], "peak_VmHWM": rss["end"]["VmHWM"]},
            "rss_samples_kb": samples,
            "fds": {"after_load": rss["loaded"]["fds"], "end": rss["end"]["fds"]},
            "threads": {"after_load": rss["loaded"]["Threads"], "end": rss["end"]["Threads"]},
            "failures": failures,
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        print(f"daemon log: {log.name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
