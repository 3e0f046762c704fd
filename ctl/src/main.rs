//! llmctl.
fn main() {}
