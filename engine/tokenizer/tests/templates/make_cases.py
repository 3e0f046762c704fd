"""Writes conversations.json: the conversations each real template is rendered with.
Run make_expected.py afterwards to record transformers' renderings of them."""
import json, os

HERE = os.path.dirname(os.path.abspath(__file__))

weather_tool = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather <in °C> & more for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. 北京"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
time_tool = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time", "parameters": {"type": "object", "properties": {}}},
}


def call(i, name, args):
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


simple = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello! 你好 👋"}]
multi = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]
tools_conv = [
    {"role": "system", "content": "You help with weather."},
    {"role": "user", "content": "Weather in Paris and Beijing?"},
    {"role": "assistant", "content": "", "tool_calls": [call(1, "get_weather", {"city": "Paris"}), call(2, "get_weather", {"city": "北京", "unit": "celsius"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "tool", "tool_call_id": "call_2", "content": "{\"temp\": 25}"},
]
think_history = [
    {"role": "user", "content": "Is 17 prime?"},
    {"role": "assistant", "content": "<think>\nCheck divisors up to 4.\n</think>\n\nYes, 17 is prime."},
    {"role": "user", "content": "And 21?"},
]
single_call = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [call(1, "get_weather", {"city": "Paris"})]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
]

cases = [
    ("qwen2.5-instruct", "system_user", simple, None, True, {}),
    ("qwen2.5-instruct", "default_system_multi_turn", multi, None, True, {}),
    ("qwen2.5-instruct", "tools_calls_results", tools_conv, [weather_tool, time_tool], True, {}),
    ("qwen2.5-instruct", "no_generation_prompt", multi, None, False, {}),
    ("qwen3", "user_only", [{"role": "user", "content": "Hi"}], None, True, {}),
    ("qwen3", "thinking_disabled", [{"role": "user", "content": "Hi"}], None, True, {"enable_thinking": False}),
    ("qwen3", "think_history_stripped", think_history, None, True, {}),
    ("qwen3", "tools_calls_results", tools_conv, [weather_tool], True, {}),
    ("qwen3", "reasoning_content_field", [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "Greet back."},
    ], None, False, {}),
    ("deepseek-r1-distill-qwen", "system_user", simple, None, True, {}),
    ("deepseek-r1-distill-qwen", "think_history_stripped", think_history, None, True, {}),
    ("deepseek-r1-0528-qwen3", "user_only", [{"role": "user", "content": "Hi"}], None, True, {}),
    ("deepseek-r1-0528-qwen3", "two_system_prompts_multi_turn", [{"role": "system", "content": "A"}, {"role": "system", "content": "B"}] + think_history, None, True, {}),
    ("deepseek-r1-0528-qwen3", "tools_calls_results", tools_conv, [weather_tool], True, {}),
    ("llama-3.1-instruct", "system_user", simple, None, True, {}),
    ("llama-3.1-instruct", "tools_in_user_message", single_call, [weather_tool], True, {}),
    ("llama-3.1-instruct", "tools_in_system_message", single_call, [weather_tool], True, {"tools_in_user_message": False}),
    ("llama-3.1-instruct", "two_calls_rejected", tools_conv[1:], [weather_tool], True, {}),
    ("llama-3.1-instruct", "fixed_date", multi, None, True, {"date_string": "01 Jan 2025"}),
    ("mistral-instruct", "multi_turn", multi, None, True, {}),
    ("mistral-instruct", "roles_not_alternating", [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], None, True, {}),
    ("mistral-instruct", "system_rejected", simple, None, True, {}),
]

special = {
    "qwen2.5-instruct": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "qwen3": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "deepseek-r1-distill-qwen": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "deepseek-r1-0528-qwen3": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "llama-3.1-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral-instruct": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}

out = [
    {"template": t, "name": n, "messages": m, "tools": tl, "add_generation_prompt": g, "extra": e, "special_tokens": special[t]}
    for (t, n, m, tl, g, e) in cases
]
with open(os.path.join(HERE, "conversations.json"), "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
