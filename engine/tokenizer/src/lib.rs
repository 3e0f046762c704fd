//! The text side of the llmd engine: HF `tokenizer.json` with its special tokens, incremental
//! detokenization that never emits a broken UTF-8 character, and chat templates rendered with
//! minijinja plus the HF extensions real templates use, under fuel and recursion limits.
