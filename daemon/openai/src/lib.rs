//! OpenAI-compatible HTTP API (filled in by the API work).
