//! Incremental output parsers: reasoning (`<think>...</think>` → `reasoning_content`) and tool
//! calls (`<tool_call>{json}</tool_call>` → `tool_calls`).
//!
//! Both are state machines fed with text deltas as the engine produces them; they hold back
//! only the text that may be the start of a tag, so streaming clients see text as soon as it
//! cannot be part of one. Feeding a text in one piece or split anywhere gives the same result
//! (the tests check every split point).

use crate::backend::ReasoningParser;

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";

/// A piece of parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text inside the reasoning block.
    Reasoning(String),
    /// The answer.
    Content(String),
    /// A complete tool call.
    ToolCall(ParsedToolCall),
}

/// A tool call as the model wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedToolCall {
    pub name: String,
    /// The arguments as a JSON string (OpenAI's `function.arguments`).
    pub arguments: String,
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`, at a char boundary.
fn partial_tag_suffix(text: &str, tag: &str) -> usize {
    let max = tag.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && tag.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThinkState {
    /// At the start of the output: an optional `<think>` may come (after whitespace).
    Start {
        default_reasoning: bool,
    },
    Reasoning,
    Content,
}

/// Splits reasoning from content.
#[derive(Debug, Clone)]
pub struct ReasoningSplitter {
    state: ThinkState,
    buf: String,
}

impl ReasoningSplitter {
    /// A splitter for `parser`. `prompt` is the rendered prompt: a generation prompt that
    /// already opens `<think>` (DeepSeek-R1-0528, Qwen3 thinking templates) starts the output
    /// inside the reasoning block.
    pub fn new(parser: ReasoningParser, prompt: &str) -> Self {
        let state = match parser {
            ReasoningParser::None => ThinkState::Content,
            _ if prompt.trim_end().ends_with(THINK_OPEN) => ThinkState::Reasoning,
            ReasoningParser::DeepseekR1 => ThinkState::Start { default_reasoning: true },
            ReasoningParser::Qwen3 => ThinkState::Start { default_reasoning: false },
        };
        ReasoningSplitter { state, buf: String::new() }
    }

    /// Feeds a delta; returns the pieces that are certain now.
    pub fn push(&mut self, delta: &str, out: &mut Vec<Piece>) {
        self.buf.push_str(delta);
        loop {
            match self.state {
                ThinkState::Content => {
                    if !self.buf.is_empty() {
                        out.push(Piece::Content(std::mem::take(&mut self.buf)));
                    }
                    return;
                }
                ThinkState::Start { default_reasoning } => {
                    let trimmed = self.buf.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_OPEN) {
                        self.buf = rest.to_string();
                        self.state = ThinkState::Reasoning;
                    } else if THINK_OPEN.starts_with(trimmed) {
                        return; // still may become `<think>`
                    } else {
                        self.state = if default_reasoning { ThinkState::Reasoning } else { ThinkState::Content };
                    }
                }
                ThinkState::Reasoning => {
                    if let Some(at) = self.buf.find(THINK_CLOSE) {
                        let rest = self.buf.split_off(at + THINK_CLOSE.len());
                        self.buf.truncate(at);
                        if !self.buf.is_empty() {
                            out.push(Piece::Reasoning(std::mem::take(&mut self.buf)));
                        }
                        self.buf = rest;
                        self.state = ThinkState::Content;
                    } else {
                        let hold = partial_tag_suffix(&self.buf, THINK_CLOSE);
                        let keep = self.buf.split_off(self.buf.len() - hold);
                        if !self.buf.is_empty() {
                            out.push(Piece::Reasoning(std::mem::take(&mut self.buf)));
                        }
                        self.buf = keep;
                        return;
                    }
                }
            }
        }
    }

    /// Releases held-back text at the end of the output.
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        let rest = std::mem::take(&mut self.buf);
        if rest.is_empty() {
            return;
        }
        let reasoning = match self.state {
            ThinkState::Start { default_reasoning } => default_reasoning,
            ThinkState::Reasoning => true,
            ThinkState::Content => false,
        };
        out.push(if reasoning { Piece::Reasoning(rest) } else { Piece::Content(rest) });
    }
}

/// Finds `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in content.
#[derive(Debug, Clone, Default)]
pub struct ToolCallParser {
    in_call: bool,
    buf: String,
    /// After a tool call, whitespace-only text is held so that the newlines between calls do
    /// not come back as content.
    seen_call: bool,
    pending_ws: String,
}

impl ToolCallParser {
    /// A parser at the start of the output.
    pub fn new() -> Self {
        Self::default()
    }

    fn emit_text(&mut self, text: String, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        if self.seen_call && text.trim().is_empty() {
            self.pending_ws.push_str(&text);
            return;
        }
        let mut all = std::mem::take(&mut self.pending_ws);
        all.push_str(&text);
        out.push(Piece::Content(all));
    }

    fn emit_call(&mut self, inner: &str, out: &mut Vec<Piece>) {
        match parse_tool_json(inner) {
            Some(call) => {
                self.pending_ws.clear();
                self.seen_call = true;
                out.push(Piece::ToolCall(call));
            }
            // Not a tool call after all: give the text back unchanged.
            None => self.emit_text(format!("{TOOL_OPEN}{inner}{TOOL_CLOSE}"), out),
        }
    }

    /// Feeds content text; returns content and complete tool calls.
    pub fn push(&mut self, delta: &str, out: &mut Vec<Piece>) {
        self.buf.push_str(delta);
        loop {
            if self.in_call {
                let Some(at) = self.buf.find(TOOL_CLOSE) else { return };
                let rest = self.buf.split_off(at + TOOL_CLOSE.len());
                self.buf.truncate(at);
                let inner = std::mem::replace(&mut self.buf, rest);
                self.in_call = false;
                self.emit_call(&inner, out);
            } else if let Some(at) = self.buf.find(TOOL_OPEN) {
                let rest = self.buf.split_off(at + TOOL_OPEN.len());
                self.buf.truncate(at);
                let text = std::mem::replace(&mut self.buf, rest);
                self.emit_text(text, out);
                self.in_call = true;
            } else {
                let hold = partial_tag_suffix(&self.buf, TOOL_OPEN);
                let keep = self.buf.split_off(self.buf.len() - hold);
                let text = std::mem::replace(&mut self.buf, keep);
                self.emit_text(text, out);
                return;
            }
        }
    }

    /// Releases held-back text; an unclosed call that holds valid JSON still counts (models
    /// often stop on EOS right after the JSON).
    pub fn finish(&mut self, out: &mut Vec<Piece>) {
        let rest = std::mem::take(&mut self.buf);
        if self.in_call {
            self.in_call = false;
            match parse_tool_json(&rest) {
                Some(call) => {
                    self.seen_call = true;
                    out.push(Piece::ToolCall(call));
                }
                None => self.emit_text(format!("{TOOL_OPEN}{rest}"), out),
            }
        } else {
            self.emit_text(rest, out);
        }
    }

    /// Whether a tool call was found so far.
    pub fn saw_tool_call(&self) -> bool {
        self.seen_call
    }
}

fn parse_tool_json(inner: &str) -> Option<ParsedToolCall> {
    let value: serde_json::Value = serde_json::from_str(inner.trim()).ok()?;
    let name = value.get("name")?.as_str()?.to_string();
    let arguments = match value.get("arguments").or_else(|| value.get("parameters")) {
        None | Some(serde_json::Value::Null) => "{}".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    Some(ParsedToolCall { name, arguments })
}

/// The whole pipeline for one choice: reasoning first, then tool calls in the answer.
#[derive(Debug, Clone)]
pub struct OutputParser {
    reasoning: ReasoningSplitter,
    tools: Option<ToolCallParser>,
}

impl OutputParser {
    /// `parse_tools` is true when the request offered tools (and `tool_choice` is not "none").
    pub fn new(parser: ReasoningParser, prompt: &str, parse_tools: bool) -> Self {
        OutputParser { reasoning: ReasoningSplitter::new(parser, prompt), tools: parse_tools.then(ToolCallParser::new) }
    }

    fn route(&mut self, pieces: Vec<Piece>, out: &mut Vec<Piece>) {
        for piece in pieces {
            match (piece, &mut self.tools) {
                (Piece::Content(text), Some(tools)) => tools.push(&text, out),
                (piece, _) => out.push(piece),
            }
        }
    }

    /// Feeds a text delta.
    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        let mut first = Vec::new();
        self.reasoning.push(delta, &mut first);
        let mut out = Vec::new();
        self.route(first, &mut out);
        out
    }

    /// Flushes at the end of the choice.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut first = Vec::new();
        self.reasoning.finish(&mut first);
        let mut out = Vec::new();
        self.route(first, &mut out);
        if let Some(tools) = &mut self.tools {
            tools.finish(&mut out);
        }
        out
    }

    /// Whether any tool call was parsed.
    pub fn saw_tool_call(&self) -> bool {
        self.tools.as_ref().is_some_and(ToolCallParser::saw_tool_call)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merges adjacent pieces of the same kind so that results of different splits compare.
    fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = Vec::new();
        for p in pieces {
            match (out.last_mut(), p) {
                (Some(Piece::Reasoning(a)), Piece::Reasoning(b)) => a.push_str(&b),
                (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(&b),
                (_, p) => out.push(p),
            }
        }
        out
    }

    fn run(parser: ReasoningParser, prompt: &str, tools: bool, chunks: &[&str]) -> Vec<Piece> {
        let mut p = OutputParser::new(parser, prompt, tools);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.push(c));
        }
        out.extend(p.finish());
        merge(out)
    }

    /// Every split into two and three pieces gives the one-shot result.
    fn check_all_splits(parser: ReasoningParser, prompt: &str, tools: bool, text: &str, expected: &[Piece]) {
        let whole = run(parser, prompt, tools, &[text]);
        assert_eq!(whole, expected, "one-shot parse of {text:?}");
        let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        for &i in &bounds {
            assert_eq!(run(parser, prompt, tools, &[&text[..i], &text[i..]]), expected, "split at {i} of {text:?}");
            for &j in bounds.iter().filter(|&&j| j >= i) {
                let got = run(parser, prompt, tools, &[&text[..i], &text[i..j], &text[j..]]);
                assert_eq!(got, expected, "split at {i},{j} of {text:?}");
            }
        }
        // One char at a time, as a token stream would deliver it.
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let refs: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(run(parser, prompt, tools, &refs), expected, "char by char {text:?}");
    }

    fn r(s: &str) -> Piece {
        Piece::Reasoning(s.into())
    }
    fn c(s: &str) -> Piece {
        Piece::Content(s.into())
    }
    fn call(name: &str, args: &str) -> Piece {
        Piece::ToolCall(ParsedToolCall { name: name.into(), arguments: args.into() })
    }

    #[test]
    fn qwen3_think_block_splits_reasoning_from_content() {
        check_all_splits(
            ReasoningParser::Qwen3,
            "<|im_start|>assistant\n",
            false,
            "<think>\nLet me think é.\n</think>\n\nThe answer is 4.",
            &[r("\nLet me think é.\n"), c("\n\nThe answer is 4.")],
        );
    }

    #[test]
    fn qwen3_without_think_is_all_content() {
        check_all_splits(
            ReasoningParser::Qwen3,
            "",
            false,
            "Hello <b>world</b> <thin",
            &[c("Hello <b>world</b> <thin")],
        );
        check_all_splits(ReasoningParser::Qwen3, "", false, "  <thinking> no", &[c("  <thinking> no")]);
    }

    #[test]
    fn deepseek_r1_starts_in_reasoning_without_open_tag() {
        check_all_splits(
            ReasoningParser::DeepseekR1,
            "<｜Assistant｜>",
            false,
            "Okay, 2+2.</think>It is 4.",
            &[r("Okay, 2+2."), c("It is 4.")],
        );
        check_all_splits(ReasoningParser::DeepseekR1, "", false, "<think>hm</think>ok", &[r("hm"), c("ok")]);
        // No closing tag at all: everything is reasoning (vLLM semantics).
        check_all_splits(ReasoningParser::DeepseekR1, "", false, "still thinking </thi", &[r("still thinking </thi")]);
    }

    #[test]
    fn prompt_that_opens_think_starts_inside_reasoning() {
        check_all_splits(
            ReasoningParser::Qwen3,
            "<｜Assistant｜><think>\n",
            false,
            "plan</think>answer",
            &[r("plan"), c("answer")],
        );
    }

    #[test]
    fn none_parser_passes_everything_through() {
        check_all_splits(ReasoningParser::None, "<think>", false, "<think>x</think>y", &[c("<think>x</think>y")]);
    }

    #[test]
    fn tool_calls_are_extracted() {
        check_all_splits(
            ReasoningParser::None,
            "",
            true,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\":\"t\",\"arguments\":\"{}\"}</tool_call>\n",
            &[c("Let me check.\n"), call("get_weather", "{\"city\":\"Paris\"}"), call("t", "{}")],
        );
    }

    #[test]
    fn tool_call_after_reasoning_and_unclosed_call() {
        check_all_splits(
            ReasoningParser::Qwen3,
            "",
            true,
            "<think>need tool</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}",
            &[r("need tool"), c("\n\n"), call("f", "{}")],
        );
    }

    #[test]
    fn invalid_tool_json_stays_content() {
        check_all_splits(
            ReasoningParser::None,
            "",
            true,
            "a<tool_call>not json</tool_call>b <tool_c",
            &[c("a<tool_call>not json</tool_call>b <tool_c")],
        );
        check_all_splits(ReasoningParser::None, "", true, "x<tool_call>{\"nam", &[c("x<tool_call>{\"nam")]);
    }

    #[test]
    fn tools_disabled_leaves_tags_in_content() {
        let text = "<tool_call>{\"name\":\"f\",\"arguments\":{}}</tool_call>";
        check_all_splits(ReasoningParser::None, "", false, text, &[c(text)]);
    }

    #[test]
    fn partial_suffix_respects_char_boundaries() {
        assert_eq!(partial_tag_suffix("abc</th", THINK_CLOSE), 4);
        assert_eq!(partial_tag_suffix("é<", THINK_CLOSE), 1);
        assert_eq!(partial_tag_suffix("é", THINK_CLOSE), 0);
        assert_eq!(partial_tag_suffix("", THINK_CLOSE), 0);
    }
}
