//! Decoding arbitrary ids with the fixture tokenizer (tests/fixtures/models/qwen2):
//! `Tokenizer::decode` and the streaming `IncrementalDecoder`. Out-of-range ids must be an
//! error, not a panic; the incremental text, once finished, must equal a full decode when
//! every id is in range (the tokenizer's documented contract).
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use llmd_tokenizer::{IncrementalDecoder, Tokenizer};

fn tokenizer() -> &'static Arc<Tokenizer> {
    static TOK: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/qwen2");
        Arc::new(Tokenizer::from_dir(&dir).expect("fixture tokenizer"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let tok = tokenizer();
    let vocab = tok.vocab_size() as u32;
    // Ids: 2 bytes each; the top bit of flags spreads them over (and past) the vocabulary.
    let ids: Vec<u32> = rest
        .chunks_exact(2)
        .map(|c| {
            let v = u16::from_le_bytes([c[0], c[1]]) as u32;
            if flags & 0x80 != 0 { v.wrapping_mul(7) } else { v % (vocab + 4) }
        })
        .collect();
    let skip = flags & 1 != 0;
    let prompt_len = ((flags >> 1) & 7) as usize;
    let full = tok.decode(&ids, skip);
    let (prompt, generated) = ids.split_at(prompt_len.min(ids.len()));
    let Ok(mut dec) = IncrementalDecoder::new(tok.clone(), prompt, skip) else {
        assert!(prompt.iter().any(|&i| i >= vocab), "IncrementalDecoder refused an in-vocabulary prompt");
        return;
    };
    let mut text = String::new();
    let mut all_ok = true;
    for &id in generated {
        match dec.push(id) {
            Ok(piece) => text.push_str(&piece),
            Err(_) => {
                assert!(id >= vocab, "push refused in-vocabulary id {id}");
                all_ok = false;
            }
        }
    }
    text.push_str(&dec.finish().expect("finish after pushes"));
    if all_ok && prompt.is_empty() {
        let full = full.expect("decode of in-vocabulary ids");
        // The tokenizer documents that full and incremental decoding agree.
        assert_eq!(text, full, "incremental decode of {ids:?} differs from the full decode");
    }
});
