//! The text side of the llmd engine: HF `tokenizer.json` with its special tokens, incremental
//! detokenization that never emits a broken UTF-8 character, and chat templates rendered with
//! minijinja plus the HF extensions real templates use, under fuel and recursion limits.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let tok = Arc::new(llmd_tokenizer::Tokenizer::from_dir("/models/qwen".as_ref())?);
//! let messages = serde_json::json!([{"role": "user", "content": "Hi"}]);
//! let prompt = tok.chat_template().expect("chat template").render(&messages, None, true, &Default::default())?;
//! let ids = tok.encode(&prompt, false)?;
//! let mut dec = tok.incremental_decoder(&ids, true)?;
//! let _text = dec.push(42)?;
//! # Ok(()) }
//! ```

mod bytes;
mod error;
mod incremental;
mod template;
mod tokenizer;

pub use error::{TemplateError, TokenizerError};
pub use incremental::IncrementalDecoder;
pub use template::{ChatTemplate, TemplateLimits};
pub use tokenizer::Tokenizer;
