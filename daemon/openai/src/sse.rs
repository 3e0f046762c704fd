//! Server-Sent Events as OpenAI sends them: `data: {json}\n\n` per chunk, then
//! `data: [DONE]\n\n`. The response body owns the engine stream, so a client that disconnects
//! drops the body, which drops the stream, which cancels the request in the engine.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

/// What a run makes of one engine item: a choice's chunk, the request's usage (its end), or a
/// failure (also its end). Shared by chat (`C` = a delta) and completions (`C` = a text choice).
pub(crate) enum RunOut<C> {
    Choice(C),
    Usage(crate::types::UsageInfo),
    Error(String),
}

/// SSE payloads for `outs`: each choice as its own chunk (with `usage: null` when the client
/// asked for usage), the usage chunk when asked, an error object on failure. Returns `true`
/// once the run ended.
pub(crate) fn render_outs<C>(
    outs: Vec<RunOut<C>>,
    include_usage: bool,
    mut chunk: impl FnMut(Vec<C>, Option<Option<crate::types::UsageInfo>>) -> String,
) -> (Vec<String>, bool) {
    let mut payloads = Vec::new();
    let mut done = false;
    for o in outs {
        match o {
            RunOut::Choice(c) => payloads.push(chunk(vec![c], include_usage.then_some(None))),
            RunOut::Usage(u) => {
                if include_usage {
                    payloads.push(chunk(Vec::new(), Some(Some(u))));
                }
                done = true;
            }
            RunOut::Error(msg) => {
                payloads.push(error_payload(&crate::error::ApiError::Internal(msg)));
                done = true;
            }
        }
    }
    (payloads, done)
}

/// The payload for an engine stream that ended before the run completed.
pub(crate) fn truncated_payload() -> String {
    error_payload(&crate::error::ApiError::Unavailable("the model stopped before finishing the request".into()))
}

/// A streaming request's formatter: turns engine items into SSE `data` payloads.
pub(crate) trait SseRun: Send + 'static {
    /// What the engine side yields.
    type Item: Send + 'static;
    /// Payloads sent before the first engine event (the role chunk of chat).
    fn start(&mut self) -> Vec<String>;
    /// Payloads for one item; `true` when the run is complete (then `[DONE]` follows).
    fn on_item(&mut self, item: Self::Item) -> (Vec<String>, bool);
    /// The engine stream ended without completing the run: payloads describing the failure.
    fn on_truncated(&mut self) -> Vec<String>;
}

struct Driver<R: SseRun, S> {
    run: R,
    items: S,
    pending: VecDeque<String>,
    done: bool,
}

/// The SSE response for `run` over `items`.
pub(crate) fn sse_response<R, S>(mut run: R, items: S) -> Response
where
    R: SseRun,
    S: Stream<Item = R::Item> + Send + Unpin + 'static,
{
    let pending: VecDeque<String> = run.start().into();
    let driver = Driver { run, items, pending, done: false };
    let stream = futures::stream::unfold(driver, |mut d| async move {
        loop {
            if let Some(data) = d.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(Event::default().data(data)), d));
            }
            if d.done {
                return None;
            }
            match d.items.next().await {
                Some(item) => {
                    let (out, complete) = d.run.on_item(item);
                    d.pending.extend(out);
                    if complete {
                        d.pending.push_back("[DONE]".to_string());
                        d.done = true;
                    }
                }
                None => {
                    let out = d.run.on_truncated();
                    d.pending.extend(out);
                    d.pending.push_back("[DONE]".to_string());
                    d.done = true;
                }
            }
        }
    });
    let mut response = Sse::new(stream).into_response();
    // Proxies (nginx) must not buffer the stream.
    response.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
    response
}

/// The JSON of an error inside a stream (after the 200 header went out).
pub(crate) fn error_payload(err: &crate::error::ApiError) -> String {
    serde_json::to_string(&err.body()).unwrap_or_else(|_| "{\"error\":{}}".to_string())
}
