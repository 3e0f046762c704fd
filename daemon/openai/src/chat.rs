//! `POST /v1/chat/completions`: template rendering, validation, and the per-choice output
//! pipeline (reasoning and tool-call parsing) shared by streaming and non-streaming replies.

use axum::Json;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use llmd_engine::{FinishReason, GenerationEvent, PositionLogprobs};
use serde_json::Value;

use crate::backend::{EventStream, ServedModel, TemplateError};
use crate::error::ApiError;
use crate::metrics::RequestAccount;
use crate::parse::{OutputParser, Piece};
use crate::sse::{RunOut, SseRun, render_outs, sse_response, truncated_payload};
use crate::state::ApiState;
use crate::types::*;
use crate::validate::{SamplingInput, check_tools, new_id, normalize_messages, validate_request};

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Renders the prompt of a chat request (shared with `/tokenize`).
pub(crate) fn render_prompt(
    model: &ServedModel,
    messages: &[ChatMessage],
    tools: Option<&Value>,
    add_generation_prompt: bool,
    kwargs: Option<&serde_json::Map<String, Value>>,
) -> Result<String, ApiError> {
    let messages = normalize_messages(messages)?;
    let extra = Value::Object(kwargs.cloned().unwrap_or_default());
    model.backend.render_chat(&messages, tools, add_generation_prompt, &extra).map_err(|e| match e {
        TemplateError::NoTemplate(_) => ApiError::param("messages", e.to_string()),
        TemplateError::Render(_) => ApiError::param("messages", e.to_string()),
        TemplateError::Invalid { param, message } => ApiError::InvalidParam { param: Some(param), message },
    })
}

pub(crate) fn lookup(state: &ApiState, name: &str) -> Result<ServedModel, ApiError> {
    if state.registry.phase() != crate::backend::Phase::Ready {
        return Err(ApiError::Unavailable(format!("the server is {}", state.registry.phase().as_str())));
    }
    state.registry.get(name).ok_or_else(|| ApiError::ModelNotFound(name.to_string()))
}

fn convert_logprobs(lps: &[PositionLogprobs]) -> Vec<ChatTokenLogprob> {
    lps.iter()
        .map(|p| ChatTokenLogprob {
            token: p.chosen.token.clone(),
            logprob: p.chosen.logprob,
            bytes: p.chosen.bytes.clone(),
            top_logprobs: p
                .top
                .iter()
                .map(|t| TopLogprob { token: t.token.clone(), logprob: t.logprob, bytes: t.bytes.clone() })
                .collect(),
        })
        .collect()
}

struct ChoiceState {
    parser: OutputParser,
    tool_calls: u32,
}

/// One chat request in flight: turns engine events into per-choice deltas.
pub(crate) struct ChatRun {
    id: String,
    created: u64,
    choices: Vec<ChoiceState>,
    logprobs: bool,
    account: RequestAccount,
}

impl ChatRun {
    fn delta_from(&mut self, index: u32, pieces: Vec<Piece>) -> ChatDelta {
        let choice = &mut self.choices[index as usize];
        let mut delta = ChatDelta::default();
        for p in pieces {
            match p {
                Piece::Content(t) => delta.content.get_or_insert_with(String::new).push_str(&t),
                Piece::Reasoning(t) => delta.reasoning_content.get_or_insert_with(String::new).push_str(&t),
                Piece::ToolCall(c) => {
                    delta.tool_calls.push(ToolCall {
                        index: Some(choice.tool_calls),
                        id: format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
                        kind: "function",
                        function: FunctionCall { name: c.name, arguments: c.arguments },
                    });
                    choice.tool_calls += 1;
                }
            }
        }
        delta
    }

    fn on_event(&mut self, ev: GenerationEvent) -> Vec<RunOut<ChatChunkChoice>> {
        match ev {
            GenerationEvent::Token { index, token_ids, text, logprobs } => {
                self.account.on_tokens(token_ids.len());
                let Some(choice) = self.choices.get_mut(index as usize) else {
                    return vec![RunOut::Error(format!("engine sent choice index {index} out of range"))];
                };
                let pieces = choice.parser.push(&text);
                let mut delta = self.delta_from(index, pieces);
                let lp = (self.logprobs && !logprobs.is_empty())
                    .then(|| ChatLogprobs { content: convert_logprobs(&logprobs) });
                let empty = delta.content.is_none() && delta.reasoning_content.is_none() && delta.tool_calls.is_empty();
                if empty && lp.is_none() {
                    return Vec::new();
                }
                if empty {
                    // Logprobs of text the parsers still hold back: keep the delta well-formed.
                    delta.content = Some(String::new());
                }
                vec![RunOut::Choice(ChatChunkChoice { index, delta, logprobs: lp, finish_reason: None })]
            }
            GenerationEvent::Finished { index, reason, text, .. } => {
                let Some(choice) = self.choices.get_mut(index as usize) else {
                    return vec![RunOut::Error(format!("engine sent choice index {index} out of range"))];
                };
                let mut pieces = choice.parser.push(&text);
                pieces.extend(choice.parser.finish());
                let tool = choice.parser.saw_tool_call();
                let mut out = Vec::new();
                if !pieces.is_empty() {
                    let delta = self.delta_from(index, pieces);
                    out.push(RunOut::Choice(ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }));
                }
                let reason = if tool && reason == FinishReason::Stop { "tool_calls" } else { reason.as_str() };
                self.account.choice_finished(reason);
                out.push(RunOut::Choice(ChatChunkChoice {
                    index,
                    delta: ChatDelta::default(),
                    logprobs: None,
                    finish_reason: Some(reason.to_string()),
                }));
                out
            }
            GenerationEvent::Usage(u) => {
                self.account.finish(u.completion_tokens, Some(u.queue_time));
                vec![RunOut::Usage(UsageInfo::from_engine(&u))]
            }
            GenerationEvent::Error(msg) => {
                self.account.failed();
                vec![RunOut::Error(msg)]
            }
        }
    }

    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Option<UsageInfo>>) -> String {
        let chunk = ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.account.model().to_string(),
            choices,
            usage,
            system_fingerprint: None,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }
}

struct ChatSse {
    run: ChatRun,
    include_usage: bool,
}

impl SseRun for ChatSse {
    type Item = GenerationEvent;

    fn start(&mut self) -> Vec<String> {
        let usage = self.include_usage.then_some(None);
        (0..self.run.choices.len() as u32)
            .map(|index| {
                let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..Default::default() };
                self.run
                    .chunk(vec![ChatChunkChoice { index, delta, logprobs: None, finish_reason: None }], usage.clone())
            })
            .collect()
    }

    fn on_item(&mut self, ev: GenerationEvent) -> (Vec<String>, bool) {
        let outs = self.run.on_event(ev);
        let run = &self.run;
        render_outs(outs, self.include_usage, |choices, usage| run.chunk(choices, usage))
    }

    fn on_truncated(&mut self) -> Vec<String> {
        self.run.account.settle();
        vec![truncated_payload()]
    }
}

/// Collects a whole run into a `chat.completion`.
async fn collect(mut run: ChatRun, mut events: EventStream) -> Result<ChatCompletionResponse, ApiError> {
    struct Acc {
        content: String,
        reasoning: String,
        tool_calls: Vec<ToolCall>,
        logprobs: Vec<ChatTokenLogprob>,
        finish: Option<String>,
    }
    let mut accs: Vec<Acc> = (0..run.choices.len())
        .map(|_| Acc {
            content: String::new(),
            reasoning: String::new(),
            tool_calls: Vec::new(),
            logprobs: Vec::new(),
            finish: None,
        })
        .collect();
    let mut usage = None;
    while usage.is_none() {
        let Some(ev) = events.next().await else {
            run.account.settle();
            return Err(ApiError::Unavailable("the model stopped before finishing the request".into()));
        };
        for o in run.on_event(ev) {
            match o {
                RunOut::Choice(c) => {
                    let acc = &mut accs[c.index as usize];
                    acc.content.push_str(c.delta.content.as_deref().unwrap_or(""));
                    acc.reasoning.push_str(c.delta.reasoning_content.as_deref().unwrap_or(""));
                    acc.tool_calls.extend(c.delta.tool_calls.into_iter().map(|t| ToolCall { index: None, ..t }));
                    if let Some(lp) = c.logprobs {
                        acc.logprobs.extend(lp.content);
                    }
                    if c.finish_reason.is_some() {
                        acc.finish = c.finish_reason;
                    }
                }
                RunOut::Usage(u) => usage = Some(u),
                RunOut::Error(msg) => return Err(ApiError::Internal(msg)),
            }
        }
    }
    let choices = accs
        .into_iter()
        .enumerate()
        .map(|(i, a)| ChatChoice {
            index: i as u32,
            message: AssistantMessage {
                role: "assistant",
                // OpenAI sends null content with tool calls when there is no text.
                content: if a.content.trim().is_empty() && !a.tool_calls.is_empty() { None } else { Some(a.content) },
                reasoning_content: (!a.reasoning.is_empty()).then_some(a.reasoning),
                tool_calls: a.tool_calls,
            },
            logprobs: run.logprobs.then_some(ChatLogprobs { content: a.logprobs }),
            finish_reason: a.finish,
        })
        .collect();
    Ok(ChatCompletionResponse {
        id: run.id.clone(),
        object: "chat.completion",
        created: run.created,
        model: run.account.model().to_string(),
        choices,
        usage: usage.unwrap_or_default(),
        system_fingerprint: None,
    })
}

/// The handler body.
#[tracing::instrument(skip_all, fields(model = %req.model))]
pub(crate) async fn chat_completions(state: &ApiState, req: ChatCompletionRequest) -> Result<Response, ApiError> {
    let model = lookup(state, &req.model)?;
    let tools = check_tools(&req.tools, &req.tool_choice)?;
    if req.top_logprobs.is_some() && req.logprobs != Some(true) {
        return Err(ApiError::param("top_logprobs", "`top_logprobs` needs `logprobs` set to true"));
    }
    if req.continue_final_message == Some(true) && req.add_generation_prompt == Some(true) {
        return Err(ApiError::param(
            "continue_final_message",
            "`continue_final_message` and `add_generation_prompt` cannot both be true",
        ));
    }
    let continue_final = req.continue_final_message.unwrap_or(false);
    let add_generation_prompt = req.add_generation_prompt.unwrap_or(!continue_final);
    let mut prompt =
        render_prompt(&model, &req.messages, tools.as_ref(), add_generation_prompt, req.chat_template_kwargs.as_ref())?;
    if continue_final {
        // Let the model continue the last assistant message: cut the template's end-of-turn.
        if let Some(Some(MessageContent::Text(last))) = req.messages.last().map(|m| m.content.clone())
            && let Some(at) = prompt.rfind(&last)
        {
            prompt.truncate(at + last.len());
        }
    }
    let backend = &model.backend;
    // The template writes the special tokens (BOS...) itself.
    let prompt_tokens = backend.encode(&prompt, false)?;
    let (max_tokens, max_tokens_param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    let logprobs = req.logprobs.unwrap_or(false);
    let input = SamplingInput {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        seed: req.seed,
        min_tokens: req.min_tokens,
        stop: req.stop.clone(),
        stop_token_ids: req.stop_token_ids.clone(),
        ignore_eos: req.ignore_eos,
        skip_special_tokens: req.skip_special_tokens,
        logprobs: logprobs.then(|| req.top_logprobs.unwrap_or(0)),
        n: req.n,
        logit_bias: req.logit_bias.clone(),
        response_format: req.response_format.clone(),
        max_tokens,
        max_tokens_param,
    };
    let id = new_id("chatcmpl-");
    let request = validate_request(&id, input, prompt_tokens, backend.limits())?;
    let n = request.n();
    let started = std::time::Instant::now();
    let events = backend.submit(request)?;
    let parse_tools = tools.is_some();
    let run = ChatRun {
        id,
        created: unix_now(),
        choices: (0..n)
            .map(|_| ChoiceState {
                parser: OutputParser::new(model.reasoning_parser, &prompt, parse_tools),
                tool_calls: 0,
            })
            .collect(),
        logprobs,
        account: RequestAccount::new(state.metrics.clone(), model.name(), started),
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        return Ok(sse_response(ChatSse { run, include_usage }, events));
    }
    let fut = collect(run, events);
    let response = match state.options.request_timeout {
        Some(limit) => tokio::time::timeout(limit, fut).await.map_err(|_| ApiError::Timeout(limit.as_secs()))??,
        None => fut.await?,
    };
    Ok(Json(response).into_response())
}
