//! [`ChatTemplate`]: HF chat templates rendered with minijinja, made to behave like
//! transformers' `apply_chat_template` (its Jinja environment: `trim_blocks`, `lstrip_blocks`,
//! `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, python string
//! methods) under limits so that a hostile template cannot hang or exhaust the daemon.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use llmd_options::ReasoningParser;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as Json;

use crate::error::TemplateError;

/// Resource limits applied to every render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateLimits {
    /// Maximum template VM instructions per render (minijinja fuel).
    pub fuel: u64,
    /// Maximum nesting of macro calls / includes / recursive loops.
    pub recursion: usize,
    /// Maximum size of the rendered prompt in bytes.
    pub max_output_bytes: usize,
}

impl Default for TemplateLimits {
    /// 10 M instructions (a 1000-message conversation through Qwen3's template uses well
    /// under 1 M), 100 levels, 16 MiB of output (far above any model's context).
    fn default() -> Self {
        TemplateLimits { fuel: 10_000_000, recursion: 100, max_output_bytes: 16 << 20 }
    }
}

/// Names under which the two templates are registered in the environment.
const DEFAULT_NAME: &str = "default";
const TOOL_USE_NAME: &str = "tool_use";

/// Variables `render` sets itself; `extra` may not override them.
const RESERVED: [&str; 3] = ["messages", "tools", "add_generation_prompt"];

/// A compiled chat template (plus the optional `tool_use` variant) and the special-token
/// variables it sees. Cheap to clone.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: String,
    tool_use_source: Option<String>,
    special_tokens: Vec<(String, String)>,
    limits: TemplateLimits,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("has_tool_use", &self.tool_use_source.is_some())
            .field("special_tokens", &self.special_tokens)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Carried as the source of the minijinja error that `raise_exception` returns, so the
/// message survives any wrapping and maps to [`TemplateError::Raised`].
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Compiles a template with the default limits. Fails with [`TemplateError::Compile`].
    pub fn new(source: impl Into<String>) -> Result<ChatTemplate, TemplateError> {
        let source = source.into();
        let limits = TemplateLimits::default();
        let env = build_env(&source, None, limits)?;
        Ok(ChatTemplate { env: Arc::new(env), source, tool_use_source: None, special_tokens: Vec::new(), limits })
    }

    /// Adds the `tool_use` template that HF picks when a request carries tools.
    pub fn with_tool_use(mut self, source: impl Into<String>) -> Result<ChatTemplate, TemplateError> {
        let source = source.into();
        self.env = Arc::new(build_env(&self.source, Some(&source), self.limits)?);
        self.tool_use_source = Some(source);
        Ok(self)
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: TemplateLimits) -> Result<ChatTemplate, TemplateError> {
        self.env = Arc::new(build_env(&self.source, self.tool_use_source.as_deref(), limits)?);
        self.limits = limits;
        Ok(self)
    }

    /// Sets a special-token variable the template sees (`bos_token`, `eos_token`, ...).
    pub fn with_special_token(mut self, name: impl Into<String>, value: impl Into<String>) -> ChatTemplate {
        let name = name.into();
        self.special_tokens.retain(|(n, _)| *n != name);
        self.special_tokens.push((name, value.into()));
        self
    }

    /// The default template's source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `tool_use` template's source, when the config has one.
    pub fn tool_use_source(&self) -> Option<&str> {
        self.tool_use_source.as_deref()
    }

    /// The limits in force.
    pub fn limits(&self) -> TemplateLimits {
        self.limits
    }

    /// Renders a conversation as transformers' `apply_chat_template(tokenize=False)` does.
    ///
    /// * `messages`: a JSON array of message objects (`role`, `content` as a string — the HTTP
    ///   layer flattens lists of text parts — `tool_calls`, `tool_call_id`, `name`,
    ///   `reasoning_content`). Assistant `tool_calls[].function.arguments` given as a JSON
    ///   string holding an object is parsed into that object first (as vLLM does), and the
    ///   reasoning is aliased under `reasoning_content` and `thinking` (as transformers does).
    /// * `tools`: the OpenAI `tools` array, or `None` (the template then sees `tools = none`).
    ///   With tools, the `tool_use` template is used when there is one.
    /// * `extra`: further variables such as `enable_thinking` (vLLM's `chat_template_kwargs`);
    ///   they may override `bos_token` & co. but not `messages`, `tools`, `add_generation_prompt`.
    ///
    /// The result carries its own special tokens: encode it with `add_special_tokens = false`.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<String, TemplateError> {
        let messages = normalize_messages(messages)?;
        let tools = match tools {
            None | Some(Json::Null) => None,
            Some(t @ Json::Array(_)) => Some(t),
            Some(_) => {
                return Err(TemplateError::InvalidArgument {
                    field: "tools".into(),
                    reason: "must be an array of tool objects".into(),
                });
            }
        };
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        for (name, value) in &self.special_tokens {
            ctx.insert(name.clone(), Value::from(value.as_str()));
        }
        for (key, value) in extra {
            if RESERVED.contains(&key.as_str()) {
                return Err(TemplateError::InvalidArgument {
                    field: format!("chat_template_kwargs.{key}"),
                    reason: "is set by the server and cannot be overridden".into(),
                });
            }
            ctx.insert(key.clone(), Value::from(Serde(value)));
        }
        ctx.insert("messages".into(), Value::from(Serde(&messages)));
        ctx.insert("tools".into(), tools.map(|t| Value::from(Serde(t))).unwrap_or(Value::from(())));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));

        let name = if tools.is_some() && self.tool_use_source.is_some() { TOOL_USE_NAME } else { DEFAULT_NAME };
        let template = self.env.get_template(name).map_err(|e| TemplateError::Render(e.to_string()))?;
        let mut out = CappedWriter { buf: Vec::new(), cap: self.limits.max_output_bytes, exceeded: false };
        match template.render_captured_to(Value::from(ctx), &mut out) {
            Ok(_) => {}
            Err(_) if out.exceeded => {
                return Err(TemplateError::OutputTooLarge { limit: self.limits.max_output_bytes });
            }
            Err(e) => return Err(map_render_error(e, self.limits)),
        }
        // minijinja writes only UTF-8 strings; a cut at the cap never reaches here.
        String::from_utf8(out.buf).map_err(|e| TemplateError::Render(format!("output is not UTF-8: {e}")))
    }

    /// Whether the generation prompt ends with an opened `<think>` (DeepSeek-R1 distills'
    /// templates append `<｜Assistant｜><think>\n`): the model's output then starts inside
    /// the reasoning block, with no opening tag of its own. Renders a one-user-message probe
    /// with `add_generation_prompt = true` and the given `extra` (e.g. `enable_thinking`).
    pub fn opens_think_in_generation_prompt(
        &self,
        extra: &serde_json::Map<String, Json>,
    ) -> Result<bool, TemplateError> {
        let probe = serde_json::json!([{"role": "user", "content": "Hello"}]);
        let rendered = self.render(&probe, None, true, extra)?;
        Ok(rendered.trim_end().ends_with("<think>"))
    }

    /// The reasoning parser a model with this template needs, from the template text:
    ///
    /// 1. Neither `<think>` nor `</think>` appears in any template → `none`.
    /// 2. DeepSeek role markers (`<｜Assistant｜>` / `<｜User｜>`) appear → `deepseek_r1`
    ///    (R1 distills and R1-0528-Qwen3: the opening tag may come from the prompt).
    /// 3. ChatML (`<|im_start|>`) or an `enable_thinking` switch appears → `qwen3`.
    /// 4. Otherwise → `deepseek_r1`, the more tolerant parser (it accepts output whose
    ///    opening tag is missing).
    pub fn detect_reasoning_parser(&self) -> ReasoningParser {
        let texts: Vec<&str> = std::iter::once(self.source.as_str()).chain(self.tool_use_source.as_deref()).collect();
        let any = |needle: &str| texts.iter().any(|t| t.contains(needle));
        if !any("<think>") && !any("</think>") {
            ReasoningParser::None
        } else if any("<｜Assistant｜>") || any("<｜User｜>") {
            ReasoningParser::DeepseekR1
        } else if any("<|im_start|>") || any("enable_thinking") {
            ReasoningParser::Qwen3
        } else {
            ReasoningParser::DeepseekR1
        }
    }
}

/// Collects output and fails the render once it passes `cap` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
    exceeded: bool,
}

impl Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.exceeded = true;
            return Err(std::io::Error::other("chat template output cap reached"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn map_render_error(err: minijinja::Error, limits: TemplateLimits) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return TemplateError::Raised(raised.0.clone());
        }
        if let Some(inner) = e.downcast_ref::<minijinja::Error>() {
            if inner.kind() == ErrorKind::OutOfFuel {
                return TemplateError::OutOfFuel { limit: limits.fuel };
            }
            if inner.detail().is_some_and(|d| d.contains("recursion limit exceeded")) {
                return TemplateError::RecursionLimit { limit: limits.recursion };
            }
        }
        source = e.source();
    }
    TemplateError::Render(err.to_string())
}

/// Validates `messages` and applies the normalizations transformers/vLLM apply before rendering.
fn normalize_messages(messages: &Json) -> Result<Json, TemplateError> {
    let Json::Array(list) = messages else {
        return Err(TemplateError::InvalidArgument {
            field: "messages".into(),
            reason: "must be an array of message objects".into(),
        });
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, message) in list.iter().enumerate() {
        let Json::Object(map) = message else {
            return Err(TemplateError::InvalidArgument {
                field: format!("messages[{i}]"),
                reason: "must be an object".into(),
            });
        };
        let mut map = map.clone();
        if let Some(Json::Array(calls)) = map.get_mut("tool_calls") {
            for call in calls.iter_mut() {
                if let Some(args) = call.get_mut("function").and_then(|f| f.get_mut("arguments"))
                    && let Json::String(text) = args
                    && let Ok(parsed @ Json::Object(_)) = serde_json::from_str::<Json>(text)
                {
                    *args = parsed;
                }
            }
        }
        // transformers' `_alias_reasoning_fields`: templates read `reasoning_content`
        // (Qwen3) or `thinking` (gpt-oss); clients send any of the three names.
        let reasoning = ["reasoning_content", "thinking", "reasoning"]
            .iter()
            .find_map(|k| map.get(*k).filter(|v| !v.is_null()).cloned());
        if let Some(r) = reasoning {
            if !map.contains_key("thinking") || map["thinking"].is_null() {
                map.insert("thinking".into(), r.clone());
            }
            map.insert("reasoning_content".into(), r);
        }
        out.push(Json::Object(map));
    }
    Ok(Json::Array(out))
}

/// Rewrites transformers' `{% generation %}` / `{% endgeneration %}` tags (assistant-mask
/// markers, no output of their own) into `{% if true %}` / `{% endif %}`, keeping the
/// whitespace-control markers, so minijinja parses templates that use them.
fn rewrite_generation_tags(src: &str) -> std::borrow::Cow<'_, str> {
    if !src.contains("generation") {
        return std::borrow::Cow::Borrowed(src);
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start + 2..];
        let Some(end) = tag.find("%}") else {
            out.push_str(&rest[start..]);
            return std::borrow::Cow::Owned(out);
        };
        let body = &tag[..end];
        let (lead, inner) = match body.strip_prefix(['-', '+']) {
            Some(r) => (&body[..1], r),
            None => ("", body),
        };
        let (inner, trail) = match inner.trim_end().strip_suffix(['-', '+']) {
            Some(r) => (r, &inner.trim_end()[inner.trim_end().len() - 1..]),
            None => (inner, ""),
        };
        let replacement = match inner.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => out.push_str(&format!("{{%{lead} {r} {trail}%}}")),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

fn build_env(
    source: &str,
    tool_use: Option<&str>,
    limits: TemplateLimits,
) -> Result<Environment<'static>, TemplateError> {
    let mut env = Environment::new();
    // transformers renders with Jinja2's trim_blocks/lstrip_blocks; the final newline of a
    // template is dropped as in Jinja2 (keep_trailing_newline = false).
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| TemplateError::Compile { name: DEFAULT_NAME.into(), message: e.to_string() })?;
    env.set_syntax(syntax);
    env.set_fuel(Some(limits.fuel));
    env.set_recursion_limit(limits.recursion);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    for (name, src) in std::iter::once((DEFAULT_NAME, source)).chain(tool_use.map(|t| (TOOL_USE_NAME, t))) {
        env.add_template_owned(name, rewrite_generation_tags(src).into_owned())
            .map_err(|e| TemplateError::Compile { name: name.into(), message: e.to_string() })?;
    }
    Ok(env)
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

fn strftime_now(format: String) -> Result<String, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format string {format:?}"),
        ));
    }
    let mut out = String::new();
    // Formatting with pre-validated items cannot fail except on a broken writer.
    std::fmt::write(&mut out, format_args!("{}", chrono::Local::now().format_with_items(items.into_iter())))
        .map_err(|_| minijinja::Error::new(ErrorKind::InvalidOperation, "strftime_now: formatting failed"))?;
    Ok(out)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// Python `json.dumps`, without the HTML escaping of Jinja's own filter.
fn tojson(
    value: &Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let bad = |msg: String| minijinja::Error::new(ErrorKind::InvalidOperation, msg);
    let ensure_ascii = match ensure_ascii.or(kwargs.get::<Option<Value>>("ensure_ascii")?) {
        None => false,
        Some(v) => v.is_true(),
    };
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else if let Ok(n) = i64::try_from(v.clone()) {
                // Python: indent=0 or negative still breaks lines, with no indentation.
                Some(" ".repeat(n.clamp(0, 64) as usize))
            } else {
                return Err(bad(format!("tojson: `indent` must be an integer or a string, got {v}")));
            }
        }
    };
    let separators = match kwargs.get::<Option<Value>>("separators")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()
                .map_err(|_| bad("tojson: `separators` must be a pair of strings".into()))?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("tojson: `separators` must be a pair of strings".into()))?;
            match <[String; 2]>::try_from(parts) {
                Ok([a, b]) => Some((a, b)),
                Err(_) => return Err(bad("tojson: `separators` must be a pair of strings".into())),
            }
        }
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) =
        separators.unwrap_or_else(|| (if indent.is_some() { ",".into() } else { ", ".into() }, ": ".into()));
    let json = serde_json::to_value(value).map_err(|e| bad(format!("tojson: cannot serialize value: {e}")))?;
    let style = JsonStyle { ensure_ascii, indent, item_sep, key_sep, sort_keys };
    let mut out = String::new();
    write_json(&mut out, &json, &style, 0);
    Ok(Value::from(out))
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn newline(out: &mut String, style: &JsonStyle, depth: usize) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

/// Python `json.dumps` layout: `{"a": 1, "b": [1, 2]}` or, with an indent, one item per
/// line; empty containers stay `[]` / `{}`.
fn write_json(out: &mut String, v: &Json, style: &JsonStyle, depth: usize) {
    match v {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Number(n) => out.push_str(&n.to_string()),
        Json::String(s) => write_json_str(out, s, style.ensure_ascii),
        Json::Array(list) => {
            if list.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in list.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, depth + 1);
                write_json(out, item, style, depth + 1);
            }
            newline(out, style, depth);
            out.push(']');
        }
        Json::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, style, depth + 1);
                write_json_str(out, k, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, item, style, depth + 1);
            }
            newline(out, style, depth);
            out.push('}');
        }
    }
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    use std::fmt::Write as _;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_noop_blocks() {
        let src = "{%- generation -%}x{% endgeneration %}{% if a %}b{% endif %}";
        assert_eq!(rewrite_generation_tags(src), "{%- if true -%}x{% endif %}{% if a %}b{% endif %}");
    }

    #[test]
    fn json_matches_python_dumps_layout() {
        let v: Json = serde_json::from_str(r#"{"b": [1, 2.5, {}], "a": "é<&>\n", "c": []}"#).unwrap();
        let mut out = String::new();
        let style = JsonStyle {
            ensure_ascii: false,
            indent: None,
            item_sep: ", ".into(),
            key_sep: ": ".into(),
            sort_keys: false,
        };
        write_json(&mut out, &v, &style, 0);
        assert_eq!(out, r#"{"b": [1, 2.5, {}], "a": "é<&>\n", "c": []}"#);
        let mut out = String::new();
        let style = JsonStyle { ensure_ascii: true, indent: Some("  ".into()), item_sep: ",".into(), ..style };
        write_json(&mut out, &v, &style, 0);
        assert_eq!(out, "{\n  \"b\": [\n    1,\n    2.5,\n    {}\n  ],\n  \"a\": \"\\u00e9<&>\\n\",\n  \"c\": []\n}");
    }
}
