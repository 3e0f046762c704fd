//! Hostile chat templates: `llmd_tokenizer::ChatTemplate::new(src)?.render(...)` with the
//! default limits (fuel, recursion, output size). Input: template source, a NUL byte, then
//! the messages JSON (a fixed conversation when absent or not an array). Rendering must end
//! within the fuel (libFuzzer's -timeout catches a hang), never overflow the stack, and never
//! return more than `max_output_bytes`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmd_tokenizer::ChatTemplate;
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let (src, rest) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(src) = std::str::from_utf8(src) else { return };
    let Ok(template) = ChatTemplate::new(src) else { return };
    let limit = template.limits().max_output_bytes;
    let messages = serde_json::from_slice::<Value>(rest).ok().filter(Value::is_array).unwrap_or_else(|| {
        json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"}
        ])
    });
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let extra = serde_json::Map::from_iter([("enable_thinking".to_string(), json!(false))]);
    for (t, gen_prompt) in [(None, true), (Some(&tools), false)] {
        if let Ok(out) = template.render(&messages, t, gen_prompt, &extra) {
            assert!(out.len() <= limit, "rendered {} bytes, over the limit of {limit}", out.len());
        }
    }
});
