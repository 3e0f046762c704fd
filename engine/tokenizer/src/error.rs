//! Error types of the tokenizer crate: one enum for loading/encoding/decoding, one for chat
//! templates. Messages name the file, the key or the limit involved.

use std::path::PathBuf;

/// Errors from loading a tokenizer folder, encoding or decoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A key of a config file has a value we cannot use.
    #[error("{file}: `{key}` {reason}")]
    InvalidField {
        /// File name (e.g. `tokenizer_config.json`).
        file: String,
        /// The key, as written in the file.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The HF `tokenizers` library refused `tokenizer.json`.
    #[error("cannot load {path}: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The library's message.
        message: String,
    },
    /// Encoding text failed inside the `tokenizers` library.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// Decoding ids failed inside the `tokenizers` library.
    #[error("decoding failed: {0}")]
    Decode(String),
    /// A token id is not below the vocabulary size.
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens")]
    IdOutOfRange {
        /// The offending id.
        id: u32,
        /// The tokenizer's vocabulary size.
        vocab_size: usize,
    },
    /// The chat template could not be compiled.
    #[error("{file}: chat template: {source}")]
    Template {
        /// The file the template came from.
        file: String,
        /// The compile error.
        #[source]
        source: TemplateError,
    },
}

/// Errors from compiling or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template source is not valid Jinja (as minijinja understands it).
    #[error("template `{name}` does not compile: {message}")]
    Compile {
        /// `default` or `tool_use`.
        name: String,
        /// minijinja's message, with the line.
        message: String,
    },
    /// The template called `raise_exception(msg)`: the conversation is not one it accepts.
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// Rendering ran more instructions than the fuel limit allows.
    #[error("chat template ran out of fuel (limit {limit} instructions); the template loops too long")]
    OutOfFuel {
        /// The fuel limit.
        limit: u64,
    },
    /// Rendering nested deeper than the recursion limit.
    #[error("chat template exceeded the recursion limit of {limit} levels")]
    RecursionLimit {
        /// The recursion limit.
        limit: usize,
    },
    /// The rendered prompt grew past the output cap.
    #[error("rendered chat template is larger than the limit of {limit} bytes")]
    OutputTooLarge {
        /// The cap in bytes.
        limit: usize,
    },
    /// An argument given to `render` has the wrong shape.
    #[error("`{field}` {reason}")]
    InvalidArgument {
        /// The argument or JSON path (e.g. `messages[2]`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other rendering failure (undefined attribute, bad operand types, ...).
    #[error("chat template failed to render: {0}")]
    Render(String),
}
