//! [`IncrementalDecoder`]: streaming detokenization that never emits a broken UTF-8 character.
//!
//! The algorithm is vLLM's: keep a window of ids starting at `prefix_offset`; the text already
//! emitted is `decode(ids[prefix_offset..read_offset])`; after each new id decode the whole
//! window and emit what grew past that prefix, unless the result ends in U+FFFD (a byte-level
//! token that holds only part of a multi-byte character). Decoding a window rather than the
//! single token keeps the tokenizer's context rules (leading spaces of SentencePiece `▁`
//! tokens, byte sequences split across tokens) exactly as a full decode applies them.

use std::sync::Arc;

use crate::error::TokenizerError;
use crate::tokenizer::Tokenizer;

/// How many prompt ids seed the window, as in vLLM (`INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET`).
const CONTEXT_IDS: usize = 5;

/// Per-sequence streaming decoder. Create one per generated sequence.
#[derive(Debug)]
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    skip_special_tokens: bool,
    /// The window: ids from `prefix_offset` on (older ids are dropped to bound memory).
    ids: Vec<u32>,
    /// Index in `ids` where the not-yet-emitted text starts.
    read_offset: usize,
    /// `decode(ids[..read_offset])`: text already emitted (or prompt context).
    prefix_text: String,
}

impl IncrementalDecoder {
    /// A decoder whose context is the last few ids of `prompt_ids` (pass the whole prompt or
    /// its tail), so the first generated token decodes with the right leading space.
    /// Fails when a context id is out of the vocabulary.
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        prompt_ids: &[u32],
        skip_special_tokens: bool,
    ) -> Result<IncrementalDecoder, TokenizerError> {
        let ctx = &prompt_ids[prompt_ids.len().saturating_sub(CONTEXT_IDS)..];
        tokenizer.check_ids(ctx)?;
        let prefix_text = tokenizer.decode(ctx, skip_special_tokens)?;
        Ok(IncrementalDecoder {
            tokenizer,
            skip_special_tokens,
            ids: ctx.to_vec(),
            read_offset: ctx.len(),
            prefix_text,
        })
    }

    /// Adds one generated id; returns the newly completed text (often empty while a
    /// multi-byte character is incomplete). An out-of-range id is an error.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        if text.len() <= self.prefix_text.len() || text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = self.suffix_after_prefix(&text);
        // Slide the window: the ids just emitted become the next prefix.
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        self.prefix_text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok(new)
    }

    /// Flushes text held back at the end of the stream (e.g. a final incomplete byte
    /// sequence, emitted as U+FFFD as a full decode would). Further pushes continue from here.
    pub fn finish(&mut self) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        let new = if text.len() > self.prefix_text.len() { self.suffix_after_prefix(&text) } else { String::new() };
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        self.prefix_text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok(new)
    }

    /// The part of `text` after the already-emitted prefix. Decoding is prefix-stable for
    /// real tokenizers; if a decoder ever rewrites earlier text, emit from the first
    /// differing character (what was sent cannot be taken back).
    fn suffix_after_prefix(&self, text: &str) -> String {
        if let Some(rest) = text.strip_prefix(self.prefix_text.as_str()) {
            return rest.to_string();
        }
        let common: usize = text
            .char_indices()
            .zip(self.prefix_text.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map(|((i, c), _)| i + c.len_utf8())
            .unwrap_or(0);
        text[common..].to_string()
    }
}
