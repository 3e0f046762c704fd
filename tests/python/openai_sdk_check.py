#!/usr/bin/env python3
"""Drives a running llmd with the official `openai` Python package, as real clients do.

Usage:
    python3 tests/python/openai_sdk_check.py BASE_URL [--api-key KEY] [--model NAME]

BASE_URL is the daemon's HTTP root, e.g. http://127.0.0.1:8000 (``/v1`` is appended when
missing). When the daemon has API keys, pass one with --api-key (or OPENAI_API_KEY); the bad-key
check then expects ``openai.AuthenticationError``. Without keys that check is skipped, since any
key is accepted. --model defaults to the first model of ``/v1/models``.

Checks: models list, chat, streaming chat with usage, completions (string and token-id
prompts), a bad key. Exits non-zero on the first failure, naming it.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


class CheckFailed(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_url")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--model")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args()

    base = args.base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    keyed = args.api_key is not None
    client = openai.OpenAI(base_url=base, api_key=args.api_key or "unused", max_retries=0, timeout=120)

    steps = []

    def step(name):
        def wrap(fn):
            steps.append((name, fn))
            return fn
        return wrap

    state = {}

    @step("models list")
    def _models():
        models = client.models.list()
        ids = [m.id for m in models.data]
        check(len(ids) >= 1, f"no model listed: {ids}")
        for m in models.data:
            check(m.object == "model" and isinstance(m.created, int), f"bad model card {m}")
        state["model"] = args.model or ids[0]
        check(state["model"] in ids, f"model {state['model']} not in {ids}")

    @step("chat")
    def _chat():
        r = client.chat.completions.create(
            model=state["model"],
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        check(r.object == "chat.completion", f"object {r.object}")
        check(len(r.choices) == 1, "one choice")
        c = r.choices[0]
        check(c.message.role == "assistant", f"role {c.message.role}")
        check(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason}")
        check(r.usage is not None and r.usage.completion_tokens >= 1, f"usage {r.usage}")
        check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total_tokens")
        state["chat_content"] = c.message.content or ""

    @step("streaming chat with usage")
    def _stream():
        stream = client.chat.completions.create(
            model=state["model"],
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}],
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, usage, first_role = "", None, None, None
        for i, chunk in enumerate(stream):
            check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object}")
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if i == 0:
                    first_role = c.delta.role
                text += c.delta.content or ""
                if c.finish_reason:
                    finish = c.finish_reason
        check(first_role == "assistant", f"first delta role {first_role}")
        check(finish in ("stop", "length"), f"finish_reason {finish}")
        check(usage is not None and usage.completion_tokens >= 1, f"usage chunk {usage}")
        check(text == state["chat_content"], f"greedy stream {text!r} != non-stream {state['chat_content']!r}")

    @step("completions")
    def _completions():
        r = client.completions.create(model=state["model"], prompt="The quick brown fox", max_tokens=args.max_tokens, temperature=0)
        check(r.object == "text_completion", f"object {r.object}")
        check(len(r.choices) == 1 and r.choices[0].finish_reason in ("stop", "length"), f"choices {r.choices}")
        r2 = client.completions.create(model=state["model"], prompt=["a b", "c d"], max_tokens=2, n=2)
        check(sorted(c.index for c in r2.choices) == [0, 1, 2, 3], f"indices {[c.index for c in r2.choices]}")
        r3 = client.completions.create(model=state["model"], prompt=[1, 2, 3], max_tokens=2)
        check(r3.usage.prompt_tokens == 3, f"token-id prompt usage {r3.usage}")

    @step("bad request is BadRequestError")
    def _bad_request():
        try:
            client.chat.completions.create(model=state["model"], messages=[{"role": "user", "content": "x"}], temperature=9)
        except openai.BadRequestError as e:
            check(e.status_code == 400, f"status {e.status_code}")
            return
        raise CheckFailed("temperature=9 was accepted")

    @step("unknown model is NotFoundError")
    def _not_found():
        try:
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        except openai.NotFoundError:
            return
        raise CheckFailed("unknown model was accepted")

    @step("bad key is AuthenticationError")
    def _bad_key():
        if not keyed:
            print("  (skipped: no --api-key given, the daemon accepts any key)")
            return
        bad = openai.OpenAI(base_url=base, api_key="sk-definitely-wrong", max_retries=0)
        try:
            bad.models.list()
        except openai.AuthenticationError:
            return
        raise CheckFailed("a wrong key was accepted")

    for name, fn in steps:
        try:
            fn()
        except CheckFailed as e:
            print(f"FAIL {name}: {e}", file=sys.stderr)
            return 1
        except openai.OpenAIError as e:
            print(f"FAIL {name}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"ok   {name}")
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
