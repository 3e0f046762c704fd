//! Test doubles: a scripted backend (deterministic output, so tool-call and reasoning parsing
//! can be checked through HTTP) and a registry; plus a loopback server helper.
#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use llmd_engine::{
    EngineError, EngineStats, FinishReason, GenerationEvent, ModelInfo, PositionLogprobs, StopMatch, TokenLogprob,
    Usage, ValidGenerateRequest,
};
use llmd_openai::{
    ApiKeys, ApiOptions, ApiState, EventStream, ModelBackend, ModelRegistry, Phase, ReasoningParser, ServedModel,
    TemplateError,
};
use parking_lot::Mutex;

/// Byte-level "tokenizer"; output is a scripted text, one byte per token.
pub struct ScriptedBackend {
    pub info: ModelInfo,
    pub script: Mutex<String>,
    pub template: Option<String>,
    pub running: Arc<AtomicUsize>,
    pub max_running: usize,
    pub token_delay: Duration,
    pub shutting_down: bool,
    pub last_request: Mutex<Option<ValidGenerateRequest>>,
    pub last_prompt: Mutex<Option<String>>,
}

pub fn info(name: &str, max_model_len: u32) -> ModelInfo {
    ModelInfo {
        served_name: name.to_string(),
        source: format!("test:{name}"),
        architecture: "Scripted".into(),
        num_params: 0,
        dtype: llmd_options::Dtype::Float32,
        backend: llmd_options::Backend::Cpu,
        max_model_len,
        vocab_size: 256,
        weight_bytes: 0,
        kv_cache_bytes: 0,
        kv_block_size: 16,
        kv_blocks_total: 64,
        loaded_at: 1_700_000_000,
    }
}

impl ScriptedBackend {
    pub fn new(name: &str, script: &str) -> Self {
        ScriptedBackend {
            info: info(name, 256),
            script: Mutex::new(script.to_string()),
            template: Some("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>".into()),
            running: Arc::new(AtomicUsize::new(0)),
            max_running: usize::MAX,
            token_delay: Duration::from_millis(1),
            shutting_down: false,
            last_request: Mutex::new(None),
            last_prompt: Mutex::new(None),
        }
    }
}

struct Gen {
    text: Vec<u8>,
    n: u32,
    choice: u32,
    pos: usize,
    max_tokens: usize,
    prompt_tokens: u32,
    produced: u32,
    logprobs: Option<u32>,
    delay: Duration,
    done: bool,
    _guard: RunningGuard,
}

struct RunningGuard(Arc<AtomicUsize>);
impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Gen {
    /// Next event: choices run one after another.
    fn next_event(&mut self) -> Option<GenerationEvent> {
        if self.done {
            return None;
        }
        if self.choice == self.n {
            self.done = true;
            return Some(GenerationEvent::Usage(Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.produced,
                cached_tokens: 0,
                queue_time: Duration::from_millis(1),
            }));
        }
        let limit = self.text.len().min(self.max_tokens);
        if self.pos < limit {
            let b = self.text[self.pos];
            // Keep UTF-8 whole: send a multi-byte char as one event.
            let len = match b {
                0..=0x7f => 1,
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                _ => 4,
            };
            let end = (self.pos + len).min(self.text.len());
            let bytes = self.text[self.pos..end].to_vec();
            self.pos = end;
            self.produced += bytes.len() as u32;
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let logprobs = match self.logprobs {
                None => Vec::new(),
                Some(k) => vec![PositionLogprobs {
                    chosen: TokenLogprob {
                        token_id: bytes[0] as u32,
                        token: text.clone(),
                        bytes: bytes.clone(),
                        logprob: -0.5,
                    },
                    top: (0..k)
                        .map(|i| TokenLogprob {
                            token_id: i,
                            token: format!("t{i}"),
                            bytes: vec![b't'],
                            logprob: -1.0 - i as f32,
                        })
                        .collect(),
                }],
            };
            return Some(GenerationEvent::Token {
                index: self.choice,
                token_ids: bytes.iter().map(|&b| b as u32).collect(),
                text,
                logprobs,
            });
        }
        let reason = if self.text.len() > self.max_tokens { FinishReason::Length } else { FinishReason::Stop };
        let ev = GenerationEvent::Finished {
            index: self.choice,
            reason,
            text: String::new(),
            stop: (reason == FinishReason::Stop).then_some(StopMatch::Eos(0)),
        };
        self.choice += 1;
        self.pos = 0;
        Some(ev)
    }
}

impl ModelBackend for ScriptedBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn stats(&self) -> EngineStats {
        let running = self.running.load(Ordering::SeqCst);
        EngineStats {
            running,
            kv_blocks_used: running,
            kv_blocks_total: 64,
            prompt_tokens: 7,
            generation_tokens: 9,
            ..Default::default()
        }
    }
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<u32>, EngineError> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn decode(&self, ids: &[u32], _skip: bool) -> Result<String, EngineError> {
        Ok(String::from_utf8_lossy(&ids.iter().map(|&i| i as u8).collect::<Vec<u8>>()).into_owned())
    }
    fn chat_template_source(&self) -> Option<String> {
        self.template.clone()
    }
    fn render_chat(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String, TemplateError> {
        if self.template.is_none() {
            return Err(TemplateError::NoTemplate(self.info.served_name.clone()));
        }
        let mut out = String::new();
        if let Some(t) = tools {
            out.push_str(&format!("<|tools|>{}\n", t.as_array().map(|a| a.len()).unwrap_or(0)));
        }
        for m in messages.as_array().into_iter().flatten() {
            let content = m["content"].as_str().unwrap_or("");
            out.push_str(&format!("<|{}|>{}\n", m["role"].as_str().unwrap_or("?"), content));
        }
        if add_generation_prompt {
            out.push_str("<|assistant|>");
            if extra.get("enable_thinking") == Some(&serde_json::Value::Bool(true)) {
                out.push_str("<think>\n");
            }
        }
        *self.last_prompt.lock() = Some(out.clone());
        Ok(out)
    }
    fn submit(&self, request: ValidGenerateRequest) -> Result<EventStream, EngineError> {
        if self.shutting_down {
            return Err(EngineError::ShuttingDown(self.info.served_name.clone()));
        }
        if self.running.load(Ordering::SeqCst) >= self.max_running {
            return Err(EngineError::QueueFull { model: self.info.served_name.clone(), max_queue: self.max_running });
        }
        self.running.fetch_add(1, Ordering::SeqCst);
        *self.last_request.lock() = Some(request.clone());
        let generator = Gen {
            text: self.script.lock().clone().into_bytes(),
            n: request.n(),
            choice: 0,
            pos: 0,
            max_tokens: request.sampling().max_tokens as usize,
            prompt_tokens: request.prompt_tokens().len() as u32,
            produced: 0,
            logprobs: request.sampling().logprobs,
            delay: self.token_delay,
            done: false,
            _guard: RunningGuard(self.running.clone()),
        };
        Ok(Box::pin(futures::stream::unfold(generator, |mut g| async move {
            tokio::time::sleep(g.delay).await;
            g.next_event().map(|e| (e, g))
        })))
    }
}

/// A fixed set of models.
pub struct Registry {
    pub models: Mutex<Vec<ServedModel>>,
    pub phase: Mutex<Phase>,
}

impl Registry {
    pub fn new(models: Vec<ServedModel>) -> Arc<Self> {
        Arc::new(Registry { models: Mutex::new(models), phase: Mutex::new(Phase::Ready) })
    }
}

impl ModelRegistry for Registry {
    fn get(&self, name: &str) -> Option<ServedModel> {
        self.models.lock().iter().find(|m| m.name() == name).cloned()
    }
    fn list(&self) -> Vec<ServedModel> {
        self.models.lock().clone()
    }
    fn phase(&self) -> Phase {
        *self.phase.lock()
    }
}

pub fn served(b: ScriptedBackend, parser: Option<ReasoningParser>) -> (ServedModel, Arc<ScriptedBackend>) {
    let b = Arc::new(b);
    (ServedModel::new(b.clone(), parser), b)
}

/// Serves `router(state)` on a loopback port; returns the base URL.
pub async fn serve(state: ApiState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, llmd_openai::router(state)).await.unwrap();
    });
    format!("http://{addr}")
}

pub fn state(registry: Arc<Registry>, keys: &[&str], options: ApiOptions) -> ApiState {
    ApiState::new(registry, ApiKeys::new(keys.iter().copied()), options)
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| ev.lines().find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:"))))
        .map(str::to_string)
        .collect()
}

/// Replaces volatile fields (ids, timestamps) so JSON can be snapshotted.
pub fn redact(mut v: serde_json::Value) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, val) in m.iter_mut() {
                    match k.as_str() {
                        "id" if val.is_string() => *val = "[id]".into(),
                        "created" => *val = "[created]".into(),
                        _ => walk(val),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}
