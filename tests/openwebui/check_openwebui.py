#!/usr/bin/env python3
"""Headless check that Open-WebUI can chat through an OpenAI-compatible server.

Usage:
  check_openwebui.py BASE_URL API_KEY MODEL [options]

  BASE_URL  the upstream's OpenAI base URL, e.g. http://127.0.0.1:8000/v1
  API_KEY   the Bearer key Open-WebUI should send upstream ('' or - for none)
  MODEL     a model id the upstream serves

It starts `open-webui serve` (from --venv, default /tmp/owui-venv) on a free
loopback port with a fresh temporary DATA_DIR and an offline configuration,
waits for /ready, signs up the first (admin) user through the REST API,
checks GET /api/models lists MODEL, sends a chat through Open-WebUI's own
POST /api/chat/completions (non-stream and stream) and checks text came
back, optionally drives the real chat page in headless Chromium
(--screenshot PNG), then stops Open-WebUI (only the process group it
started). Prints PASS/FAIL lines and a summary line "N passed, N failed";
exit 0 only if every check passed.

Stdlib only; any python3 >= 3.8 can run it.
"""
import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

RESULTS = []  # (ok, name, detail)


def report(ok, name, detail=""):
    RESULTS.append((ok, name, detail))
    print("%s %s%s" % ("PASS" if ok else "FAIL", name, (" - " + detail) if detail else ""), flush=True)
    return ok


def info(msg):
    print("INFO " + msg, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http(method, url, body=None, token=None, timeout=60, headers=None):
    """Returns (status, bytes). Never raises for HTTP error statuses."""
    h = {"Accept": "application/json"}
    if body is not None:
        h["Content-Type"] = "application/json"
        body = json.dumps(body).encode()
    if token:
        h["Authorization"] = "Bearer " + token
    h.update(headers or {})
    req = urllib.request.Request(url, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def short(b, n=300):
    s = b.decode("utf-8", "replace") if isinstance(b, (bytes, bytearray)) else str(b)
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n] + "..."


def owui_env(args, data_dir, port):
    env = dict(os.environ)
    env.update({
        # storage / identity
        "DATA_DIR": data_dir,
        "WEBUI_SECRET_KEY": secrets.token_hex(24),
        "WEBUI_AUTH": "True",             # exercise the real signup/login path
        "ENABLE_SIGNUP": "True",
        # upstream: only our OpenAI-compatible server
        "ENABLE_OLLAMA_API": "False",
        "ENABLE_OPENAI_API": "True",
        "OPENAI_API_BASE_URL": args.base_url,
        "OPENAI_API_BASE_URLS": args.base_url,   # ';'-separated list form wins
        "OPENAI_API_KEY": args.api_key,
        "OPENAI_API_KEYS": args.api_key,
        # offline: no hub downloads, no update check, no telemetry
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ENABLE_VERSION_UPDATE_CHECK": "False",
        "ANONYMIZED_TELEMETRY": "False",
        "SCARF_NO_ANALYTICS": "true",
        "DO_NOT_TRACK": "true",
        # RAG / embeddings off: no SentenceTransformer load (torch not installed)
        "RAG_EMBEDDING_MODEL": "",
        "RAG_RERANKING_MODEL": "",
        "BYPASS_EMBEDDING_AND_RETRIEVAL": "True",
        "ENABLE_RAG_HYBRID_SEARCH": "False",
        "ENABLE_WEB_SEARCH": "False",
        # no extra background LLM calls: upstream sees only our chats
        "ENABLE_TITLE_GENERATION": "False",
        "ENABLE_FOLLOW_UP_GENERATION": "False",
        "ENABLE_TAGS_GENERATION": "False",
        "ENABLE_AUTOCOMPLETE_GENERATION": "False",
        "ENABLE_EVALUATION_ARENA_MODELS": "False",
        # the page's own origin; socket.io (used by the web UI to stream replies)
        # rejects other origins
        "CORS_ALLOW_ORIGIN": "http://127.0.0.1:%d;http://localhost:%d" % (port, port),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def wait_ready(url, proc, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            return None, "open-webui exited with code %s" % proc.returncode
        try:
            st, _ = http("GET", url + "/ready", timeout=5)
            if st == 200:
                return time.monotonic() - t0, ""
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    return None, "not ready after %ds" % timeout


def stream_chat(url, token, body, timeout):
    """POST with stream:true; returns dict(status, content, reasoning, done, finish, chunks, raw_head)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "Accept": "text/event-stream",
        "Authorization": "Bearer " + token})
    out = {"status": None, "content": "", "reasoning": "", "done": False, "finish": None,
           "chunks": 0, "raw_head": b"", "ctype": ""}
    try:
        r = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        out["status"], out["raw_head"] = e.code, e.read()[:500]
        return out
    with r:
        out["status"] = r.status
        out["ctype"] = r.headers.get("Content-Type", "")
        for line in r:
            if len(out["raw_head"]) < 500:
                out["raw_head"] += line
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                out["done"] = True
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            out["chunks"] += 1
            for ch in obj.get("choices") or []:
                d = ch.get("delta") or {}
                out["content"] += d.get("content") or ""
                out["reasoning"] += d.get("reasoning_content") or d.get("reasoning") or ""
                if ch.get("finish_reason"):
                    out["finish"] = ch["finish_reason"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url")
    ap.add_argument("api_key")
    ap.add_argument("model")
    ap.add_argument("--venv", default=os.environ.get("OWUI_VENV", "/tmp/owui-venv"),
                    help="venv holding open-webui (default /tmp/owui-venv or $OWUI_VENV)")
    ap.add_argument("--port", type=int, default=0, help="Open-WebUI port (default: a free one)")
    ap.add_argument("--startup-timeout", type=int, default=300)
    ap.add_argument("--request-timeout", type=int, default=180)
    ap.add_argument("--prompt", default="Say hello in one short sentence.")
    ap.add_argument("--expect-echo", action="store_true",
                    help="require the reply to echo the prompt's nonce (true for fake_openai.py)")
    ap.add_argument("--expect-reasoning", action="store_true",
                    help="require reasoning_content to come through the stream, and the web UI to show"
                         " the reply's reasoning block (its \"Thought for\" label) above the answer")
    ap.add_argument("--expect-text", metavar="TEXT",
                    help="require every reply (REST, stream, web UI, saved chat) to contain TEXT"
                         " (for a model whose answer is known, e.g. llmd's r1_chain fixture)")
    ap.add_argument("--screenshot", metavar="PNG",
                    help="also chat through the real web page in headless Chromium and save a PNG")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    ap.add_argument("--work-dir", help="where DATA_DIR and logs go (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, sqlite db)")
    args = ap.parse_args()
    if args.api_key == "-":
        args.api_key = ""
    args.base_url = args.base_url.rstrip("/")

    owui_bin = os.path.join(args.venv, "bin", "open-webui")
    if not os.access(owui_bin, os.X_OK):
        report(False, "install", "no executable %s (see install_openwebui.sh)" % owui_bin)
        return finish(None, None, args)

    work = args.work_dir or tempfile.mkdtemp(prefix="owui-check-")
    os.makedirs(work, exist_ok=True)
    data_dir = os.path.join(work, "data")
    log_path = os.path.join(work, "open-webui.log")
    info("work dir %s (log %s)" % (work, log_path))

    # 0. upstream sanity (diagnostic; Open-WebUI needs this endpoint too)
    try:
        st, b = http("GET", args.base_url + "/models", token=args.api_key or None, timeout=30)
    except (OSError, urllib.error.URLError) as e:
        st, b = "error %r" % e, b""
    try:
        up_ids = [m.get("id") for m in json.loads(b).get("data", [])] if st == 200 else []
    except ValueError:
        up_ids = []
    report(args.model in up_ids, "upstream GET %s/models lists %s" % (args.base_url, args.model),
           "HTTP %s, ids=%s" % (st, up_ids[:10]))

    port = args.port or free_port()
    url = "http://127.0.0.1:%d" % port
    logf = open(log_path, "wb")
    t_launch = time.monotonic()
    proc = subprocess.Popen([owui_bin, "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=work, env=owui_env(args, data_dir, port), stdout=logf,
                            stderr=subprocess.STDOUT, start_new_session=True)
    info("started open-webui pid %d on %s" % (proc.pid, url))
    try:
        run_checks(args, url, proc, t_launch, log_path, work)
    finally:
        stop(proc)
        logf.close()
    return finish(work, log_path, args)


def run_checks(args, url, proc, t_launch, log_path, work):
    # 1. readiness / cold start
    secs, why = wait_ready(url, proc, args.startup_timeout)
    if not report(secs is not None, "open-webui ready (GET /ready)",
                  ("cold start %.1fs" % secs) if secs is not None else why):
        return
    st, b = http("GET", url + "/api/version")
    version = json.loads(b).get("version") if st == 200 else "?"
    info("open-webui version %s" % version)

    # 2. first user = admin, via the signup API (fall back to signin)
    email, pw = "admin@example.com", "Check-" + secrets.token_hex(8)
    st, b = http("POST", url + "/api/v1/auths/signup",
                 {"name": "Check Admin", "email": email, "password": pw})
    if st != 200:
        st, b = http("POST", url + "/api/v1/auths/signin", {"email": email, "password": pw})
    try:
        j = json.loads(b)
    except ValueError:
        j = {}
    token = j.get("token")
    if not report(st == 200 and bool(token) and j.get("role") == "admin", "admin signup via /api/v1/auths/signup",
                  "HTTP %s role=%s" % (st, j.get("role")) if token else "HTTP %s %s" % (st, short(b))):
        return
    st, b = http("GET", url + "/api/v1/auths/", token=token)
    report(st == 200 and json.loads(b).get("email") == email, "session valid (GET /api/v1/auths/)", "HTTP %s" % st)

    # 3. model list as Open-WebUI shows it
    st, b = http("GET", url + "/api/models", token=token, timeout=args.request_timeout)
    ids = []
    if st == 200:
        try:
            ids = [m.get("id") for m in json.loads(b).get("data", [])]
        except ValueError:
            pass
    if not report(args.model in ids, "GET /api/models lists %s" % args.model,
                  "HTTP %s, ids=%s" % (st, ids[:10])):
        return

    # 4. chat through Open-WebUI's proxy, non-stream
    nonce = "owui-" + secrets.token_hex(4)
    prompt = "%s (check id %s)" % (args.prompt, nonce)
    body = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "stream": False}
    t0 = time.monotonic()
    st, b = http("POST", url + "/api/chat/completions", body, token=token, timeout=args.request_timeout)
    dt = time.monotonic() - t0
    text = ""
    try:
        j = json.loads(b)
        text = (j.get("choices") or [{}])[0].get("message", {}).get("content") or ""
    except (ValueError, AttributeError, IndexError):
        j = {}
    ok = st == 200 and text.strip() != "" and expected(args, nonce) in text
    report(ok, "POST /api/chat/completions stream=false returns text",
           "%.2fs, %r" % (dt, short(text, 120)) if st == 200 else "HTTP %s %s" % (st, short(b)))

    # 5. same, streamed (SSE passes through Open-WebUI)
    nonce2 = "owui-" + secrets.token_hex(4)
    body = {"model": args.model, "stream": True,
            "messages": [{"role": "user", "content": "%s (check id %s)" % (args.prompt, nonce2)}]}
    t0 = time.monotonic()
    try:
        s = stream_chat(url + "/api/chat/completions", token, body, args.request_timeout)
    except (OSError, urllib.error.URLError) as e:
        s = {"status": "error %r" % e, "content": "", "reasoning": "", "done": False, "finish": None,
             "chunks": 0, "raw_head": b"", "ctype": ""}
    dt = time.monotonic() - t0
    ok = (s["status"] == 200 and s["content"].strip() != "" and s["done"]
          and expected(args, nonce2) in s["content"])
    report(ok, "POST /api/chat/completions stream=true returns SSE text + [DONE]",
           "%.2fs, %d chunks, finish=%s, %s, %r" % (dt, s["chunks"], s["finish"], s["ctype"],
                                                    short(s["content"], 120))
           if s["status"] == 200 else "HTTP %s %s" % (s["status"], short(s["raw_head"])))
    if s["reasoning"] or args.expect_reasoning:
        report(bool(s["reasoning"].strip()), "stream carries reasoning_content",
               repr(short(s["reasoning"], 80)))

    # 6. the web UI itself is served
    st, b = http("GET", url + "/", headers={"Accept": "text/html"})
    report(st == 200 and b"<html" in b.lower(), "GET / serves the web UI HTML", "HTTP %s, %d bytes" % (st, len(b)))

    # 7. optional: real page in headless Chromium
    if args.screenshot:
        try:
            import browser_chat
        except ImportError:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import browser_chat
        ok, detail, shown = browser_chat.chat_and_screenshot(
            args.chromium, url, token, args.model, "Hello from the browser (check id %s)" % nonce,
            args.screenshot, expect=expected(args, nonce) or None,
            timeout=args.request_timeout, work=work)
        report(ok, "web UI chat in headless Chromium, screenshot %s" % args.screenshot, detail)
        if args.expect_reasoning:
            # Open-WebUI labels a reply's reasoning block "Thought for ..." and puts the answer
            # after it; a reply that is reasoning only shows the label and nothing below it.
            _, label, after = shown.partition("Thought for")
            after = after.partition("\n")[2]  # the label's own line ends at the first newline
            report(ok and bool(label) and after.strip() != "" and expected(args, nonce) in after,
                   "web UI shows the reasoning block, then the answer", repr(shown[:120]))
        # the page saved the chat server-side; the assistant message must be there
        st, b = http("GET", url + "/api/v1/chats/", token=token)
        chats = json.loads(b) if st == 200 else []
        answer = ""
        if chats:
            st, b = http("GET", url + "/api/v1/chats/" + chats[0]["id"], token=token)
            msgs = ((json.loads(b).get("chat") or {}).get("history") or {}).get("messages") or {}
            answer = " ".join(m.get("content") or "" for m in msgs.values() if m.get("role") == "assistant")
        report(bool(answer.strip()) and expected(args, nonce) in answer,
               "chat saved with assistant reply (GET /api/v1/chats/{id})",
               "%d chat(s), %r" % (len(chats), short(answer, 80)))


def expected(args, nonce):
    """The text every reply must contain: the prompt's nonce (--expect-echo), --expect-text, or ''."""
    return nonce if args.expect_echo else (args.expect_text or "")


def stop(proc):
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # our own session/process group only
    except ProcessLookupError:
        return
    try:
        proc.wait(20)
        report(True, "open-webui stopped on SIGTERM", "exit %s" % proc.returncode)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        report(False, "open-webui stopped on SIGTERM", "needed SIGKILL")


def finish(work, log_path, args):
    passed = sum(1 for r in RESULTS if r[0])
    failed = len(RESULTS) - passed
    if failed and log_path and os.path.exists(log_path):
        with open(log_path, "rb") as f:
            tail = f.read()[-3000:]
        print("---- open-webui log tail ----\n" + tail.decode("utf-8", "replace") + "\n----", flush=True)
    if work and not args.keep and not args.work_dir and not failed:
        shutil.rmtree(work, ignore_errors=True)
    elif work:
        info("kept work dir %s" % work)
    print("%s: %d passed, %d failed" % ("OK" if not failed else "FAILED", passed, failed), flush=True)
    return 0 if (passed and not failed) else 1


if __name__ == "__main__":
    sys.exit(main())
