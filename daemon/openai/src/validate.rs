//! Validation of OpenAI requests into the engine's [`ValidGenerateRequest`]: the OpenAI fields
//! are turned into a [`GenerateRequest`] here (defaults, `top_k: -1`, the token limit named as
//! the client sent it) and checked once by [`GenerateRequest::validate`] against the model's
//! [`RequestLimits`]; every error names the parameter. The engine takes nothing else.

use llmd_engine::{GenerateRequest, RequestLimits, SamplingParams, ValidGenerateRequest};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::types::{ChatMessage, MessageContent, StopSpec};

/// Parses a JSON body; type errors name the offending field (`messages[2].content`).
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        if matches!(e.inner().classify(), serde_json::error::Category::Syntax | serde_json::error::Category::Eof) {
            return ApiError::InvalidJson(format!("request body is not valid JSON: {inner}"));
        }
        if path == "." || path.is_empty() || path == "?" {
            // `missing field `model``: name the field from serde's message.
            let missing = inner.strip_prefix("missing field `").and_then(|r| r.split('`').next()).map(str::to_string);
            match missing {
                Some(field) => {
                    ApiError::InvalidParam { param: Some(field.clone()), message: format!("`{field}` is required") }
                }
                None => ApiError::InvalidJson(format!("request body is not valid JSON: {inner}")),
            }
        } else {
            ApiError::InvalidParam {
                param: Some(path.clone()),
                message: format!("invalid value for `{path}`: {inner}"),
            }
        }
    })
}

/// The sampling-related fields shared by chat and completions, as sent.
#[derive(Debug, Default)]
pub struct SamplingInput {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub min_tokens: Option<u32>,
    pub stop: Option<StopSpec>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    /// Number of top alternatives per position; None: no logprobs.
    pub logprobs: Option<u32>,
    pub n: Option<u32>,
    pub logit_bias: Option<Value>,
    pub response_format: Option<Value>,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<u32>,
    /// The name the client used for the token limit (for error messages).
    pub max_tokens_param: &'static str,
}

/// Rejects what the engine does not enforce yet instead of silently ignoring it.
fn check_unsupported(input: &SamplingInput) -> Result<(), ApiError> {
    if let Some(fmt) = &input.response_format {
        match fmt.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some(t @ ("json_object" | "json_schema")) => {
                return Err(ApiError::param(
                    "response_format",
                    format!(
                        "`response_format` of type `{t}` is not supported yet: llmd does not enforce structured output, and ignoring it silently would return invalid JSON"
                    ),
                ));
            }
            other => {
                return Err(ApiError::param(
                    "response_format",
                    format!("`response_format.type` must be `text`, `json_object` or `json_schema`, got {other:?}"),
                ));
            }
        }
    }
    match &input.logit_bias {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.is_empty() => {}
        Some(_) => return Err(ApiError::param("logit_bias", "`logit_bias` is not supported yet")),
    }
    Ok(())
}

/// Builds the engine request `request_id` for `prompt_tokens` from the sampling fields and
/// validates it against `limits` (the model's, from [`crate::ModelBackend::limits`]).
pub fn validate_request(
    request_id: &str,
    input: SamplingInput,
    prompt_tokens: Vec<u32>,
    limits: RequestLimits,
) -> Result<ValidGenerateRequest, ApiError> {
    check_unsupported(&input)?;
    let d = SamplingParams::default();
    let prompt_len = prompt_tokens.len();
    let top_k = match input.top_k {
        None | Some(-1) => None,
        Some(k) if k < -1 || k > i64::from(u32::MAX) => {
            return Err(ApiError::param("top_k", format!("`top_k` must be >= 1 (or -1 to disable), got {k}")));
        }
        Some(k) => Some(k as u32),
    };
    let max_len = limits.max_model_len as usize;
    if prompt_len >= max_len {
        return Err(ApiError::param(
            "messages",
            format!(
                "the prompt has {prompt_len} tokens, which leaves no room to generate within the model's max_model_len of {max_len} tokens"
            ),
        ));
    }
    let room = (max_len - prompt_len) as u32;
    let max_tokens = match input.max_tokens {
        None => room,
        Some(m) if m > room => {
            return Err(ApiError::param(
                input.max_tokens_param,
                format!(
                    "the prompt has {prompt_len} tokens and `{}` is {m}: together {} tokens, over the model's max_model_len of {max_len}",
                    input.max_tokens_param,
                    prompt_len as u64 + u64::from(m)
                ),
            ));
        }
        Some(m) => m,
    };
    let sampling = SamplingParams {
        temperature: input.temperature.unwrap_or(d.temperature),
        top_p: input.top_p.unwrap_or(d.top_p),
        top_k,
        min_p: input.min_p.unwrap_or(d.min_p),
        repetition_penalty: input.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: input.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: input.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: input.seed,
        max_tokens,
        min_tokens: input.min_tokens.unwrap_or(0),
        stop: input.stop.map(StopSpec::into_vec).unwrap_or_default(),
        stop_token_ids: input.stop_token_ids.unwrap_or_default(),
        ignore_eos: input.ignore_eos.unwrap_or(false),
        logprobs: input.logprobs,
        skip_special_tokens: input.skip_special_tokens.unwrap_or(true),
    };
    let request =
        GenerateRequest { request_id: request_id.to_string(), prompt_tokens, sampling, n: input.n.unwrap_or(1) };
    Ok(request.validate(limits)?)
}

/// A fresh request id with OpenAI's prefix (`chatcmpl-`, `cmpl-`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// Normalizes chat messages into the JSON chat templates expect: `developer` becomes
/// `system`, content parts are joined into one string, tool-call arguments given as JSON
/// strings become objects (templates apply `tojson` to them).
pub fn normalize_messages(messages: &[ChatMessage]) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "`messages` must hold at least one message"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" | "system" => "system",
            r @ ("user" | "assistant" | "tool") => r,
            other => {
                return Err(ApiError::param(
                    &format!("messages[{i}].role"),
                    format!("`messages[{i}].role` must be system, developer, user, assistant or tool, got `{other}`"),
                ));
            }
        };
        let content = match &m.content {
            None => {
                if role != "assistant" {
                    return Err(ApiError::param(
                        &format!("messages[{i}].content"),
                        format!("`messages[{i}].content` is required for role `{role}`"),
                    ));
                }
                Value::Null
            }
            Some(MessageContent::Text(s)) => Value::String(s.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => {
                            return Err(ApiError::param(
                                &format!("messages[{i}].content[{j}].text"),
                                format!("`messages[{i}].content[{j}]` of type `text` needs a `text` field"),
                            ));
                        }
                        (kind, _) => {
                            return Err(ApiError::param(
                                &format!("messages[{i}].content[{j}].type"),
                                format!(
                                    "`messages[{i}].content[{j}]` has type `{kind}`; only `text` parts are supported (this server serves text-only models)"
                                ),
                            ));
                        }
                    }
                }
                Value::String(text)
            }
        };
        let mut msg = json!({ "role": role, "content": content });
        if let Some(name) = &m.name {
            msg["name"] = Value::String(name.clone());
        }
        if let Some(id) = &m.tool_call_id {
            msg["tool_call_id"] = Value::String(id.clone());
        }
        if let Some(r) = &m.reasoning_content {
            msg["reasoning_content"] = Value::String(r.clone());
        }
        if let Some(calls) = &m.tool_calls {
            if role != "assistant" {
                return Err(ApiError::param(
                    &format!("messages[{i}].tool_calls"),
                    "only assistant messages may carry `tool_calls`",
                ));
            }
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    if let Some(args) = c.pointer("/function/arguments").and_then(Value::as_str)
                        && let Ok(parsed) = serde_json::from_str::<Value>(args)
                    {
                        c["function"]["arguments"] = parsed;
                    }
                    c
                })
                .collect();
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
    }
    Ok(Value::Array(out))
}

/// Checks `tools` / `tool_choice`; returns whether tool calls should be parsed from the output
/// and the tools to render (None when `tool_choice` is "none").
pub fn check_tools(tools: &Option<Vec<Value>>, tool_choice: &Option<Value>) -> Result<Option<Value>, ApiError> {
    let Some(tools) = tools.as_ref().filter(|t| !t.is_empty()) else {
        return match tool_choice {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
            Some(_) => Err(ApiError::param("tool_choice", "`tool_choice` needs `tools`")),
        };
    };
    for (i, t) in tools.iter().enumerate() {
        let ok = t.get("type").and_then(Value::as_str) == Some("function")
            && t.pointer("/function/name").and_then(Value::as_str).is_some();
        if !ok {
            return Err(ApiError::param(
                &format!("tools[{i}]"),
                format!("`tools[{i}]` must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"),
            ));
        }
    }
    match tool_choice {
        None | Some(Value::Null) => Ok(Some(Value::Array(tools.clone()))),
        Some(Value::String(s)) if s == "auto" => Ok(Some(Value::Array(tools.clone()))),
        Some(Value::String(s)) if s == "none" => Ok(None),
        Some(_) => Err(ApiError::param(
            "tool_choice",
            "`tool_choice` may be \"auto\" or \"none\"; \"required\" and named functions need constrained decoding, which llmd does not enforce yet",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ChatCompletionRequest;

    const LIMITS: RequestLimits = RequestLimits { max_model_len: 100, vocab_size: 50 };

    fn input() -> SamplingInput {
        SamplingInput { max_tokens_param: "max_tokens", ..Default::default() }
    }

    /// Validates `input` for a prompt of `prompt_len` tokens.
    fn build(input: SamplingInput, prompt_len: usize) -> Result<ValidGenerateRequest, ApiError> {
        validate_request("t", input, vec![1; prompt_len], LIMITS)
    }

    fn err_param(r: Result<ValidGenerateRequest, ApiError>) -> String {
        match r {
            Err(ApiError::InvalidParam { param, message }) => {
                let p = param.unwrap_or_default();
                assert!(message.contains(&p), "message `{message}` names `{p}`");
                p
            }
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn default_max_tokens_is_the_remaining_context() {
        let r = build(input(), 30).unwrap();
        assert_eq!((r.sampling().max_tokens, r.n(), r.request_id(), r.prompt_tokens().len()), (70, 1, "t", 30));
    }

    #[test]
    fn prompt_plus_max_tokens_over_the_limit_names_both_numbers() {
        let r = build(SamplingInput { max_tokens: Some(71), ..input() }, 30);
        let Err(e) = r else { panic!("accepted") };
        let msg = e.to_string();
        assert!(msg.contains("30") && msg.contains("71") && msg.contains("100"), "{msg}");
        let Err(e) = build(input(), 100) else { panic!("accepted") };
        assert!(e.to_string().contains("100 tokens"), "{e}");
    }

    #[test]
    fn each_range_names_its_parameter() {
        let cases: Vec<(SamplingInput, &str)> = vec![
            (SamplingInput { temperature: Some(3.0), ..input() }, "temperature"),
            (SamplingInput { temperature: Some(f32::NAN), ..input() }, "temperature"),
            (SamplingInput { top_p: Some(0.0), ..input() }, "top_p"),
            (SamplingInput { top_k: Some(-5), ..input() }, "top_k"),
            (SamplingInput { top_k: Some(0), ..input() }, "top_k"),
            (SamplingInput { min_p: Some(1.5), ..input() }, "min_p"),
            (SamplingInput { repetition_penalty: Some(0.0), ..input() }, "repetition_penalty"),
            (SamplingInput { presence_penalty: Some(2.5), ..input() }, "presence_penalty"),
            (SamplingInput { frequency_penalty: Some(-2.5), ..input() }, "frequency_penalty"),
            (SamplingInput { n: Some(0), ..input() }, "n"),
            (SamplingInput { n: Some(17), ..input() }, "n"),
            (SamplingInput { max_tokens: Some(0), ..input() }, "max_tokens"),
            (SamplingInput { max_tokens: Some(5), min_tokens: Some(6), ..input() }, "min_tokens"),
            (SamplingInput { logprobs: Some(21), ..input() }, "top_logprobs"),
            (SamplingInput { stop: Some(StopSpec::One(String::new())), ..input() }, "stop"),
            (SamplingInput { stop_token_ids: Some(vec![50]), ..input() }, "stop_token_ids"),
            (SamplingInput { response_format: Some(json!({"type": "json_object"})), ..input() }, "response_format"),
            (SamplingInput { response_format: Some(json!({"type": "json_schema"})), ..input() }, "response_format"),
            (SamplingInput { logit_bias: Some(json!({"1": 5})), ..input() }, "logit_bias"),
        ];
        for (inp, param) in cases {
            assert_eq!(err_param(build(inp, 10)), param);
        }
        let ok = SamplingInput {
            top_k: Some(-1),
            response_format: Some(json!({"type": "text"})),
            stop: Some(StopSpec::Many(vec!["a".into(), "b".into()])),
            ..input()
        };
        let r = build(ok, 10).unwrap();
        assert_eq!((r.sampling().top_k, r.sampling().stop.len()), (None, 2));
    }

    #[test]
    fn json_errors_name_the_field() {
        let e = parse_json::<ChatCompletionRequest>(br#"{"model":"m","messages":[],"temperature":"hot"}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidParam { param: Some(p), .. } if p == "temperature"), "{e:?}");
        let e = parse_json::<ChatCompletionRequest>(br#"{"messages":[]}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidParam { param: Some(p), .. } if p == "model"), "{e:?}");
        let e = parse_json::<ChatCompletionRequest>(b"{not json").unwrap_err();
        assert!(matches!(e, ApiError::InvalidJson(_)), "{e:?}");
        let e = parse_json::<ChatCompletionRequest>(br#"{"model":"m","messages":[],"max_tokens":-1}"#).unwrap_err();
        assert!(matches!(&e, ApiError::InvalidParam { param: Some(p), .. } if p == "max_tokens"), "{e:?}");
    }

    #[test]
    fn messages_are_normalized_for_templates() {
        let req: ChatCompletionRequest = parse_json(
            br#"{"model":"m","messages":[
                {"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]},
                {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"42"}]}"#,
        )
        .unwrap();
        let v = normalize_messages(&req.messages).unwrap();
        assert_eq!(v[0], json!({"role":"system","content":"be brief"}));
        assert_eq!(v[1]["content"], "ab");
        assert_eq!(v[2]["tool_calls"][0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(v[3]["tool_call_id"], "c1");
    }

    #[test]
    fn bad_messages_are_refused_with_the_path() {
        let cases = [
            (r#"[{"role":"robot","content":"x"}]"#, "messages[0].role"),
            (
                r#"[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]"#,
                "messages[0].content[0].type",
            ),
            (r#"[{"role":"user"}]"#, "messages[0].content"),
            (r#"[]"#, "messages"),
        ];
        for (msgs, param) in cases {
            let req: ChatCompletionRequest =
                parse_json(format!(r#"{{"model":"m","messages":{msgs}}}"#).as_bytes()).unwrap();
            match normalize_messages(&req.messages) {
                Err(ApiError::InvalidParam { param: Some(p), .. }) => assert_eq!(p, param),
                other => panic!("{msgs}: {other:?}"),
            }
        }
    }

    #[test]
    fn tool_choice_rules() {
        let tools = Some(vec![json!({"type":"function","function":{"name":"f","parameters":{}}})]);
        assert!(check_tools(&tools, &None).unwrap().is_some());
        assert!(check_tools(&tools, &Some(json!("none"))).unwrap().is_none());
        assert!(check_tools(&tools, &Some(json!("required"))).is_err());
        assert!(check_tools(&None, &Some(json!({"type":"function","function":{"name":"f"}}))).is_err());
        assert!(check_tools(&Some(vec![json!({"type":"web"})]), &None).is_err());
        assert!(check_tools(&None, &None).unwrap().is_none());
    }
}
