//! The tiny checkpoints of `tests/fixtures/models/*` (written by `tests/fixtures/make_golden.py`
//! with transformers): every folder loads, and encode/decode/chat templates match
//! `tokenizer_golden.json`, which transformers' own `AutoTokenizer` produced.

mod common;

use std::sync::Arc;

use llmd_tokenizer::Tokenizer;
use serde_json::Value;

fn golden() -> Value {
    let path = common::models_dir().join("tokenizer_golden.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn llama() -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_dir(&common::models_dir().join("llama")).expect("load fixtures/models/llama"))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn every_fixture_model_folder_loads() {
    let mut seen = 0;
    for entry in std::fs::read_dir(common::models_dir()).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("tokenizer.json").is_file() {
            continue;
        }
        let tok = Tokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let t = tok.chat_template().unwrap_or_else(|| panic!("{}: no chat template", dir.display()));
        // The fixtures carry a Qwen3-style template (from tokenizer_config.json or chat_template.jinja).
        assert_eq!(t.detect_reasoning_parser(), llmd_options::ReasoningParser::Qwen3, "{}", dir.display());
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        // eos_token first, then generation_config's ids (an int or a list) without duplicates.
        let gen_cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap()).unwrap();
        let mut want = vec![507u32];
        let gen_ids = match &gen_cfg["eos_token_id"] {
            Value::Array(list) => ids(&Value::Array(list.clone())),
            v => vec![v.as_u64().unwrap() as u32],
        };
        for id in gen_ids {
            if !want.contains(&id) {
                want.push(id);
            }
        }
        assert_eq!(tok.eos_token_ids(), want.as_slice(), "{}", dir.display());
        seen += 1;
    }
    assert!(seen >= 5, "expected the fixture models, found {seen}");
}

#[test]
fn encode_and_decode_match_transformers() {
    let tok = llama();
    let golden = golden();
    for (token, id) in golden["special_ids"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(token), Some(id.as_u64().unwrap() as u32), "{token}");
    }
    for case in golden["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "encode {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), case["decoded"].as_str().unwrap(), "decode {text:?}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode skipping specials {text:?}"
        );
        // Streaming gives the same text, token by token.
        let mut dec = tok.incremental_decoder(&[], false).unwrap();
        let mut streamed: String = want.iter().map(|&id| dec.push(id).unwrap()).collect();
        streamed.push_str(&dec.finish().unwrap());
        assert_eq!(streamed, case["decoded"].as_str().unwrap(), "stream {text:?}");
    }
}

#[test]
fn chat_templates_match_transformers() {
    let tok = llama();
    let template = tok.chat_template().unwrap();
    let golden = golden();
    let cases = golden["chat"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut extra = case["kwargs"].as_object().unwrap().clone();
        let add_generation_prompt = extra.remove("add_generation_prompt").and_then(|v| v.as_bool()).unwrap_or(false);
        let tools = case.get("tools").filter(|t| !t.is_null());
        let rendered = template.render(&case["messages"], tools, add_generation_prompt, &extra).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name}");
        assert_eq!(tok.encode(&rendered, false).unwrap(), ids(&case["ids"]), "{name}");
    }
}

#[test]
fn padded_model_vocab_ids_are_rejected_not_panicking() {
    // The fixtures' embeddings have more rows than the tokenizer has entries (as real Qwen
    // checkpoints do): a sampled id in the padding must be a decode error.
    let tok = llama();
    let id = tok.vocab_size() as u32;
    let err = tok.decode(&[id], false).unwrap_err().to_string();
    assert!(err.contains(&id.to_string()) && err.contains("vocabulary"), "{err}");
}
