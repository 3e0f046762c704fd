//! Tokenizer and incremental decoder against the real DeepSeek byte-level BPE tokenizer.

mod common;

use std::sync::Arc;

use llmd_tokenizer::{Tokenizer, TokenizerError};

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";

/// Loaded once per test binary: parsing the 6 MB tokenizer.json dominates these tests.
fn deepseek() -> Arc<Tokenizer> {
    static TOK: std::sync::OnceLock<Arc<Tokenizer>> = std::sync::OnceLock::new();
    TOK.get_or_init(|| Arc::new(Tokenizer::from_dir(&common::deepseek_dir()).expect("load DeepSeek tokenizer"))).clone()
}

#[test]
fn encodes_like_hf_tokenizers() {
    let tok = deepseek();
    // Reference ids from the Python `tokenizers` 0.23 library on the same tokenizer.json.
    let text = "Hello, 世界! 🦀 Rust's tokenizer: naïve café 12345.";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(
        ids,
        [19923, 14, 223, 3427, 3, 7351, 102, 225, 58408, 734, 17840, 9160, 28, 112752, 57664, 223, 6895, 1883, 16]
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.encode(&format!("{BOS}hi{EOS}"), false).unwrap(), [0, 6366, 1]);
}

#[test]
fn special_tokens_and_vocab() {
    let tok = deepseek();
    assert_eq!(tok.vocab_size(), 129_280);
    assert_eq!(tok.bos_token(), Some(BOS));
    assert_eq!(tok.eos_token(), Some(EOS));
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_ids(), &[1]);
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));
    assert!(!tok.is_special(19923));
    assert_eq!(tok.token_to_id(EOS), Some(1));
    assert_eq!(tok.id_to_token(19923).as_deref(), Some("Hello"));
    assert!(tok.chat_template().is_none(), "the package ships no chat template");
    // The config has add_bos_token: false and the post-processor adds nothing.
    assert_eq!(tok.encode("hi", true).unwrap(), [6366]);
    assert_eq!(tok.decode(&[0, 1, 2, 3], true).unwrap(), "!");
    assert_eq!(tok.decode(&[0, 3, 1], false).unwrap(), format!("{BOS}!{EOS}"));
}

#[test]
fn out_of_range_ids_are_errors_naming_id_and_vocab() {
    let tok = deepseek();
    let err = tok.decode(&[5, 129_280], false).unwrap_err();
    assert!(matches!(err, TokenizerError::IdOutOfRange { id: 129_280, vocab_size: 129_280 }));
    assert!(err.to_string().contains("129280"), "{err}");
    let mut dec = tok.incremental_decoder(&[], true).unwrap();
    assert!(matches!(dec.push(u32::MAX), Err(TokenizerError::IdOutOfRange { id: u32::MAX, .. })));
    assert!(tok.incremental_decoder(&[1, 2, 999_999], true).is_err());
    assert!(tok.token_bytes(999_999).is_empty());
}

#[test]
fn token_bytes_concatenate_to_the_utf8_text() {
    let tok = deepseek();
    let text = "Hello, 世界! 🦀 naïve\n\ttabs";
    let ids = tok.encode(text, false).unwrap();
    let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
    assert_eq!(bytes, text.as_bytes());
    // The crab's 4 bytes are split over tokens: each piece alone is not valid UTF-8.
    assert!(ids.iter().any(|&id| std::str::from_utf8(&tok.token_bytes(id)).is_err()));
    assert_eq!(tok.token_bytes(0), BOS.as_bytes());
}

fn stream(tok: &Arc<Tokenizer>, context: &[u32], ids: &[u32], skip: bool) -> Vec<String> {
    let mut dec = tok.incremental_decoder(context, skip).unwrap();
    let mut pieces: Vec<String> = ids.iter().map(|&id| dec.push(id).unwrap()).collect();
    pieces.push(dec.finish().unwrap());
    pieces
}

#[test]
fn incremental_decoding_never_splits_characters() {
    let tok = deepseek();
    let text = "今天天气很好，我们去公园散步吧！🌸🌸 emoji 👨‍👩‍👧‍👦 family; 日本語のテキスト、한국어 텍스트. Ünïcödé ✓";
    let ids = tok.encode(text, false).unwrap();
    let pieces = stream(&tok, &[], &ids, true);
    for p in &pieces {
        assert!(!p.contains('\u{FFFD}'), "piece {p:?} holds a broken character");
    }
    assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
    assert_eq!(pieces.concat(), text);
    // Some tokens only carry part of a character: they emitted nothing.
    assert!(pieces.iter().any(String::is_empty));
}

#[test]
fn incremental_decoding_with_prompt_context() {
    let tok = deepseek();
    let prompt = tok.encode("用户：你好，请介绍一下你自己。 Assistant:", false).unwrap();
    let gen_ids = tok.encode(" 我是一个语言模型 🤖, happy to help!", false).unwrap();
    let pieces = stream(&tok, &prompt, &gen_ids, false);
    let all: Vec<u32> = prompt.iter().chain(&gen_ids).copied().collect();
    let full = tok.decode(&all, false).unwrap();
    let prompt_text = tok.decode(&prompt, false).unwrap();
    assert_eq!(pieces.concat(), full[prompt_text.len()..]);
    assert!(pieces.concat().starts_with(" 我"), "leading space kept: {:?}", pieces.concat());
}

#[test]
fn incremental_decoding_skips_special_tokens() {
    let tok = deepseek();
    let mut ids = tok.encode("答案是42。", false).unwrap();
    ids.push(1); // EOS
    assert_eq!(stream(&tok, &[0], &ids, true).concat(), "答案是42。");
    assert_eq!(stream(&tok, &[0], &ids, false).concat(), format!("答案是42。{EOS}"));
}

#[test]
fn finish_flushes_an_incomplete_character() {
    let tok = deepseek();
    let ids = tok.encode("a🦀", false).unwrap();
    // Stop one token short of the crab's last byte: the tail is held back until finish().
    let cut = &ids[..ids.len() - 1];
    let mut dec = tok.incremental_decoder(&[], true).unwrap();
    let streamed: String = cut.iter().map(|&id| dec.push(id).unwrap()).collect();
    assert!(!streamed.contains('\u{FFFD}'));
    let tail = dec.finish().unwrap();
    assert_eq!(format!("{streamed}{tail}"), tok.decode(cut, true).unwrap());
    assert!(tail.ends_with('\u{FFFD}'));
    assert_eq!(dec.finish().unwrap(), "", "a second finish has nothing left");
}

#[test]
fn generation_config_eos_ids_join_the_config_eos() {
    let dir = common::scratch_dir(&[("generation_config.json", r#"{"bos_token_id": 0, "eos_token_id": [1, 7, 1]}"#)]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), &[1, 7]);
    let dir = common::scratch_dir(&[("generation_config.json", r#"{"eos_token_id": 5}"#)]);
    assert_eq!(Tokenizer::from_dir(dir.path()).unwrap().eos_token_ids(), &[1, 5]);
    let dir = common::scratch_dir(&[("generation_config.json", r#"{"eos_token_id": "x"}"#)]);
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("generation_config.json") && err.contains("eos_token_id"), "{err}");
    let dir = common::scratch_dir(&[("generation_config.json", r#"{"eos_token_id": 200000}"#)]);
    let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("200000") && err.contains("129280"), "{err}");
}

#[test]
fn chat_template_sources_and_precedence() {
    let config = |template: &str| {
        format!(
            r#"{{"bos_token": "{BOS}", "eos_token": {{"__type": "AddedToken", "content": "{EOS}"}}, "add_bos_token": true, "chat_template": {template}}}"#
        )
    };
    // A plain string.
    let dir =
        common::scratch_dir(&[("tokenizer_config.json", &config(r#""{{ bos_token }}{{ messages[0].content }}""#))]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": "hey"}]);
    let t = tok.chat_template().unwrap();
    assert_eq!(t.render(&msgs, None, true, &Default::default()).unwrap(), format!("{BOS}hey"));
    // add_bos_token: true while the post-processor adds none: encode(.., true) prepends BOS.
    assert_eq!(tok.encode("hi", true).unwrap(), [0, 6366]);
    assert_eq!(tok.encode("hi", false).unwrap(), [6366]);

    // Named templates: "default" for plain chats, "tool_use" when tools are given.
    let named = r#"[{"name": "default", "template": "D{{ tools is none }}"}, {"name": "tool_use", "template": "T{{ tools | length }}"}, {"name": "rag", "template": "R"}]"#;
    let dir = common::scratch_dir(&[("tokenizer_config.json", &config(named))]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let t = tok.chat_template().unwrap();
    assert_eq!(t.render(&msgs, None, false, &Default::default()).unwrap(), "DTrue", "booleans print as in Jinja2");
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
    assert_eq!(t.render(&msgs, Some(&tools), false, &Default::default()).unwrap(), "T1");

    // chat_template.jinja wins over the config.
    let dir = common::scratch_dir(&[
        ("tokenizer_config.json", &config(r#""config""#)),
        ("chat_template.jinja", "file {{ eos_token }}\n"),
    ]);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.chat_template().unwrap().render(&msgs, None, false, &Default::default()).unwrap(),
        format!("file {EOS}")
    );
}

#[test]
fn bad_configs_name_file_and_key() {
    let cases = [
        (r#"{"eos_token": 5}"#, "eos_token"),
        (r#"{"bos_token": {"lstrip": false}}"#, "bos_token"),
        (r#"{"eos_token": "<never-seen>"}"#, "eos_token"),
        (r#"{"chat_template": 3}"#, "chat_template"),
        (r#"{"chat_template": [{"name": "default"}]}"#, "chat_template[0]"),
        (r#"{"chat_template": "{% for %}"}"#, "chat template"),
        (r#"{"added_tokens_decoder": {"abc": {}}}"#, "added_tokens_decoder.abc"),
        (r#"{"add_bos_token": "yes"}"#, "add_bos_token"),
    ];
    for (config, key) in cases {
        let dir = common::scratch_dir(&[("tokenizer_config.json", config)]);
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer_config.json") && err.contains(key), "{config}: {err}");
    }
    let dir = common::scratch_dir(&[("tokenizer_config.json", "{not json")]);
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Json { .. }), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(empty.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}
