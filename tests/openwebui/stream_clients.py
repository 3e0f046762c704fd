#!/usr/bin/env python3
"""The other popular client paths for a reasoning model's stream, against llmd directly.

Usage:
  stream_clients.py BASE_URL API_KEY MODEL --reasoning TEXT --content TEXT

BASE_URL is the OpenAI base URL (http://127.0.0.1:PORT/v1); TEXT are the reasoning and the
answer the model is known to give (tests/fixtures/models/r1_chain gives the same reply to every
chat). Checks, each a PASS/FAIL line:

  - `curl -N` (raw SSE, no client library): 200, `text/event-stream`, every event one
    `data: ` line of JSON, `[DONE]` last; the role chunk first; the accumulated
    `reasoning_content` and `content` are TEXT.
  - the openai SDK's `chat.completions.create(stream=True)`: the same accumulation from typed
    chunks (`reasoning_content` is an extra field, read from `model_extra`), with and without
    tools offered (Open-WebUI's browser offers its built-in tools) and with
    `stream_options.include_usage`.
  - the openai SDK's `chat.completions.stream(...)` helper: its `content.delta` events give the
    answer and `get_final_completion()` holds both texts.
  - non-streaming `create()`: `message.content` and `message.reasoning_content`.

Needs `curl` and the `openai` package (Open-WebUI's venv has it). Exit 0 only if all pass.
"""
import argparse
import json
import subprocess
import sys

RESULTS = []


def report(ok, name, detail=""):
    RESULTS.append(ok)
    print("%s %s%s" % ("PASS" if ok else "FAIL", name, (" - " + detail) if detail else ""), flush=True)


def check_curl(args, body):
    auth = ["-H", "Authorization: Bearer " + args.api_key] if args.api_key else []
    cmd = ["curl", "-sS", "-N", "-D", "-", "-H", "Content-Type: application/json", *auth,
           "-d", json.dumps(body), args.base_url + "/chat/completions"]
    out = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    if out.returncode != 0:
        return report(False, "curl -N stream", "curl exit %d: %s" % (out.returncode, out.stderr.decode()[:200]))
    head, _, sse = out.stdout.decode().partition("\r\n\r\n")
    status = head.split("\r\n", 1)[0]
    ctype = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                  if line.lower().startswith("content-type:")), "")
    events = [e for e in sse.split("\n\n") if e.strip()]
    bad = [e for e in events if not e.startswith("data: ") or "\n" in e]
    payloads = [e[len("data: "):] for e in events]
    chunks = [json.loads(p) for p in payloads[:-1]] if not bad else []
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    ok = (" 200" in status and ctype.startswith("text/event-stream") and not bad and payloads[-1:] == ["[DONE]"]
          and bool(chunks) and chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
          and reasoning == args.reasoning and content == args.content)
    report(ok, "curl -N stream", "%s, %s, %d events, reasoning %r, content %r%s"
           % (status, ctype, len(events), reasoning, content, ", malformed: %r" % bad[:1] if bad else ""))


def check_sdk(args, messages):
    import openai

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key or "none", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_time", "description": "The time.",
                                                 "parameters": {"type": "object", "properties": {}}}}]
    for label, extra in [("plain", {}), ("tools offered", {"tools": tools}),
                         ("include_usage", {"stream_options": {"include_usage": True}})]:
        reasoning, content, finish, usage = "", "", None, None
        for chunk in client.chat.completions.create(model=args.model, messages=messages, stream=True, **extra):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                content += choice.delta.content or ""
                reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
                finish = choice.finish_reason or finish
        ok = (reasoning, content, finish) == (args.reasoning, args.content, "stop")
        if "stream_options" in extra:
            ok = ok and usage is not None and usage.completion_tokens > 0
        report(ok, "openai SDK create(stream=True), %s" % label,
               "reasoning %r, content %r, finish %s%s" % (reasoning, content, finish,
                                                           ", usage %s" % usage if usage else ""))

        with client.chat.completions.stream(model=args.model, messages=messages, **extra) as stream:
            deltas = "".join(event.delta for event in stream if event.type == "content.delta")
            final = stream.get_final_completion()
        message = final.choices[0].message
        final_reasoning = (message.model_extra or {}).get("reasoning_content")
        ok = (deltas, message.content, final_reasoning) == (args.content, args.content, args.reasoning)
        report(ok, "openai SDK chat.completions.stream() helper, %s" % label,
               "content.delta %r, final content %r, final reasoning %r" % (deltas, message.content, final_reasoning))

    reply = client.chat.completions.create(model=args.model, messages=messages)
    message = reply.choices[0].message
    got = (message.content, (message.model_extra or {}).get("reasoning_content"))
    report(got == (args.content, args.reasoning), "openai SDK create() non-streaming", "content %r, reasoning %r" % got)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url")
    ap.add_argument("api_key", help="Bearer key ('-' for none)")
    ap.add_argument("model")
    ap.add_argument("--reasoning", required=True, help="the reasoning_content the model gives")
    ap.add_argument("--content", required=True, help="the content (answer) the model gives")
    args = ap.parse_args()
    args.base_url = args.base_url.rstrip("/")
    if args.api_key == "-":
        args.api_key = ""
    messages = [{"role": "user", "content": "Hello"}]
    check_curl(args, {"model": args.model, "messages": messages, "stream": True})
    try:
        check_sdk(args, messages)
    except Exception as e:  # a client library error is a failed check, with its message
        report(False, "openai SDK", "%s: %s" % (type(e).__name__, e))
    failed = RESULTS.count(False)
    print("%s: %d passed, %d failed" % ("OK" if not failed else "FAILED", len(RESULTS) - failed, failed), flush=True)
    return 0 if RESULTS and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
