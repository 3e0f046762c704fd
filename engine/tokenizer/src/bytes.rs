//! Mapping a token id back to the raw bytes it stands for (OpenAI logprobs `bytes`).

use std::collections::{HashMap, HashSet};

/// How token strings encode bytes, read from the `decoder` section of `tokenizer.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// GPT-2 byte-level BPE: every byte is one printable char of a fixed alphabet.
    ByteLevel,
    /// SentencePiece-style: `▁` is a space, `<0xNN>` tokens are raw bytes when ByteFallback is on.
    Metaspace { byte_fallback: bool },
    /// Anything else (WordPiece, ...): decode the single token.
    Decode,
}

/// Precomputed tables for [`crate::Tokenizer::token_bytes`].
pub(crate) struct TokenBytes {
    scheme: Scheme,
    /// Inverse of GPT-2's `bytes_to_unicode`.
    char_to_byte: HashMap<char, u8>,
    /// Added tokens are stored as plain text, outside the byte alphabet.
    added: HashSet<u32>,
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes map to themselves, the other 68 bytes
/// to U+0100 onwards, in byte order.
fn byte_level_alphabet() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0u32..256 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        // Every value is a valid scalar below U+0200.
        if let Some(c) = char::from_u32(c) {
            map.insert(c, b as u8);
        }
    }
    map
}

fn decoder_types(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(t)) = map.get("type") {
                out.push(t.clone());
            }
            map.values().for_each(|v| decoder_types(v, out));
        }
        serde_json::Value::Array(list) => list.iter().for_each(|v| decoder_types(v, out)),
        _ => {}
    }
}

impl TokenBytes {
    /// `added` holds the ids of added tokens, whose content is literal text.
    pub(crate) fn new(inner: &tokenizers::Tokenizer, added: HashSet<u32>) -> TokenBytes {
        let mut types = Vec::new();
        if let Some(dec) = inner.get_decoder()
            && let Ok(v) = serde_json::to_value(dec)
        {
            decoder_types(&v, &mut types);
        }
        let has = |t: &str| types.iter().any(|x| x == t);
        let scheme = if has("ByteLevel") {
            Scheme::ByteLevel
        } else if has("Metaspace") || has("ByteFallback") || has("Replace") {
            Scheme::Metaspace { byte_fallback: has("ByteFallback") }
        } else {
            Scheme::Decode
        };
        TokenBytes { scheme, char_to_byte: byte_level_alphabet(), added }
    }

    pub(crate) fn bytes(&self, inner: &tokenizers::Tokenizer, id: u32) -> Vec<u8> {
        let Some(token) = inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.added.contains(&id) {
            return token.into_bytes();
        }
        match self.scheme {
            Scheme::ByteLevel => {
                let mut out = Vec::with_capacity(token.len());
                for c in token.chars() {
                    match self.char_to_byte.get(&c) {
                        Some(&b) => out.push(b),
                        // Not in the alphabet: the token is literal text.
                        None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                out
            }
            Scheme::Metaspace { byte_fallback } => {
                if byte_fallback
                    && let Some(b) = token
                        .strip_prefix("<0x")
                        .and_then(|r| r.strip_suffix('>'))
                        .filter(|h| h.len() == 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    return vec![b];
                }
                token.replace('\u{2581}', " ").into_bytes()
            }
            Scheme::Decode => inner.decode(&[id], false).map(String::into_bytes).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn byte_level_alphabet_is_a_bijection() {
        let map = byte_level_alphabet();
        assert_eq!(map.len(), 256);
        let mut bytes: Vec<u8> = map.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(map[&'Ġ'], b' ');
        assert_eq!(map[&'Ċ'], b'\n');
        assert_eq!(map[&'A'], b'A');
    }

    #[test]
    fn sentencepiece_tokens_with_byte_fallback() {
        // A Llama-2/Mistral style tokenizer: Metaspace pieces, `<0xNN>` byte tokens.
        let json = r#"{
          "version": "1.0", "truncation": null, "padding": null, "added_tokens": [
            {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
          "normalizer": null, "pre_tokenizer": null, "post_processor": null,
          "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
          "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": {"<s>": 0, "▁hi": 1, "<0xE4>": 2, "<0x0A>": 3}, "merges": []}
        }"#;
        let tok = tokenizers::Tokenizer::from_str(json).unwrap();
        let tb = TokenBytes::new(&tok, [0].into_iter().collect());
        assert_eq!(tb.bytes(&tok, 1), b" hi");
        assert_eq!(tb.bytes(&tok, 2), [0xE4]);
        assert_eq!(tb.bytes(&tok, 3), b"\n");
        assert_eq!(tb.bytes(&tok, 0), b"<s>");
        assert!(tb.bytes(&tok, 99).is_empty());
    }
}
