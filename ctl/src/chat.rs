//! `llmctl chat`: a terminal chat over the daemon's OpenAI HTTP API, in the manner of
//! `ollama run`.
//!
//! Answers stream from `POST /v1/chat/completions` with `stream: true` (server-sent events).
//! A reasoning model's `reasoning_content` is shown dimmed under "Thinking..." and kept out of
//! the conversation history, as DeepSeek-R1's model card asks. When stdin is not a terminal the
//! whole of it is one message and only the answer is printed, so the command composes in pipes.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::cli::ChatArgs;
use crate::daemon::{self, Failure};

const DEFAULT_URL: &str = "http://127.0.0.1:8000";
const HELP: &str = "\
Commands:
  /clear        forget the conversation (the system prompt stays)
  /exit, /bye   leave (Ctrl-D works too)
  /help, /?     this help
Input:
  end a line with \\ to continue on the next line
  \"\"\" starts a block of several lines, a line ending in \"\"\" ends it
  Ctrl-C stops the answer being written and keeps the chat open";

pub async fn run(args: ChatArgs, socket: &Path) -> Result<i32, Failure> {
    let base = match &args.url {
        Some(url) => normalize_url(url),
        None => discover_url(socket).await,
    };
    let api_key = args.api_key.clone().or_else(|| std::env::var("OPENAI_API_KEY").ok()).filter(|k| !k.is_empty());
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure::Failed(format!("cannot create the HTTP client: {e}")))?;
    let api = Api { http, base, api_key, model: args.model.clone() };
    let mut history = Vec::new();
    if let Some(system) = &args.system {
        history.push(json!({"role": "system", "content": system}));
    }

    if !std::io::stdin().is_terminal() {
        return piped(&api, history).await;
    }
    interactive(&api, history).await
}

/// The daemon's `status` says where its HTTP API listens; a wildcard bind is reached on
/// loopback. Without a daemon (or over a remote tunnel) the conventional port is assumed.
async fn discover_url(socket: &Path) -> String {
    let ask = async {
        let mut client = daemon::connect(socket).await.ok()?;
        match client.call(llmd_proto::Request::Status, |_| {}).await.ok()? {
            llmd_proto::Reply::Status(s) => Some(url_from_listen(&s.http_listen)),
            _ => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(3), ask).await.ok().flatten().unwrap_or_else(|| DEFAULT_URL.to_string())
}

fn url_from_listen(listen: &str) -> String {
    if listen.starts_with("http://") || listen.starts_with("https://") {
        return normalize_url(listen);
    }
    let local = if let Some(port) = listen.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = listen.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        listen.to_string()
    };
    format!("http://{local}")
}

/// Accepts `host:port`, `http://host:port`, with or without a trailing `/v1`.
fn normalize_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    let url = url.strip_suffix("/v1").unwrap_or(url);
    if url.contains("://") { url.to_string() } else { format!("http://{url}") }
}

struct Api {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
    model: String,
}

impl Api {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(key) => builder.bearer_auth(key),
            None => builder,
        }
    }

    fn transport_error(&self, e: reqwest::Error) -> Failure {
        if e.is_connect() || e.is_timeout() {
            Failure::Unreachable(format!(
                "cannot reach the OpenAI API at {}: {e}; is llmd running? systemctl status llmd",
                self.base
            ))
        } else {
            Failure::Failed(format!("request to {} failed: {e}", self.base))
        }
    }

    /// Turns a non-2xx answer into the server's own OpenAI-shaped message.
    async fn status_error(&self, response: reqwest::Response) -> Failure {
        let status = response.status();
        let url = response.url().to_string();
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        let hint =
            if status == reqwest::StatusCode::UNAUTHORIZED { "; pass --api-key or set LLMD_API_KEY" } else { "" };
        let message = message.trim();
        if message.is_empty() {
            // No OpenAI error body: most likely not llmd's API at all, or a path it lacks.
            return Failure::Failed(format!("HTTP {status} from {url} (is this an OpenAI-compatible API?){hint}"));
        }
        Failure::Failed(format!("HTTP {status}: {message}{hint}"))
    }

    /// Fails early, with the served names, when the model is not served. Servers without
    /// `/v1/models` are not held against the user: the chat request will tell.
    async fn check_model(&self) -> Result<(), Failure> {
        let response =
            self.request(reqwest::Method::GET, "/v1/models").send().await.map_err(|e| self.transport_error(e))?;
        if response.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(self.status_error(response).await);
        }
        if !response.status().is_success() {
            return Ok(());
        }
        let Ok(models) = response.json::<Value>().await else { return Ok(()) };
        let Some(data) = models["data"].as_array() else { return Ok(()) };
        let served: Vec<&str> = data.iter().filter_map(|m| m["id"].as_str()).collect();
        if served.contains(&self.model.as_str()) {
            return Ok(());
        }
        let listed = if served.is_empty() { "none".to_string() } else { served.join(", ") };
        Err(Failure::Failed(format!(
            "model `{}` is not served at {} (served: {listed}); serve it with `llmctl load`",
            self.model, self.base
        )))
    }

    /// Streams one answer into `out`. Returns `Ok(None)` when `interrupt` fired first; the
    /// response is dropped then, which closes the connection and cancels the generation.
    async fn stream(
        &self,
        messages: &[Value],
        out: &mut dyn AnswerSink,
        mut interrupt: Option<&mut Signal>,
    ) -> Result<Option<String>, Failure> {
        let body = json!({"model": self.model, "messages": messages, "stream": true});
        let send = self.request(reqwest::Method::POST, "/v1/chat/completions").json(&body).send();
        let response = match interrupt.as_deref_mut() {
            Some(sig) => tokio::select! {
                r = send => r,
                _ = sig.recv() => return Ok(None),
            },
            None => send.await,
        }
        .map_err(|e| self.transport_error(e))?;
        if !response.status().is_success() {
            return Err(self.status_error(response).await);
        }
        let mut bytes = response.bytes_stream();
        let mut parser = SseParser::default();
        let mut answer = String::new();
        loop {
            let chunk = match interrupt.as_deref_mut() {
                Some(sig) => tokio::select! {
                    c = bytes.next() => c,
                    _ = sig.recv() => return Ok(None),
                },
                None => bytes.next().await,
            };
            let Some(chunk) = chunk else {
                // Servers that close without `[DONE]` still gave a complete answer.
                return Ok(Some(answer));
            };
            let chunk = chunk.map_err(|e| Failure::Failed(format!("the answer stream broke off: {e}")))?;
            for data in parser.feed(&chunk) {
                if data == "[DONE]" {
                    return Ok(Some(answer));
                }
                let delta = parse_chunk(&data).map_err(Failure::Failed)?;
                if let Some(r) = delta.reasoning.filter(|r| !r.is_empty()) {
                    out.reasoning(&r);
                }
                if let Some(c) = delta.content.filter(|c| !c.is_empty()) {
                    out.content(&c);
                    answer.push_str(&c);
                }
                if delta.finish_reason.as_deref() == Some("length") {
                    out.note("(the answer hit the token limit)");
                }
            }
        }
    }
}

/// Where streamed text goes: the terminal printer shows reasoning, the pipe printer does not.
trait AnswerSink {
    fn reasoning(&mut self, text: &str);
    fn content(&mut self, text: &str);
    fn note(&mut self, text: &str);
}

/// Pipe mode: only the answer, on stdout.
struct PlainSink {
    wrote: bool,
    ends_with_newline: bool,
}

impl AnswerSink for PlainSink {
    fn reasoning(&mut self, _text: &str) {}

    fn content(&mut self, text: &str) {
        // Reasoning models open the answer with blank lines after their thinking; a pipe
        // should get the answer itself.
        let text = if self.wrote { text } else { text.trim_start() };
        if text.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        self.wrote = true;
        self.ends_with_newline = text.ends_with('\n');
    }

    fn note(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// Terminal mode: thinking dimmed and set apart, then the answer.
struct TerminalSink {
    color: bool,
    thinking: bool,
    at_line_start: bool,
}

impl TerminalSink {
    fn write(&mut self, text: &str, dim: bool) {
        if text.is_empty() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = if dim && self.color { write!(out, "\x1b[2m{text}\x1b[0m") } else { write!(out, "{text}") };
        let _ = out.flush();
        self.at_line_start = text.ends_with('\n');
    }

    fn end_thinking(&mut self) {
        if self.thinking {
            self.thinking = false;
            let close = if self.at_line_start { "...done thinking.\n\n" } else { "\n...done thinking.\n\n" };
            self.write(close, true);
        }
    }

    /// Leaves the cursor on a fresh line with one blank line after the answer.
    fn finish(&mut self) {
        self.end_thinking();
        if !self.at_line_start {
            self.write("\n", false);
        }
        self.write("\n", false);
    }
}

impl AnswerSink for TerminalSink {
    fn reasoning(&mut self, text: &str) {
        if !self.thinking {
            self.thinking = true;
            self.write("Thinking...\n", true);
        }
        self.write(text, true);
    }

    fn content(&mut self, text: &str) {
        self.end_thinking();
        // Reasoning models often open the answer with blank lines after the thinking block.
        let text = if self.at_line_start { text.trim_start_matches('\n') } else { text };
        self.write(text, false);
    }

    fn note(&mut self, text: &str) {
        self.end_thinking();
        let text = if self.at_line_start { format!("{text}\n") } else { format!("\n{text}\n") };
        self.write(&text, true);
    }
}

async fn piped(api: &Api, mut history: Vec<Value>) -> Result<i32, Failure> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).map_err(|e| Failure::Failed(format!("cannot read stdin: {e}")))?;
    let input = input.trim();
    if input.is_empty() {
        return Err(Failure::Failed("stdin was empty: nothing to send".to_string()));
    }
    history.push(json!({"role": "user", "content": input}));
    let mut sink = PlainSink { wrote: false, ends_with_newline: false };
    api.stream(&history, &mut sink, None).await?;
    if sink.wrote && !sink.ends_with_newline {
        println!();
    }
    Ok(0)
}

enum Input {
    Message(String),
    Interrupted,
    Eof,
}

/// Reads one message: a line, lines joined by a trailing `\`, or a `"""` block.
async fn read_message(lines: &mut mpsc::UnboundedReceiver<Option<String>>, sigint: &mut Signal) -> Input {
    let mut parts: Vec<String> = Vec::new();
    let mut in_block = false;
    loop {
        prompt(if parts.is_empty() && !in_block { ">>> " } else { "... " });
        let line = tokio::select! {
            line = lines.recv() => line.flatten(),
            _ = sigint.recv() => return Input::Interrupted,
        };
        let Some(line) = line else {
            // Ctrl-D: send what was typed if anything, else leave.
            return if parts.is_empty() { Input::Eof } else { Input::Message(parts.join("\n")) };
        };
        let line = line.trim_end_matches(['\n', '\r']);
        if in_block {
            if let Some(last) = line.strip_suffix("\"\"\"") {
                parts.push(last.to_string());
                return Input::Message(parts.join("\n").trim().to_string());
            }
            parts.push(line.to_string());
        } else if parts.is_empty() && line.trim_start().starts_with("\"\"\"") {
            let rest = &line.trim_start()[3..];
            match rest.strip_suffix("\"\"\"") {
                Some(one_line) => return Input::Message(one_line.trim().to_string()),
                None => {
                    in_block = true;
                    parts.push(rest.to_string());
                }
            }
        } else if let Some(head) = line.strip_suffix('\\') {
            parts.push(head.to_string());
        } else {
            parts.push(line.to_string());
            return Input::Message(parts.join("\n").trim().to_string());
        }
    }
}

fn prompt(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{text}");
    let _ = out.flush();
}

async fn interactive(api: &Api, mut history: Vec<Value>) -> Result<i32, Failure> {
    api.check_model().await?;
    // Catching SIGINT from here on is what lets Ctrl-C stop an answer instead of the program.
    let mut sigint = signal(SignalKind::interrupt())
        .map_err(|e| Failure::Failed(format!("cannot install the Ctrl-C handler: {e}")))?;
    // Reading stdin blocks, so a thread feeds lines to the async loop; it ends with the process.
    let (tx, mut lines) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        loop {
            let mut line = String::new();
            match stdin.lock().read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    if tx.send(Some(line)).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    println!("Chatting with {} at {}. Type /help for help, /exit or Ctrl-D to leave.", api.model, api.base);
    loop {
        let message = match read_message(&mut lines, &mut sigint).await {
            Input::Eof => {
                println!();
                return Ok(0);
            }
            Input::Interrupted => {
                println!("\nUse Ctrl-D or /exit to leave.");
                continue;
            }
            Input::Message(m) => m,
        };
        match message.as_str() {
            "" => continue,
            "/exit" | "/bye" => return Ok(0),
            "/clear" => {
                history.retain(|m| m["role"] == "system");
                println!("Cleared the conversation.");
                continue;
            }
            "/help" | "/?" => {
                println!("{HELP}");
                continue;
            }
            cmd if cmd.starts_with('/') && !cmd.contains(char::is_whitespace) => {
                println!("Unknown command {cmd}; /help lists them.");
                continue;
            }
            _ => {}
        }
        history.push(json!({"role": "user", "content": message}));
        let mut sink = TerminalSink { color, thinking: false, at_line_start: true };
        match api.stream(&history, &mut sink, Some(&mut sigint)).await {
            Ok(Some(answer)) => {
                sink.finish();
                history.push(json!({"role": "assistant", "content": answer.trim()}));
            }
            Ok(None) => {
                // The half answer is not kept: the next turn starts from the last full exchange.
                sink.end_thinking();
                println!("{}", if sink.at_line_start { "(stopped)\n" } else { "\n(stopped)\n" });
                history.pop();
            }
            Err(failure) => {
                sink.end_thinking();
                if !sink.at_line_start {
                    println!();
                }
                eprintln!("error: {}\n", failure.message());
                history.pop();
            }
        }
    }
}

/// Splits a byte stream into SSE `data:` payloads. Events may arrive split across chunks
/// anywhere, even inside a UTF-8 character, so bytes are buffered until a full line is there.
#[derive(Debug, Default)]
struct SseParser {
    buffer: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(pos) = self.buffer.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buffer.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                // A blank line ends the event; multi-line data joins with newlines (SSE spec).
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                self.data.push(value.strip_prefix(' ').unwrap_or(value).to_string());
            }
            // Comments (`: keep-alive`), `event:`, `id:` and `retry:` carry nothing we show.
        }
        events
    }
}

#[derive(Debug, Default, PartialEq)]
struct Delta {
    reasoning: Option<String>,
    content: Option<String>,
    finish_reason: Option<String>,
}

/// Reads one `chat.completion.chunk`. Reasoning arrives as `reasoning_content` (DeepSeek,
/// vLLM, llmd) or `reasoning` (newer vLLM); both are accepted.
fn parse_chunk(data: &str) -> Result<Delta, String> {
    let value: Value =
        serde_json::from_str(data).map_err(|e| format!("malformed event from the server: {e}: {data}"))?;
    if let Some(message) = value["error"]["message"].as_str() {
        return Err(format!("the server stopped the answer: {message}"));
    }
    let choice = &value["choices"][0];
    let delta = &choice["delta"];
    let text = |key: &str| delta[key].as_str().map(str::to_string);
    Ok(Delta {
        reasoning: text("reasoning_content").or_else(|| text("reasoning")),
        content: text("content"),
        finish_reason: choice["finish_reason"].as_str().map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_survive_any_split() {
        let stream = "data: {\"a\":\"é\"}\r\n\r\n: keep-alive\n\nevent: x\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let (a, b) = stream.as_bytes().split_at(split);
            let mut parser = SseParser::default();
            let mut events = parser.feed(a);
            events.extend(parser.feed(b));
            assert_eq!(events, vec!["{\"a\":\"é\"}".to_string(), "[DONE]".to_string()], "split at {split}");
        }
    }

    #[test]
    fn chunks_and_errors() {
        let d = parse_chunk(r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hm"},"finish_reason":null}]}"#)
            .unwrap();
        assert_eq!(d, Delta { reasoning: Some("hm".into()), ..Delta::default() });
        let d = parse_chunk(r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}"#).unwrap();
        assert_eq!((d.content.as_deref(), d.finish_reason.as_deref()), (Some("Hi"), Some("stop")));
        let d = parse_chunk(r#"{"choices":[],"usage":{"total_tokens":3}}"#).unwrap();
        assert_eq!(d, Delta::default());
        assert!(parse_chunk(r#"{"error":{"message":"boom"}}"#).unwrap_err().contains("boom"));
        assert!(parse_chunk("nope").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(url_from_listen("0.0.0.0:8000"), "http://127.0.0.1:8000");
        assert_eq!(url_from_listen("[::]:9000"), "http://[::1]:9000");
        assert_eq!(url_from_listen("10.0.0.5:8000"), "http://10.0.0.5:8000");
        assert_eq!(normalize_url("http://h:1/v1/"), "http://h:1");
        assert_eq!(normalize_url("h:1"), "http://h:1");
    }
}
