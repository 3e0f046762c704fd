//! Load generator for the OpenAI API (filled in by the API work).
fn main() {}
