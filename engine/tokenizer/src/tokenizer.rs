//! [`Tokenizer`]: an HF `tokenizer.json` plus what `tokenizer_config.json`,
//! `chat_template.jinja` and `generation_config.json` say about special tokens and templates.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::bytes::TokenBytes;
use crate::error::TokenizerError;
use crate::incremental::IncrementalDecoder;
use crate::template::ChatTemplate;

const TOKENIZER_JSON: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const GENERATION_CONFIG: &str = "generation_config.json";

/// A loaded tokenizer: encode/decode, special tokens, stop ids and the chat template.
///
/// Cheap to share behind an `Arc`; all methods take `&self` and are thread-safe.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    special_ids: HashSet<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// `add_bos_token: true` in the config while `tokenizer.json`'s post-processor does not add
    /// it (LlamaTokenizerFast checkpoints): `encode(.., true)` prepends it, as transformers does.
    prepend_bos: bool,
    model_max_length: Option<u64>,
    chat_template: Option<ChatTemplate>,
    token_bytes: TokenBytes,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_token_ids", &self.eos_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| TokenizerError::Json { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io { path: path.to_path_buf(), source }),
    }
}

fn invalid(file: &str, key: &str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidField { file: file.to_string(), key: key.to_string(), reason: reason.into() }
}

/// A special token in `tokenizer_config.json`: a plain string, an AddedToken object
/// (`{"content": ..}`, written with `"__type": "AddedToken"` by older transformers) or null.
fn special_token(config: &Value, key: &str) -> Result<Option<String>, TokenizerError> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(map)) => match map.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(invalid(TOKENIZER_CONFIG, key, "is an object without a string `content`")),
        },
        Some(_) => Err(invalid(TOKENIZER_CONFIG, key, "must be a string, an AddedToken object or null")),
    }
}

/// `chat_template` in `tokenizer_config.json`: a string, or a list of `{name, template}`
/// where "default" is the template and "tool_use" is kept for requests with tools.
fn config_templates(config: &Value) -> Result<(Option<String>, Option<String>), TokenizerError> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::String(s)) => Ok((Some(s.clone()), None)),
        Some(Value::Array(list)) => {
            let mut default = None;
            let mut tool_use = None;
            for (i, entry) in list.iter().enumerate() {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(invalid(
                        TOKENIZER_CONFIG,
                        &format!("chat_template[{i}]"),
                        "must be an object with string `name` and `template`",
                    ));
                };
                match name {
                    "default" => default = Some(template.to_string()),
                    "tool_use" => tool_use = Some(template.to_string()),
                    _ => {}
                }
            }
            if default.is_none() && tool_use.is_none() && !list.is_empty() {
                return Err(invalid(
                    TOKENIZER_CONFIG,
                    "chat_template",
                    "lists named templates but none is called \"default\" or \"tool_use\"",
                ));
            }
            Ok((default, tool_use))
        }
        Some(_) => Err(invalid(TOKENIZER_CONFIG, "chat_template", "must be a string or a list of named templates")),
    }
}

/// `eos_token_id` in `generation_config.json`: an integer or a list of integers.
fn generation_eos_ids(config: &Value) -> Result<Vec<u32>, TokenizerError> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| invalid(GENERATION_CONFIG, "eos_token_id", format!("has {v}, not a token id")))
    };
    match config.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

impl Tokenizer {
    /// Loads a model folder: `tokenizer.json` (required), `tokenizer_config.json`,
    /// `chat_template.jinja` (wins over the config's `chat_template`) and
    /// `generation_config.json` (its `eos_token_id` joins [`eos_token_ids`](Self::eos_token_ids)).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let tok_path = dir.join(TOKENIZER_JSON);
        if !tok_path.is_file() {
            return Err(TokenizerError::Io {
                path: tok_path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| TokenizerError::Load { path: tok_path.clone(), message: e.to_string() })?;
        let config = read_json(&dir.join(TOKENIZER_CONFIG))?.unwrap_or(Value::Object(Default::default()));
        if !config.is_object() {
            return Err(invalid(TOKENIZER_CONFIG, "(root)", "must be a JSON object"));
        }
        let generation = read_json(&dir.join(GENERATION_CONFIG))?;

        let jinja_path = dir.join(CHAT_TEMPLATE_JINJA);
        let jinja = match std::fs::read_to_string(&jinja_path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(TokenizerError::Io { path: jinja_path, source }),
        };
        let (cfg_default, cfg_tool_use) = config_templates(&config)?;
        Self::build(inner, &config, generation.as_ref(), jinja, cfg_default, cfg_tool_use)
    }

    fn build(
        inner: tokenizers::Tokenizer,
        config: &Value,
        generation: Option<&Value>,
        jinja: Option<String>,
        cfg_default: Option<String>,
        cfg_tool_use: Option<String>,
    ) -> Result<Tokenizer, TokenizerError> {
        let added = inner.get_added_tokens_decoder();
        let max_added = added.keys().copied().max().map(|id| id as usize + 1).unwrap_or(0);
        let vocab_size = inner.get_vocab_size(false).max(max_added);

        let mut special_ids: HashSet<u32> = added.iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
        // transformers treats `added_tokens_decoder` entries marked special as special even
        // when tokenizer.json disagrees; follow it so skip_special_tokens matches.
        if let Some(decoder) = config.get("added_tokens_decoder") {
            let Some(map) = decoder.as_object() else {
                return Err(invalid(TOKENIZER_CONFIG, "added_tokens_decoder", "must be an object keyed by token id"));
            };
            for (key, entry) in map {
                let id: u32 = key.parse().map_err(|_| {
                    invalid(TOKENIZER_CONFIG, &format!("added_tokens_decoder.{key}"), "key is not a token id")
                })?;
                if entry.get("special").and_then(Value::as_bool) == Some(true) {
                    special_ids.insert(id);
                }
            }
        }

        let bos_token = special_token(config, "bos_token")?;
        let eos_token = special_token(config, "eos_token")?;
        let pad_token = special_token(config, "pad_token")?;
        let unk_token = special_token(config, "unk_token")?;
        let lookup = |key: &str, tok: &Option<String>| -> Result<Option<u32>, TokenizerError> {
            match tok {
                None => Ok(None),
                Some(t) => inner
                    .token_to_id(t)
                    .map(Some)
                    .ok_or_else(|| invalid(TOKENIZER_CONFIG, key, format!("is {t:?}, which is not in the vocabulary"))),
            }
        };
        let bos_id = lookup("bos_token", &bos_token)?;
        let eos_id = lookup("eos_token", &eos_token)?;
        for id in [bos_id, eos_id, lookup("pad_token", &pad_token)?].into_iter().flatten() {
            special_ids.insert(id);
        }

        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(generation) = generation {
            for id in generation_eos_ids(generation)? {
                if id as usize >= vocab_size {
                    return Err(invalid(
                        GENERATION_CONFIG,
                        "eos_token_id",
                        format!("has {id}, beyond the vocabulary of {vocab_size} tokens"),
                    ));
                }
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }

        let add_bos = match config.get("add_bos_token") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(invalid(TOKENIZER_CONFIG, "add_bos_token", "must be true or false")),
        };
        let prepend_bos = match (add_bos, bos_id) {
            (true, Some(bos)) => {
                let probe = inner.encode_fast("a", true).map_err(|e| TokenizerError::Encode(e.to_string()))?;
                probe.get_ids().first() != Some(&bos)
            }
            _ => false,
        };

        let model_max_length = config.get("model_max_length").and_then(Value::as_u64);

        let (source, file, tool_use) = match (jinja, cfg_default, cfg_tool_use) {
            (Some(j), _, tool_use) => (Some(j), CHAT_TEMPLATE_JINJA, tool_use),
            (None, Some(d), tool_use) => (Some(d), TOKENIZER_CONFIG, tool_use),
            // Only a tool_use template: it is the template.
            (None, None, Some(t)) => (Some(t), TOKENIZER_CONFIG, None),
            (None, None, None) => (None, TOKENIZER_CONFIG, None),
        };
        let chat_template = match source {
            None => None,
            Some(src) => {
                let wrap = |source| TokenizerError::Template { file: file.to_string(), source };
                let mut t = ChatTemplate::new(src).map_err(wrap)?;
                if let Some(tu) = tool_use {
                    t = t.with_tool_use(tu).map_err(wrap)?;
                }
                for (name, value) in [
                    ("bos_token", &bos_token),
                    ("eos_token", &eos_token),
                    ("pad_token", &pad_token),
                    ("unk_token", &unk_token),
                ] {
                    if let Some(v) = value {
                        t = t.with_special_token(name, v.clone());
                    }
                }
                Some(t)
            }
        };

        let token_bytes = TokenBytes::new(&inner, added.keys().copied().collect());
        Ok(Tokenizer {
            inner,
            vocab_size,
            special_ids,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
            bos_id,
            eos_ids,
            prepend_bos,
            model_max_length,
            chat_template,
            token_bytes,
        })
    }

    /// Encodes text. `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS).
    /// A rendered chat prompt already carries its special tokens: encode it with `false`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc =
            self.inner.encode_fast(text, add_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = enc.get_ids();
        match (add_special_tokens && self.prepend_bos, self.bos_id) {
            (true, Some(bos)) => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes ids to text; `skip_special_tokens` drops special tokens (BOS, EOS, ...).
    /// An id at or beyond [`vocab_size`](Self::vocab_size) is an error, never a panic.
    /// `clean_up_tokenization_spaces` is not applied, so that full and incremental decoding agree.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        let result = if skip_special_tokens {
            // Filter with our own special set: it also holds the specials that only
            // tokenizer_config.json's added_tokens_decoder marks, as transformers does.
            let kept: Vec<u32> = ids.iter().copied().filter(|id| !self.special_ids.contains(id)).collect();
            self.inner.decode(&kept, true)
        } else {
            self.inner.decode(ids, false)
        };
        result.map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub(crate) fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::IdOutOfRange { id, vocab_size: self.vocab_size }),
            None => Ok(()),
        }
    }

    /// Number of token ids (model vocabulary plus added tokens; the highest id + 1).
    /// The model's embedding may be larger (padded); ids beyond this cannot be decoded.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token string (vocabulary or added token), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id (in the tokenizer's own alphabet, e.g. `Ġhello`), if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special token (added token marked special, or BOS/EOS/PAD).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// Ids that end generation: the config's `eos_token`, then every `eos_token_id` of
    /// `generation_config.json` (Llama 3 lists several), without duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS token string from `tokenizer_config.json`.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token string from `tokenizer_config.json`.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The PAD token string from `tokenizer_config.json`.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// The UNK token string from `tokenizer_config.json`.
    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }

    /// The BOS token id, when the config names one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// `model_max_length` from `tokenizer_config.json` (often a huge sentinel; treat as a hint).
    pub fn model_max_length(&self) -> Option<u64> {
        self.model_max_length
    }

    /// The chat template, when the folder has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The raw bytes a token stands for (OpenAI logprobs `bytes`): byte-level BPE tokens map
    /// back through the GPT-2 byte alphabet, SentencePiece `<0xNN>` tokens to their byte, `▁`
    /// to a space. A partial UTF-8 character yields its partial bytes. Unknown ids give empty.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.token_bytes.bytes(&self.inner, id)
    }

    /// A per-sequence incremental decoder; see [`IncrementalDecoder::new`].
    pub fn incremental_decoder(
        self: &Arc<Self>,
        prompt_ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<IncrementalDecoder, TokenizerError> {
        IncrementalDecoder::new(Arc::clone(self), prompt_ids, skip_special_tokens)
    }

    /// The underlying HF tokenizer, for uses this crate does not wrap.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
