//! Chat templates of real models rendered with minijinja, compared with transformers' own
//! rendering (`tests/templates/expected.json`, written by `make_expected.py`), plus the HF
//! extensions, reasoning detection and the limits against hostile templates.

use std::path::Path;

use llmd_options::ReasoningParser;
use llmd_tokenizer::{ChatTemplate, TemplateError, TemplateLimits};
use serde_json::{Map, Value, json};

fn templates_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/templates"))
}

fn load(name: &str, special: &Map<String, Value>) -> ChatTemplate {
    let src = std::fs::read_to_string(templates_dir().join(format!("{name}.jinja"))).unwrap();
    let mut t = ChatTemplate::new(src).unwrap_or_else(|e| panic!("{name}: {e}"));
    for (k, v) in special {
        t = t.with_special_token(k.clone(), v.as_str().unwrap());
    }
    t
}

fn read_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(templates_dir().join(name)).unwrap()).unwrap()
}

fn none() -> Map<String, Value> {
    Map::new()
}

#[test]
fn real_templates_render_exactly_like_transformers() {
    let cases = read_json("conversations.json");
    let expected = read_json("expected.json");
    let today = chrono::Local::now().format("%d %b %Y").to_string();
    let cases = cases.as_array().unwrap();
    let expected = expected.as_array().unwrap();
    assert_eq!(cases.len(), expected.len());
    assert!(cases.len() >= 20);
    for (case, want) in cases.iter().zip(expected) {
        let label = format!("{} / {}", case["template"], case["name"]);
        assert_eq!(case["name"], want["name"], "expected.json is stale; rerun make_expected.py");
        let t = load(case["template"].as_str().unwrap(), case["special_tokens"].as_object().unwrap());
        let tools = case.get("tools").filter(|t| !t.is_null());
        let got = t.render(
            &case["messages"],
            tools,
            case["add_generation_prompt"].as_bool().unwrap(),
            case["extra"].as_object().unwrap(),
        );
        match (got, want.get("output"), want.get("error")) {
            (Ok(out), Some(Value::String(w)), _) => {
                assert_eq!(out, w.replace("@@TODAY@@", &today), "{label}");
            }
            (Err(TemplateError::Raised(msg)), None, Some(Value::String(w))) => assert_eq!(&msg, w, "{label}"),
            (got, _, _) => panic!("{label}: got {got:?}, transformers gave {want}"),
        }
    }
}

#[test]
fn reasoning_parser_detection() {
    let t = |name| load(name, &none());
    assert_eq!(t("qwen3").detect_reasoning_parser(), ReasoningParser::Qwen3);
    assert_eq!(t("deepseek-r1-distill-qwen").detect_reasoning_parser(), ReasoningParser::DeepseekR1);
    assert_eq!(t("deepseek-r1-0528-qwen3").detect_reasoning_parser(), ReasoningParser::DeepseekR1);
    assert_eq!(t("qwen2.5-instruct").detect_reasoning_parser(), ReasoningParser::None);
    assert_eq!(t("llama-3.1-instruct").detect_reasoning_parser(), ReasoningParser::None);
    assert_eq!(t("mistral-instruct").detect_reasoning_parser(), ReasoningParser::None);
    let plain_think = ChatTemplate::new("{% for m in messages %}{{ m.content }}{% endfor %}<think>").unwrap();
    assert_eq!(plain_think.detect_reasoning_parser(), ReasoningParser::DeepseekR1);
}

#[test]
fn generation_prompt_that_opens_think() {
    let special = json!({"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"});
    let r1 = load("deepseek-r1-distill-qwen", special.as_object().unwrap());
    assert!(r1.opens_think_in_generation_prompt(&none()).unwrap());
    let qwen3 = load("qwen3", &none());
    assert!(!qwen3.opens_think_in_generation_prompt(&none()).unwrap());
    // enable_thinking=false closes the block in the prompt: not open.
    let off = json!({"enable_thinking": false});
    assert!(!qwen3.opens_think_in_generation_prompt(off.as_object().unwrap()).unwrap());
    assert!(
        !load("deepseek-r1-0528-qwen3", special.as_object().unwrap())
            .opens_think_in_generation_prompt(&none())
            .unwrap()
    );
    assert!(!load("qwen2.5-instruct", &none()).opens_think_in_generation_prompt(&none()).unwrap());
}

#[test]
fn raise_exception_carries_the_message() {
    let t = ChatTemplate::new(
        "{% if messages|length > 1 %}{{ raise_exception('only one message, got ' ~ messages|length) }}{% endif %}ok",
    )
    .unwrap();
    let msgs = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    let err = t.render(&msgs, None, false, &none()).unwrap_err();
    assert!(matches!(&err, TemplateError::Raised(m) if m == "only one message, got 2"), "{err:?}");
    // Raised inside a macro: still recognised.
    let t = ChatTemplate::new("{% macro f() %}{{ raise_exception('deep') }}{% endmacro %}{{ f() }}").unwrap();
    assert!(matches!(t.render(&json!([]), None, false, &none()), Err(TemplateError::Raised(m)) if m == "deep"));
}

#[test]
fn hf_extensions_and_python_methods() {
    let src = r#"{{ messages[0].content.strip().split(',') | tojson }}|{{ messages[0].content.startswith('  a') }}|{{ '%s-%d' | format('x', 3) }}|{{ {'b': '<é>', 'a': [1, 2]} | tojson(indent=2, ensure_ascii=True) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true, separators=[',', ':']) }}|{{ bos_token }}{{ eos_token }}|{{ enable_thinking }}|{{ strftime_now('%Y') }}|{{ tools[0].function.name.upper() }}|{{ add_generation_prompt }}"#;
    let t =
        ChatTemplate::new(src).unwrap().with_special_token("bos_token", "<s>").with_special_token("eos_token", "</s>");
    let msgs = json!([{"role": "user", "content": "  a,b  "}]);
    let tools = json!([{"type": "function", "function": {"name": "get"}}]);
    let extra = json!({"enable_thinking": true});
    let out = t.render(&msgs, Some(&tools), true, extra.as_object().unwrap()).unwrap();
    let year = chrono::Local::now().format("%Y").to_string();
    let want = format!(
        "[\"a\", \"b\"]|True|x-3|{{\n  \"b\": \"<\\u00e9>\",\n  \"a\": [\n    1,\n    2\n  ]\n}}|{{\"a\":2,\"b\":1}}|<s></s>|True|{year}|GET|True"
    );
    assert_eq!(out, want);
    // Extra kwargs may override special tokens but not what the server sets.
    let extra = json!({"bos_token": "B"});
    assert_eq!(
        ChatTemplate::new("{{ bos_token }}")
            .unwrap()
            .with_special_token("bos_token", "<s>")
            .render(&msgs, None, false, extra.as_object().unwrap())
            .unwrap(),
        "B"
    );
    let extra = json!({"messages": []});
    let err = t.render(&msgs, None, false, extra.as_object().unwrap()).unwrap_err().to_string();
    assert!(err.contains("chat_template_kwargs.messages"), "{err}");
    // A bad strftime format is an error, not a panic.
    let err = ChatTemplate::new("{{ strftime_now('%Q%') }}").unwrap().render(&msgs, None, false, &none()).unwrap_err();
    assert!(err.to_string().contains("strftime_now"), "{err}");
}

#[test]
fn generation_blocks_are_accepted() {
    let t = ChatTemplate::new("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}").unwrap();
    let msgs = json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
    assert_eq!(t.render(&msgs, None, false, &none()).unwrap(), "[q]a");
}

#[test]
fn tool_call_arguments_and_reasoning_are_normalized() {
    let t = ChatTemplate::new("{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.arguments.city }}|{{ c.function.arguments | tojson }}|{% endfor %}{{ m.reasoning_content }}/{{ m.thinking }}{% endfor %}").unwrap();
    let msgs = json!([{"role": "assistant", "content": "", "reasoning": "why", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Oslo\", \"n\": 1}"}},
        {"id": "2", "type": "function", "function": {"name": "w", "arguments": "not json"}}
    ]}]);
    assert_eq!(
        t.render(&msgs, None, false, &none()).unwrap(),
        "Oslo|{\"city\": \"Oslo\", \"n\": 1}||\"not json\"|why/why"
    );
}

#[test]
fn bad_arguments_name_the_field() {
    let t = ChatTemplate::new("x").unwrap();
    let err = t.render(&json!({"role": "user"}), None, false, &none()).unwrap_err();
    assert!(matches!(&err, TemplateError::InvalidArgument { field, .. } if field == "messages"), "{err:?}");
    let err = t.render(&json!([{"role": "user"}, "hi"]), None, false, &none()).unwrap_err();
    assert!(matches!(&err, TemplateError::InvalidArgument { field, .. } if field == "messages[1]"), "{err:?}");
    let err = t.render(&json!([]), Some(&json!({"a": 1})), false, &none()).unwrap_err();
    assert!(matches!(&err, TemplateError::InvalidArgument { field, .. } if field == "tools"), "{err:?}");
    let err = ChatTemplate::new("{% if %}").unwrap_err();
    assert!(matches!(err, TemplateError::Compile { .. }), "{err:?}");
    let err = ChatTemplate::new("{{ messages[0].content.nope() }}")
        .unwrap()
        .render(&json!([{"content": "a"}]), None, false, &none())
        .unwrap_err();
    assert!(matches!(err, TemplateError::Render(_)), "{err:?}");
}

#[test]
fn hostile_templates_hit_limits_with_clear_errors() {
    let msgs = json!([]);
    // An endless-looking loop: fuel runs out.
    let t =
        ChatTemplate::new("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}").unwrap();
    let started = std::time::Instant::now();
    let err = t.render(&msgs, None, false, &none()).unwrap_err();
    assert!(matches!(err, TemplateError::OutOfFuel { limit: 10_000_000 }), "{err:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "fuel stops it promptly");
    // Unbounded recursion.
    let t = ChatTemplate::new("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").unwrap();
    let err = t.render(&msgs, None, false, &none()).unwrap_err();
    assert!(matches!(err, TemplateError::RecursionLimit { limit: 100 }), "{err:?}");
    // Output bomb.
    let limits = TemplateLimits { max_output_bytes: 1 << 20, ..TemplateLimits::default() };
    let t = ChatTemplate::new("{% for i in range(10000) %}{{ 'x' * 1000 }}{% endfor %}")
        .unwrap()
        .with_limits(limits)
        .unwrap();
    let err = t.render(&msgs, None, false, &none()).unwrap_err();
    assert!(
        matches!(err, TemplateError::OutOfFuel { .. } | TemplateError::OutputTooLarge { limit: 1_048_576 }),
        "{err:?}"
    );
    let t = ChatTemplate::new("{% for i in range(3000) %}{{ 'x' * 1000 }}{% endfor %}")
        .unwrap()
        .with_limits(limits)
        .unwrap();
    let err = t.render(&msgs, None, false, &none()).unwrap_err();
    assert!(matches!(err, TemplateError::OutputTooLarge { limit: 1_048_576 }), "{err:?}");
    assert!(err.to_string().contains("1048576"), "{err}");
}

#[test]
fn long_conversations_fit_in_the_default_fuel() {
    let t = load("qwen3", &none());
    let mut msgs = vec![json!({"role": "system", "content": "s"})];
    for i in 0..1000 {
        msgs.push(json!({"role": "user", "content": format!("question {i}")}));
        msgs.push(json!({"role": "assistant", "content": format!("<think>r{i}</think>answer {i}")}));
    }
    msgs.push(json!({"role": "user", "content": "last"}));
    let out = t.render(&Value::Array(msgs), None, true, &none()).unwrap();
    assert!(out.ends_with("<|im_start|>user\nlast<|im_end|>\n<|im_start|>assistant\n"));
    assert!(out.contains("answer 999<|im_end|>") && !out.contains("r999"));
}
