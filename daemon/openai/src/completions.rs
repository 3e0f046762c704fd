//! `POST /v1/completions`: prompts as a string, strings, token ids or lists of token ids.
//! Each prompt is one engine request with `n` choices; choice `i` of prompt `p` is returned
//! as index `p * n + i`, as OpenAI does.

use std::pin::Pin;

use axum::Json;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use llmd_engine::{GenerationEvent, PositionLogprobs};

use crate::chat::{lookup, unix_now};
use crate::error::ApiError;
use crate::metrics::RequestAccount;
use crate::sse::{RunOut, SseRun, render_outs, sse_response, truncated_payload};
use crate::state::ApiState;
use crate::types::*;
use crate::validate::{SamplingInput, new_id, validate_request};

type Tagged = Pin<Box<dyn Stream<Item = (usize, GenerationEvent)> + Send>>;

struct CompletionRun {
    id: String,
    created: u64,
    n: u32,
    /// Per choice: the prompt text to echo (when `echo`), and the text offset for logprobs.
    echo: Vec<Option<String>>,
    offsets: Vec<usize>,
    logprobs: bool,
    usage: UsageInfo,
    usage_pending: usize,
    queue_time: std::time::Duration,
    account: RequestAccount,
}

impl CompletionRun {
    fn convert(&mut self, choice: usize, lps: &[PositionLogprobs]) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for p in lps {
            out.text_offset.push(self.offsets[choice]);
            self.offsets[choice] += p.chosen.token.chars().count();
            out.tokens.push(p.chosen.token.clone());
            out.token_logprobs.push(p.chosen.logprob);
            let mut top = serde_json::Map::new();
            for t in &p.top {
                top.insert(t.token.clone(), serde_json::json!(t.logprob));
            }
            out.top_logprobs.push(top);
        }
        out
    }

    fn on_item(&mut self, (prompt, ev): (usize, GenerationEvent)) -> Vec<RunOut<CompletionChoice>> {
        let n = self.n as usize;
        match ev {
            GenerationEvent::Token { index, token_ids, text, logprobs } => {
                self.account.on_tokens(token_ids.len());
                let choice = prompt * n + index as usize;
                if index as usize >= n {
                    return vec![RunOut::Error(format!("engine sent choice index {index} out of range"))];
                }
                let lp = self.logprobs.then(|| self.convert(choice, &logprobs));
                vec![RunOut::Choice(CompletionChoice { index: choice as u32, text, logprobs: lp, finish_reason: None })]
            }
            GenerationEvent::Finished { index, reason, text, .. } => {
                let choice = (prompt * n + index as usize) as u32;
                self.account.choice_finished(reason.as_str());
                let mut out = Vec::new();
                if !text.is_empty() {
                    out.push(RunOut::Choice(CompletionChoice {
                        index: choice,
                        text,
                        logprobs: None,
                        finish_reason: None,
                    }));
                }
                out.push(RunOut::Choice(CompletionChoice {
                    index: choice,
                    text: String::new(),
                    logprobs: self.logprobs.then(CompletionLogprobs::default),
                    finish_reason: Some(reason.as_str().to_string()),
                }));
                out
            }
            GenerationEvent::Usage(u) => {
                self.usage.add(&UsageInfo::from_engine(&u));
                self.queue_time = self.queue_time.max(u.queue_time);
                self.usage_pending -= 1;
                if self.usage_pending > 0 {
                    return Vec::new();
                }
                self.account.finish(self.usage.completion_tokens, Some(self.queue_time));
                vec![RunOut::Usage(self.usage.clone())]
            }
            GenerationEvent::Error(msg) => {
                self.account.failed();
                vec![RunOut::Error(msg)]
            }
        }
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Option<UsageInfo>>) -> String {
        serde_json::to_string(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.account.model().to_string(),
            choices,
            usage,
            system_fingerprint: None,
        })
        .unwrap_or_default()
    }
}

struct CompletionSse {
    run: CompletionRun,
    include_usage: bool,
}

impl SseRun for CompletionSse {
    type Item = (usize, GenerationEvent);

    fn start(&mut self) -> Vec<String> {
        let usage = self.include_usage.then_some(None);
        let echoes: Vec<(usize, String)> =
            self.run.echo.iter().enumerate().filter_map(|(i, e)| e.clone().map(|e| (i, e))).collect();
        echoes
            .into_iter()
            .map(|(i, text)| {
                self.run.offsets[i] = text.chars().count();
                let choice = CompletionChoice { index: i as u32, text, logprobs: None, finish_reason: None };
                self.run.chunk(vec![choice], usage.clone())
            })
            .collect()
    }

    fn on_item(&mut self, item: Self::Item) -> (Vec<String>, bool) {
        let outs = self.run.on_item(item);
        let run = &self.run;
        render_outs(outs, self.include_usage, |choices, usage| run.chunk(choices, usage))
    }

    fn on_truncated(&mut self) -> Vec<String> {
        self.run.account.settle();
        vec![truncated_payload()]
    }
}

async fn collect(mut run: CompletionRun, mut events: Tagged) -> Result<CompletionResponse, ApiError> {
    let total = run.echo.len();
    let mut choices: Vec<CompletionChoice> = (0..total)
        .map(|i| {
            let text = run.echo[i].clone().unwrap_or_default();
            run.offsets[i] = text.chars().count();
            CompletionChoice {
                index: i as u32,
                text,
                logprobs: run.logprobs.then(CompletionLogprobs::default),
                finish_reason: None,
            }
        })
        .collect();
    let mut usage = None;
    while usage.is_none() {
        let Some(item) = events.next().await else {
            run.account.settle();
            return Err(ApiError::Unavailable("the model stopped before finishing the request".into()));
        };
        for o in run.on_item(item) {
            match o {
                RunOut::Choice(c) => {
                    let acc = &mut choices[c.index as usize];
                    acc.text.push_str(&c.text);
                    if let (Some(a), Some(l)) = (acc.logprobs.as_mut(), c.logprobs) {
                        a.tokens.extend(l.tokens);
                        a.token_logprobs.extend(l.token_logprobs);
                        a.top_logprobs.extend(l.top_logprobs);
                        a.text_offset.extend(l.text_offset);
                    }
                    if c.finish_reason.is_some() {
                        acc.finish_reason = c.finish_reason;
                    }
                }
                RunOut::Usage(u) => usage = Some(u),
                RunOut::Error(msg) => return Err(ApiError::Internal(msg)),
            }
        }
    }
    Ok(CompletionResponse {
        id: run.id.clone(),
        object: "text_completion",
        created: run.created,
        model: run.account.model().to_string(),
        choices,
        usage: Some(usage),
        system_fingerprint: None,
    })
}

/// The handler body.
#[tracing::instrument(skip_all, fields(model = %req.model))]
pub(crate) async fn completions(state: &ApiState, req: CompletionRequest) -> Result<Response, ApiError> {
    let model = lookup(state, &req.model)?;
    let backend = &model.backend;
    let limits = backend.limits();
    if let Some(s) = req.suffix.as_ref().filter(|s| !s.is_empty()) {
        return Err(ApiError::param("suffix", format!("`suffix` is not supported (got {} characters)", s.len())));
    }
    if let Some(b) = req.best_of
        && b != req.n.unwrap_or(1)
    {
        return Err(ApiError::param("best_of", "`best_of` other than `n` is not supported"));
    }
    let echo = req.echo.unwrap_or(false);
    if echo && req.logprobs.is_some() {
        return Err(ApiError::param("echo", "`echo` together with `logprobs` is not supported (no prompt logprobs)"));
    }
    // Tokenize every prompt; token-id prompts are checked against the vocabulary.
    let check_ids = |ids: Vec<u32>, p: usize| -> Result<Vec<u32>, ApiError> {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
            return Err(ApiError::param(
                "prompt",
                format!("`prompt` {p} holds token id {bad}, outside the vocabulary of {} tokens", limits.vocab_size),
            ));
        }
        Ok(ids)
    };
    let prompts: Vec<(Vec<u32>, Option<String>)> = match req.prompt.clone() {
        PromptInput::Text(s) => vec![(backend.encode(&s, true)?, Some(s))],
        PromptInput::Texts(v) => {
            v.into_iter().map(|s| Ok((backend.encode(&s, true)?, Some(s)))).collect::<Result<_, ApiError>>()?
        }
        PromptInput::Tokens(ids) => vec![(check_ids(ids, 0)?, None)],
        PromptInput::TokenLists(v) => {
            v.into_iter().enumerate().map(|(p, ids)| Ok((check_ids(ids, p)?, None))).collect::<Result<_, ApiError>>()?
        }
    };
    if prompts.is_empty() {
        return Err(ApiError::param("prompt", "`prompt` must not be an empty list"));
    }
    if let Some(p) = prompts.iter().position(|(ids, _)| ids.is_empty()) {
        return Err(ApiError::param("prompt", format!("`prompt` {p} is empty")));
    }
    let mut requests = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::new();
    let id = new_id("cmpl-");
    let mut n = 1;
    for (p, (ids, text)) in prompts.into_iter().enumerate() {
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
            logprobs: req.logprobs,
            n: req.n,
            logit_bias: req.logit_bias.clone(),
            response_format: req.response_format.clone(),
            max_tokens: req.max_tokens,
            max_tokens_param: "max_tokens",
        };
        let request_id = if p == 0 { id.clone() } else { format!("{id}-{p}") };
        let request = validate_request(&request_id, input, ids, limits).map_err(|e| match e {
            ApiError::InvalidParam { param: Some(param), message } if param == "messages" => {
                ApiError::InvalidParam { param: Some("prompt".into()), message }
            }
            e => e,
        })?;
        n = request.n();
        let echo_text = match (echo, text) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => Some(backend.decode(request.prompt_tokens(), false)?),
        };
        echoes.extend(std::iter::repeat_n(echo_text, n as usize));
        requests.push(request);
    }
    let started = std::time::Instant::now();
    let count = requests.len();
    let mut streams: Vec<Tagged> = Vec::with_capacity(count);
    for (p, r) in requests.into_iter().enumerate() {
        // On a refusal the streams already submitted are dropped, which cancels them.
        let events = backend.submit(r)?;
        streams.push(Box::pin(events.map(move |e| (p, e))));
    }
    let events: Tagged = Box::pin(futures::stream::select_all(streams));
    let total = echoes.len();
    let run = CompletionRun {
        id,
        created: unix_now(),
        n,
        echo: echoes,
        offsets: vec![0; total],
        logprobs: req.logprobs.is_some(),
        usage: UsageInfo::default(),
        usage_pending: count,
        queue_time: std::time::Duration::ZERO,
        account: RequestAccount::new(state.metrics.clone(), model.name(), started),
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
        return Ok(sse_response(CompletionSse { run, include_usage }, events));
    }
    let fut = collect(run, events);
    let response = match state.options.request_timeout {
        Some(limit) => tokio::time::timeout(limit, fut).await.map_err(|_| ApiError::Timeout(limit.as_secs()))??,
        None => fut.await?,
    };
    Ok(Json(response).into_response())
}
