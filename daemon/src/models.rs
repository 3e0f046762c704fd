//! The model manager: one actor task owns the table of loaded models; everything else holds a
//! cheap [`ModelManager`] handle and talks to it through a channel.
//!
//! The actor is also the only writer of the served-model table the HTTP API routes by. After
//! every command it publishes a snapshot ([`ServedTable`], through a `watch` channel) that holds
//! exactly the models whose load finished and whose unload has not begun: a model being
//! unloaded leaves the table before its engine starts draining, so it takes no new requests
//! while the ones in flight finish; a load that failed or was cancelled is never in it.
//!
//! Loading and unloading run on blocking threads so the actor keeps answering (`ps`, the
//! watchdog's liveness question) while a model of many gigabytes is read. The engine is
//! reached only through [`ModelLoader`] and [`LoadedModel`], so the manager is tested here
//! with a fake engine and the real one (`llmd_engine::EngineHandle`) plugs in unchanged.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use llmd_openai::ServedModel;
use llmd_options::ReasoningParser;
use llmd_proto::{ControlError, ErrorCode, LoadParams, Progress, RunningModel};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::EngineConfig;

/// A model the engine serves. Implemented over `llmd_engine::EngineHandle`.
pub trait LoadedModel: Send + Sync + 'static {
    /// What `llmctl ps` shows (static facts plus live queue and KV numbers).
    fn describe(&self) -> RunningModel;
    /// The model as the HTTP API serves it. Built once at load: clones share one backend.
    fn served(&self) -> ServedModel;
    /// When the engine loop last went round; a stale value stops the systemd watchdog pings.
    fn last_heartbeat(&self) -> Instant;
    /// Drains in-flight requests for up to `drain`, then stops the engine thread. Blocking.
    fn shutdown(&self, drain: Duration);
}

/// Everything a loader needs to bring one model up.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// The request as the client (or `[[models]]`) gave it, with `name` filled in.
    pub params: LoadParams,
    pub served_name: String,
    /// The model folder (a hub source is resolved to its snapshot folder first).
    pub path: PathBuf,
    /// Engine defaults from `[engine]`.
    pub engine: EngineConfig,
    pub reasoning_parser: Option<ReasoningParser>,
}

/// Brings models up. Blocking; called on a blocking thread. `progress` may be called any
/// number of times; `cancelled` turns true when a client cancels the load.
pub trait ModelLoader: Send + Sync + 'static {
    fn load(
        &self,
        request: &LoadRequest,
        progress: &mut dyn FnMut(Progress),
        cancelled: &AtomicBool,
    ) -> Result<Arc<dyn LoadedModel>, ControlError>;
}

/// The loader used while no inference engine is linked into the daemon: every load fails
/// with a clear `unavailable` error instead of pretending.
#[derive(Debug, Default)]
pub struct NoEngine;

impl ModelLoader for NoEngine {
    fn load(
        &self,
        request: &LoadRequest,
        _: &mut dyn FnMut(Progress),
        _: &AtomicBool,
    ) -> Result<Arc<dyn LoadedModel>, ControlError> {
        Err(ControlError::new(
            ErrorCode::Unavailable,
            format!(
                "cannot load `{}`: the inference engine (llmd-engine) is not linked into this llmd build",
                request.served_name
            ),
        ))
    }
}

/// Where progress of a long step goes: the caller's progress frames and the D-Bus signal.
pub type ProgressSink = Arc<dyn Fn(Progress) + Send + Sync>;

/// Turns a `source` into a model folder. Hub ids need the model store, which may pull them
/// first (reporting to `progress`), so resolution is asynchronous and runs off the actor.
pub trait SourceResolver: Send + Sync + 'static {
    fn resolve(&self, params: &LoadParams, progress: ProgressSink)
    -> BoxFuture<'static, Result<PathBuf, ControlError>>;
}

/// Resolves local folders only; hub ids get `unavailable` naming the missing store.
#[derive(Debug, Default)]
pub struct LocalOnly;

impl SourceResolver for LocalOnly {
    fn resolve(&self, params: &LoadParams, _: ProgressSink) -> BoxFuture<'static, Result<PathBuf, ControlError>> {
        Box::pin(std::future::ready(LocalOnly::resolve_now(params)))
    }
}

impl LocalOnly {
    fn resolve_now(params: &LoadParams) -> Result<PathBuf, ControlError> {
        let path = PathBuf::from(&params.source);
        if path.is_dir() {
            return Ok(path);
        }
        let looks_local = params.source.starts_with('/') || params.source.starts_with('.');
        if looks_local || path.exists() {
            return Err(ControlError::new(
                ErrorCode::NotFound,
                format!("model folder `{}` does not exist or is not a folder", params.source),
            ));
        }
        Err(ControlError::new(
            ErrorCode::Unavailable,
            format!(
                "`{}` is a hub id, but the model store (llmd-store) is not linked into this llmd build; give a local folder",
                params.source
            ),
        ))
    }
}

/// The served models by name, as the model manager last published them (see the module doc).
pub type ServedTable = Arc<HashMap<String, ServedModel>>;

/// What the manager announces (D-Bus signals follow these).
#[derive(Debug, Clone)]
pub enum ModelEvent {
    Loaded(String),
    Unloaded(String),
    Progress(Progress),
}

enum Slot {
    Loading { operation: String, cancelled: Arc<AtomicBool> },
    Loaded(Arc<dyn LoadedModel>),
    Unloading,
}

type Reply<T> = oneshot::Sender<Result<T, ControlError>>;

enum Command {
    Load {
        params: LoadParams,
        reasoning_parser: Option<ReasoningParser>,
        progress: Option<mpsc::UnboundedSender<Progress>>,
        reply: Reply<RunningModel>,
    },
    LoadDone {
        name: String,
        result: Result<Arc<dyn LoadedModel>, ControlError>,
        cancelled: Arc<AtomicBool>,
        reply: Reply<RunningModel>,
    },
    Unload {
        name: String,
        reply: Reply<()>,
    },
    UnloadDone {
        name: String,
        reply: Reply<()>,
    },
    Ps {
        reply: oneshot::Sender<Vec<RunningModel>>,
    },
    Heartbeats {
        reply: oneshot::Sender<Vec<(String, Instant)>>,
    },
    Cancel {
        operation: String,
        reply: Reply<()>,
    },
    ShutdownAll {
        drain: Duration,
        reply: oneshot::Sender<()>,
    },
}

/// Handle to the model manager actor.
#[derive(Clone)]
pub struct ModelManager {
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<ModelEvent>,
    served: watch::Receiver<ServedTable>,
}

impl std::fmt::Debug for ModelManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelManager")
    }
}

struct Actor {
    slots: HashMap<String, Slot>,
    loader: Arc<dyn ModelLoader>,
    resolver: Arc<dyn SourceResolver>,
    engine: EngineConfig,
    drain: Duration,
    tx: mpsc::Sender<Command>,
    events: broadcast::Sender<ModelEvent>,
    /// The served-model table; written here only, by [`Actor::publish`].
    published: watch::Sender<ServedTable>,
    next_op: AtomicU64,
}

fn gone() -> ControlError {
    ControlError::new(ErrorCode::Unavailable, "the model manager has stopped (daemon shutting down)")
}

impl ModelManager {
    /// Starts the actor. `drain` is how long an unload lets in-flight requests finish.
    pub fn spawn(
        loader: Arc<dyn ModelLoader>,
        resolver: Arc<dyn SourceResolver>,
        engine: EngineConfig,
        drain: Duration,
    ) -> ModelManager {
        let (tx, rx) = mpsc::channel(256);
        let (events, _) = broadcast::channel(256);
        let (published, served) = watch::channel(ServedTable::default());
        let actor = Actor {
            slots: HashMap::new(),
            loader,
            resolver,
            engine,
            drain,
            tx: tx.clone(),
            events: events.clone(),
            published,
            next_op: AtomicU64::new(1),
        };
        tokio::spawn(actor.run(rx));
        ModelManager { tx, events, served }
    }

    /// The served-model table the HTTP API routes by: read it with `borrow()`; it changes when
    /// a load finishes, an unload starts or the daemon shuts down.
    pub fn served(&self) -> watch::Receiver<ServedTable> {
        self.served.clone()
    }

    /// Events for D-Bus signals.
    pub fn subscribe(&self) -> broadcast::Receiver<ModelEvent> {
        self.events.subscribe()
    }

    /// Announces progress of an operation the manager does not run itself (a pull), so that
    /// D-Bus subscribers see it like load progress.
    pub fn announce(&self, progress: Progress) {
        let _ = self.events.send(ModelEvent::Progress(progress));
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    /// Loads a model; progress events go to `progress` (and to subscribers).
    pub async fn load(
        &self,
        params: LoadParams,
        reasoning_parser: Option<ReasoningParser>,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<RunningModel, ControlError> {
        self.ask(|reply| Command::Load { params, reasoning_parser, progress, reply })
            .await
            .unwrap_or_else(|| Err(gone()))
    }

    pub async fn unload(&self, name: String) -> Result<(), ControlError> {
        self.ask(|reply| Command::Unload { name, reply }).await.unwrap_or_else(|| Err(gone()))
    }

    pub async fn ps(&self) -> Result<Vec<RunningModel>, ControlError> {
        self.ask(|reply| Command::Ps { reply }).await.ok_or_else(gone)
    }

    /// Last engine-loop heartbeat of every loaded model; `None` when the actor does not answer.
    pub async fn heartbeats(&self) -> Option<Vec<(String, Instant)>> {
        self.ask(|reply| Command::Heartbeats { reply }).await
    }

    pub async fn cancel(&self, operation: String) -> Result<(), ControlError> {
        self.ask(|reply| Command::Cancel { operation, reply }).await.unwrap_or_else(|| Err(gone()))
    }

    /// Unloads everything, each model draining for up to the configured time (in parallel).
    pub async fn shutdown_all(&self, drain: Duration) {
        let _ = self.ask(|reply| Command::ShutdownAll { drain, reply }).await;
    }
}

/// Waits for `resolve` unless the load is cancelled meanwhile. A pull the resolution started
/// keeps running in the store (and can be resumed or cancelled by its own operation id).
async fn resolve_unless_cancelled(
    resolve: BoxFuture<'static, Result<PathBuf, ControlError>>,
    cancelled: &AtomicBool,
    name: &str,
) -> Result<PathBuf, ControlError> {
    tokio::pin!(resolve);
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = &mut resolve => return r,
            _ = poll.tick() => {
                if cancelled.load(Ordering::SeqCst) {
                    return Err(ControlError::new(ErrorCode::Cancelled, format!("loading `{name}` was cancelled")));
                }
            }
        }
    }
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            self.handle(cmd);
            self.publish();
        }
    }

    /// Publishes the served-model table if it changed: the models in [`Slot::Loaded`], nothing
    /// else. Called after every command, so no change of a slot can be missed, and before an
    /// engine is told to drain, so that the HTTP API has stopped routing to it by then.
    fn publish(&self) {
        let loaded = || {
            self.slots.iter().filter_map(|(name, slot)| match slot {
                Slot::Loaded(m) => Some((name, m)),
                _ => None,
            })
        };
        self.published.send_if_modified(|table| {
            let same = table.len() == loaded().count()
                && loaded()
                    .all(|(name, m)| table.get(name).is_some_and(|t| Arc::ptr_eq(&t.backend, &m.served().backend)));
            if !same {
                *table = Arc::new(loaded().map(|(name, m)| (name.clone(), m.served())).collect());
            }
            !same
        });
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Load { params, reasoning_parser, progress, reply } => {
                self.start_load(params, reasoning_parser, progress, reply)
            }
            Command::LoadDone { name, result, cancelled, reply } => self.finish_load(name, result, cancelled, reply),
            Command::Unload { name, reply } => self.start_unload(name, reply),
            Command::UnloadDone { name, reply } => {
                self.slots.remove(&name);
                tracing::info!(model = %name, "model unloaded");
                let _ = self.events.send(ModelEvent::Unloaded(name));
                let _ = reply.send(Ok(()));
            }
            Command::Ps { reply } => {
                let mut list: Vec<RunningModel> = self
                    .slots
                    .values()
                    .filter_map(|s| match s {
                        Slot::Loaded(m) => Some(m.describe()),
                        _ => None,
                    })
                    .collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(list);
            }
            Command::Heartbeats { reply } => {
                let beats = self
                    .slots
                    .iter()
                    .filter_map(|(n, s)| match s {
                        Slot::Loaded(m) => Some((n.clone(), m.last_heartbeat())),
                        _ => None,
                    })
                    .collect();
                let _ = reply.send(beats);
            }
            Command::Cancel { operation, reply } => {
                let found = self.slots.values().find_map(|s| match s {
                    Slot::Loading { operation: op, cancelled } if *op == operation => Some(cancelled.clone()),
                    _ => None,
                });
                let _ = reply.send(match found {
                    Some(flag) => {
                        flag.store(true, Ordering::SeqCst);
                        Ok(())
                    }
                    None => Err(ControlError::new(ErrorCode::NotFound, format!("no running operation `{operation}`"))),
                });
            }
            Command::ShutdownAll { drain, reply } => {
                let loaded: Vec<(String, Arc<dyn LoadedModel>)> = self
                    .slots
                    .drain()
                    .filter_map(|(n, s)| match s {
                        Slot::Loaded(m) => Some((n, m)),
                        Slot::Loading { cancelled, .. } => {
                            cancelled.store(true, Ordering::SeqCst);
                            None
                        }
                        Slot::Unloading => None,
                    })
                    .collect();
                // Out of the HTTP API's table before any engine starts draining.
                self.publish();
                let tasks: Vec<_> = loaded
                    .into_iter()
                    .map(|(name, m)| {
                        tokio::task::spawn_blocking(move || {
                            m.shutdown(drain);
                            tracing::info!(model = %name, "model stopped");
                        })
                    })
                    .collect();
                tokio::spawn(async move {
                    for t in tasks {
                        let _ = t.await;
                    }
                    let _ = reply.send(());
                });
            }
        }
    }

    fn start_load(
        &mut self,
        mut params: LoadParams,
        reasoning_parser: Option<ReasoningParser>,
        progress: Option<mpsc::UnboundedSender<Progress>>,
        reply: Reply<RunningModel>,
    ) {
        let name = params.name.clone().unwrap_or_else(|| crate::config::default_served_name(&params.source));
        if name.trim().is_empty() {
            let _ = reply.send(Err(ControlError::new(ErrorCode::InvalidArgument, "`name` must not be empty")));
            return;
        }
        if let Some(slot) = self.slots.get(&name) {
            let what = match slot {
                Slot::Loading { .. } => "is being loaded",
                Slot::Loaded(_) => "is already loaded",
                Slot::Unloading => "is being unloaded",
            };
            let _ = reply.send(Err(ControlError::new(
                ErrorCode::Conflict,
                format!("model `{name}` {what}; unload it first or choose another --name"),
            )));
            return;
        }
        if let Some(tp) = params.tp
            && (tp == 0 || tp > 64)
        {
            let _ = reply.send(Err(ControlError::new(
                ErrorCode::InvalidArgument,
                format!("`tp` = {tp} must be between 1 and 64"),
            )));
            return;
        }
        params.name = Some(name.clone());
        let operation = format!("load-{}", self.next_op.fetch_add(1, Ordering::Relaxed));
        let cancelled = Arc::new(AtomicBool::new(false));
        self.slots.insert(name.clone(), Slot::Loading { operation: operation.clone(), cancelled: cancelled.clone() });
        let resolver = self.resolver.clone();
        let loader = self.loader.clone();
        let engine = self.engine.clone();
        let tx = self.tx.clone();
        let events = self.events.clone();
        // Pull progress keeps the pull's own operation id (it is cancelled through the store).
        let sink: ProgressSink = {
            let progress = progress.clone();
            let events = events.clone();
            Arc::new(move |p: Progress| {
                if let Some(tx) = &progress {
                    let _ = tx.send(p.clone());
                }
                let _ = events.send(ModelEvent::Progress(p));
            })
        };
        tokio::spawn(async move {
            let resolved = resolve_unless_cancelled(resolver.resolve(&params, sink), &cancelled, &name).await;
            let path = match resolved {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Command::LoadDone { name, result: Err(e), cancelled, reply }).await;
                    return;
                }
            };
            let request = LoadRequest { params, served_name: name.clone(), path, engine, reasoning_parser };
            tracing::info!(model = %name, operation = %operation, path = %request.path.display(), "loading model");
            let _ = tokio::task::spawn_blocking(move || {
                let mut on_progress = |mut p: Progress| {
                    p.operation = operation.clone();
                    if let Some(tx) = &progress {
                        let _ = tx.send(p.clone());
                    }
                    let _ = events.send(ModelEvent::Progress(p));
                };
                let result = loader.load(&request, &mut on_progress, &cancelled);
                let _ = tx.blocking_send(Command::LoadDone { name, result, cancelled, reply });
            })
            .await;
        });
    }

    fn finish_load(
        &mut self,
        name: String,
        result: Result<Arc<dyn LoadedModel>, ControlError>,
        cancelled: Arc<AtomicBool>,
        reply: Reply<RunningModel>,
    ) {
        let still_wanted = matches!(self.slots.get(&name), Some(Slot::Loading { .. }));
        match result {
            Ok(model) if cancelled.load(Ordering::SeqCst) || !still_wanted => {
                self.slots.remove(&name);
                let drain = self.drain;
                tokio::task::spawn_blocking(move || model.shutdown(drain));
                tracing::info!(model = %name, "load cancelled");
                let _ =
                    reply.send(Err(ControlError::new(ErrorCode::Cancelled, format!("loading `{name}` was cancelled"))));
            }
            Ok(model) => {
                let described = model.describe();
                self.slots.insert(name.clone(), Slot::Loaded(model));
                tracing::info!(model = %name, "model loaded");
                let _ = self.events.send(ModelEvent::Loaded(name));
                let _ = reply.send(Ok(described));
            }
            Err(e) => {
                self.slots.remove(&name);
                tracing::warn!(model = %name, error = %e, "model load failed");
                let _ = reply.send(Err(e));
            }
        }
    }

    fn start_unload(&mut self, name: String, reply: Reply<()>) {
        match self.slots.get(&name) {
            Some(Slot::Loaded(_)) => {}
            Some(Slot::Loading { .. }) => {
                let _ = reply.send(Err(ControlError::new(
                    ErrorCode::Conflict,
                    format!("model `{name}` is still loading; cancel the load instead"),
                )));
                return;
            }
            Some(Slot::Unloading) => {
                let _ = reply.send(Err(ControlError::new(
                    ErrorCode::Conflict,
                    format!("model `{name}` is already being unloaded"),
                )));
                return;
            }
            None => {
                let _ =
                    reply.send(Err(ControlError::new(ErrorCode::NotFound, format!("no loaded model named `{name}`"))));
                return;
            }
        }
        let Some(Slot::Loaded(model)) = self.slots.insert(name.clone(), Slot::Unloading) else {
            return;
        };
        // Unpublished before the drain starts: no new requests reach it, in-flight ones finish.
        self.publish();
        let drain = self.drain;
        let tx = self.tx.clone();
        tracing::info!(model = %name, "unloading model (draining in-flight requests)");
        tokio::task::spawn_blocking(move || {
            model.shutdown(drain);
            let _ = tx.blocking_send(Command::UnloadDone { name, reply });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};

    use llmd_engine::{EngineError, EngineStats, ModelInfo, ValidGenerateRequest};
    use llmd_openai::{EventStream, ModelBackend, TemplateError};

    /// What the HTTP layer would reach: only `info` is asked for by the manager's table.
    struct FakeBackend(ModelInfo);

    impl ModelBackend for FakeBackend {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn stats(&self) -> EngineStats {
            EngineStats::default()
        }
        fn encode(&self, text: &str, _: bool) -> Result<Vec<u32>, EngineError> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn decode(&self, ids: &[u32], _: bool) -> Result<String, EngineError> {
            Ok(ids.iter().filter_map(|&i| char::from_u32(i)).collect())
        }
        fn chat_template_source(&self) -> Option<String> {
            None
        }
        fn render_chat(
            &self,
            _: &serde_json::Value,
            _: Option<&serde_json::Value>,
            _: bool,
            _: &serde_json::Value,
        ) -> Result<String, TemplateError> {
            Err(TemplateError::NoTemplate(self.0.served_name.clone()))
        }
        fn submit(&self, _: ValidGenerateRequest) -> Result<EventStream, EngineError> {
            Err(EngineError::ShuttingDown(self.0.served_name.clone()))
        }
    }

    fn served(name: &str) -> ServedModel {
        let info = ModelInfo {
            served_name: name.into(),
            source: "/fake".into(),
            architecture: "FakeForCausalLM".into(),
            num_params: 1,
            dtype: llmd_options::Dtype::Float32,
            backend: llmd_options::Backend::Cpu,
            max_model_len: 16,
            vocab_size: 256,
            weight_bytes: 4,
            kv_cache_bytes: 0,
            kv_block_size: 16,
            kv_blocks_total: 1,
            loaded_at: 0,
        };
        ServedModel::new(Arc::new(FakeBackend(info)), Some(ReasoningParser::None))
    }

    /// A door a blocking fake waits at until the test opens it.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        opened: Condvar,
        reached: AtomicBool,
    }

    impl Gate {
        fn wait(&self) {
            self.reached.store(true, Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        fn open(&self) {
            *self.open.lock().unwrap() = true;
            self.opened.notify_all();
        }
        async fn reached(&self) {
            while !self.reached.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    struct FakeModel {
        name: String,
        served: ServedModel,
        beat: Mutex<Instant>,
        stopped: Arc<AtomicBool>,
        drain_gate: Option<Arc<Gate>>,
    }

    impl LoadedModel for FakeModel {
        fn describe(&self) -> RunningModel {
            RunningModel {
                name: self.name.clone(),
                source: "/fake".into(),
                architecture: "FakeForCausalLM".into(),
                params: 1,
                dtype: llmd_options::Dtype::Float32,
                device: llmd_options::Backend::Cpu,
                tp: 1,
                gpus: vec![],
                max_model_len: 16,
                weight_bytes: 4,
                kv_cache_bytes: 0,
                kv_block_size: 16,
                kv_blocks_total: 1,
                kv_blocks_used: 0,
                running: 0,
                waiting: 0,
                loaded_at: 0,
            }
        }
        fn served(&self) -> ServedModel {
            self.served.clone()
        }
        fn last_heartbeat(&self) -> Instant {
            *self.beat.lock().unwrap()
        }
        fn shutdown(&self, _: Duration) {
            if let Some(gate) = &self.drain_gate {
                gate.wait();
            }
            self.stopped.store(true, Ordering::SeqCst);
        }
    }

    #[derive(Default)]
    struct FakeLoader {
        stopped: Arc<AtomicBool>,
        /// Loads wait here before they finish.
        load_gate: Option<Arc<Gate>>,
        /// Unloads of the models it made wait here before they finish draining.
        drain_gate: Option<Arc<Gate>>,
    }

    impl ModelLoader for FakeLoader {
        fn load(
            &self,
            r: &LoadRequest,
            progress: &mut dyn FnMut(Progress),
            _: &AtomicBool,
        ) -> Result<Arc<dyn LoadedModel>, ControlError> {
            progress(Progress {
                operation: String::new(),
                model: r.served_name.clone(),
                phase: "loading weights".into(),
                done: 1,
                total: Some(1),
                unit: llmd_proto::ProgressUnit::Tensors,
                rate: 0.0,
                eta_secs: None,
                files: vec![],
            });
            if let Some(gate) = &self.load_gate {
                gate.wait();
            }
            if r.served_name.starts_with("broken") {
                return Err(ControlError::new(ErrorCode::Failed, format!("cannot load `{}`: broken", r.served_name)));
            }
            Ok(Arc::new(FakeModel {
                name: r.served_name.clone(),
                served: served(&r.served_name),
                beat: Mutex::new(Instant::now()),
                stopped: self.stopped.clone(),
                drain_gate: self.drain_gate.clone(),
            }))
        }
    }

    fn manager(stopped: Arc<AtomicBool>) -> ModelManager {
        manager_with(FakeLoader { stopped, ..FakeLoader::default() })
    }

    fn manager_with(loader: FakeLoader) -> ModelManager {
        ModelManager::spawn(Arc::new(loader), Arc::new(LocalOnly), EngineConfig::default(), Duration::from_secs(1))
    }

    #[tokio::test]
    async fn load_ps_unload() {
        let dir = tempfile::tempdir().unwrap();
        let stopped = Arc::new(AtomicBool::new(false));
        let m = manager(stopped.clone());
        let mut events = m.subscribe();
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let params =
            LoadParams { source: dir.path().display().to_string(), name: Some("tiny".into()), ..Default::default() };
        let loaded = m.load(params.clone(), None, Some(ptx)).await.unwrap();
        assert_eq!(loaded.name, "tiny");
        let p = prx.recv().await.unwrap();
        assert!(p.operation.starts_with("load-"), "{p:?}");
        assert_eq!(m.ps().await.unwrap().len(), 1);
        assert_eq!(m.heartbeats().await.unwrap().len(), 1);

        let err = m.load(params, None, None).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Conflict);

        m.unload("tiny".into()).await.unwrap();
        assert!(stopped.load(Ordering::SeqCst));
        assert!(m.ps().await.unwrap().is_empty());
        assert_eq!(m.unload("tiny".into()).await.unwrap_err().code, ErrorCode::NotFound);

        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(match e {
                ModelEvent::Loaded(n) => format!("loaded {n}"),
                ModelEvent::Unloaded(n) => format!("unloaded {n}"),
                ModelEvent::Progress(_) => "progress".into(),
            });
        }
        assert_eq!(seen, ["progress", "loaded tiny", "unloaded tiny"]);
    }

    #[tokio::test]
    async fn bad_sources_are_typed_errors() {
        let m = manager(Arc::new(AtomicBool::new(false)));
        let e = m
            .load(LoadParams { source: "/does/not/exist".into(), ..Default::default() }, None, None)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        let e = m
            .load(LoadParams { source: "hf:Qwen/Qwen3-0.6B".into(), ..Default::default() }, None, None)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("llmd-store"), "{}", e.message);
        assert_eq!(m.cancel("load-99".into()).await.unwrap_err().code, ErrorCode::NotFound);
    }

    #[tokio::test]
    async fn no_engine_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let m = ModelManager::spawn(
            Arc::new(NoEngine),
            Arc::new(LocalOnly),
            EngineConfig::default(),
            Duration::from_secs(1),
        );
        let e = m
            .load(LoadParams { source: dir.path().display().to_string(), ..Default::default() }, None, None)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(e.message.contains("llmd-engine"));
        assert!(m.ps().await.unwrap().is_empty());
    }

    fn names(table: &ServedTable) -> Vec<String> {
        let mut v: Vec<String> = table.keys().cloned().collect();
        v.sort();
        v
    }

    fn local(dir: &tempfile::TempDir, name: &str) -> LoadParams {
        LoadParams { source: dir.path().display().to_string(), name: Some(name.into()), ..Default::default() }
    }

    /// The published table holds the loaded models and nothing else: a loading model is not in
    /// it, a failed load never gets in, an unloading model is out before its drain starts.
    #[tokio::test]
    async fn the_served_table_follows_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let (load_gate, drain_gate) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
        let m = manager_with(FakeLoader {
            load_gate: Some(load_gate.clone()),
            drain_gate: Some(drain_gate.clone()),
            ..FakeLoader::default()
        });
        let mut served = m.served();
        assert!(served.borrow_and_update().is_empty());

        // Loading: not served until the load is done.
        let loading = tokio::spawn({
            let m = m.clone();
            let p = local(&dir, "tiny");
            async move { m.load(p, None, None).await }
        });
        load_gate.reached().await;
        assert!(m.ps().await.unwrap().is_empty());
        assert!(!served.has_changed().unwrap(), "published while loading: {:?}", names(&served.borrow()));
        load_gate.open();
        loading.await.unwrap().unwrap();
        assert!(served.has_changed().unwrap());
        let table = served.borrow_and_update().clone();
        assert_eq!(names(&table), ["tiny"]);
        assert_eq!(table["tiny"].name(), "tiny");

        // A failed load changes nothing.
        let e = m.load(local(&dir, "broken"), None, None).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Failed);
        assert!(!served.has_changed().unwrap());
        // Nor does a command that changes no slot.
        assert_eq!(m.ps().await.unwrap().len(), 1);
        assert!(!served.has_changed().unwrap());

        // Unloading: out of the table while the engine still drains.
        let unloading = tokio::spawn({
            let m = m.clone();
            async move { m.unload("tiny".into()).await }
        });
        drain_gate.reached().await;
        assert!(served.borrow_and_update().is_empty(), "still served while draining");
        assert!(!unloading.is_finished());
        drain_gate.open();
        unloading.await.unwrap().unwrap();
        assert!(served.borrow().is_empty());
    }

    /// A load cancelled while the engine loads is stopped, never published.
    #[tokio::test]
    async fn a_cancelled_load_is_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let stopped = Arc::new(AtomicBool::new(false));
        let m = manager_with(FakeLoader {
            stopped: stopped.clone(),
            load_gate: Some(gate.clone()),
            ..FakeLoader::default()
        });
        let mut served = m.served();
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let loading = tokio::spawn({
            let m = m.clone();
            let p = local(&dir, "tiny");
            async move { m.load(p, None, Some(ptx)).await }
        });
        // The fake reports progress (with the load's operation id), then waits at the gate.
        let operation = prx.recv().await.unwrap().operation;
        gate.reached().await;
        m.cancel(operation).await.unwrap();
        gate.open();
        let e = loading.await.unwrap().unwrap_err();
        assert_eq!(e.code, ErrorCode::Cancelled, "{e:?}");
        // The cancelled model is stopped on a blocking thread.
        for _ in 0..200 {
            if stopped.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(stopped.load(Ordering::SeqCst));
        assert!(!served.has_changed().unwrap());
        assert!(served.borrow_and_update().is_empty());
    }

    /// Shutting down empties the table before the engines drain.
    #[tokio::test]
    async fn shutdown_unpublishes_everything_first() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let m = manager_with(FakeLoader { drain_gate: Some(gate.clone()), ..FakeLoader::default() });
        m.load(local(&dir, "a"), None, None).await.unwrap();
        m.load(local(&dir, "b"), None, None).await.unwrap();
        let mut served = m.served();
        assert_eq!(names(&served.borrow_and_update()), ["a", "b"]);
        let stopping = tokio::spawn({
            let m = m.clone();
            async move { m.shutdown_all(Duration::from_secs(1)).await }
        });
        gate.reached().await;
        assert!(served.borrow_and_update().is_empty());
        gate.open();
        stopping.await.unwrap();
    }
}
