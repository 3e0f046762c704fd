//! The daemon's life cycle: bind everything, load the configured models, report ready, serve,
//! reload on SIGHUP, drain and exit on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use llmd_proto::{ControlError, DaemonState};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::auth::Authorizer;
use crate::config::{ConfigSource, DbusBus, Settings};
use crate::control::{Dispatcher, Shared};
use crate::env::Env;
use crate::logging::LogHandle;
use crate::models::{ModelLoader, ModelManager, NoEngine};
use crate::socket::{self, SocketError};
use crate::store::StoreResolver;
use crate::{dbus, http, notify};
use llmd_telemetry::Telemetry;

/// How much more start time each `EXTEND_TIMEOUT_USEC=` asks for while a model loads.
const LOAD_EXTENSION: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on server.listen = {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error(transparent)]
    Dbus(#[from] Box<dbus::DbusSetupError>),
    #[error("cannot load model `{name}` listed in [[models]]: {source}")]
    ModelLoad {
        name: String,
        #[source]
        source: ControlError,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot set up the model store ([storage]): {0}")]
    Store(#[source] llmd_store::StoreError),
}

/// What [`run`] needs.
pub struct Options {
    pub settings: Settings,
    /// Where the settings came from, re-read on SIGHUP.
    pub source: ConfigSource,
    pub env: Env,
    pub log: LogHandle,
    /// The engine; [`NoEngine`] refuses every load (for tests of the daemon without models).
    pub loader: Arc<dyn ModelLoader>,
    /// GPU telemetry, started once per process before any other thread.
    pub telemetry: Arc<Telemetry>,
}

impl Options {
    pub fn new(settings: Settings, source: ConfigSource, env: Env, log: LogHandle) -> Options {
        Options {
            settings,
            source,
            env,
            log,
            loader: Arc::new(NoEngine),
            telemetry: Arc::new(Telemetry::unavailable("GPU telemetry is not started")),
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

enum Wake {
    Stop(&'static str),
    Reload,
}

impl Signals {
    fn install() -> Result<Signals, DaemonError> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(DaemonError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?,
            hup: signal(SignalKind::hangup()).map_err(DaemonError::Signals)?,
        })
    }

    async fn next(&mut self) -> Wake {
        tokio::select! {
            _ = self.term.recv() => Wake::Stop("SIGTERM"),
            _ = self.int.recv() => Wake::Stop("SIGINT"),
            _ = self.hup.recv() => Wake::Reload,
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. Returns after a clean shutdown.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let Options { settings, source, env, log, loader, telemetry } = opts;
    for note in &settings.notes {
        tracing::info!("{note}");
    }
    let cfg = settings.config.clone();
    let dev = settings.dev;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), dev, log_target = log.target, "llmd starting");
    let mut signals = Signals::install()?;

    notify::status("binding the HTTP listener");
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|source| DaemonError::HttpBind { addr: cfg.server.listen, source })?;
    let http_addr = listener.local_addr().unwrap_or(cfg.server.listen);
    let store = crate::store::open(&settings).map_err(DaemonError::Store)?;
    tracing::info!(
        models_dir = %cfg.storage.models_dir.display(),
        hf_endpoint = %cfg.storage.hf_endpoint,
        offline = cfg.storage.offline,
        hf_token = settings.hf_token.is_some(),
        "model store ready"
    );
    let shared = Arc::new(Shared::new(settings, http_addr));

    let drain = Duration::from_secs(cfg.server.shutdown_timeout_secs);
    let resolver =
        Arc::new(StoreResolver { store: store.clone(), engine: cfg.engine.clone(), telemetry: telemetry.clone() });
    let models = ModelManager::spawn(loader, resolver, cfg.engine.clone(), drain);
    let group = socket::resolve_group(&cfg.control.group, dev)?;
    if let Some(note) = &group.fallback_note {
        tracing::warn!("{note}");
    }
    let authz = Arc::new(Authorizer {
        daemon_uid: nix::unistd::getuid().as_raw(),
        group_gid: group.gid,
        group_name: cfg.control.group.clone(),
    });
    let dispatcher =
        Dispatcher { shared: shared.clone(), models: models.clone(), authz, store, telemetry: telemetry.clone() };

    let (stop_tx, stop_rx) = watch::channel(false);
    // The HTTP API routes by the table the model manager publishes.
    let app = http::router(shared.clone(), models.served(), telemetry.clone());
    let http_task = tokio::spawn(http::serve(listener, app, stop_rx.clone()));
    tracing::info!(listen = %http_addr, "HTTP listener bound");

    notify::status("binding the control socket");
    let bound = Arc::new(socket::bind(&cfg.control.socket, &group)?);
    let socket_path = bound.path.clone();
    tracing::info!(socket = %socket_path.display(), group = %cfg.control.group, "control socket bound (mode 0660)");
    let limits = socket::Limits {
        max_connections: cfg.control.max_connections as usize,
        idle_timeout: Duration::from_secs(cfg.control.idle_timeout_secs),
    };
    let socket_task = tokio::spawn(socket::serve(bound.clone(), dispatcher.clone(), limits, stop_rx.clone()));
    drop(bound);

    let mut dbus_conn = None;
    if cfg.control.dbus != DbusBus::Off {
        notify::status("owning the D-Bus name");
        let address = match cfg.control.dbus {
            DbusBus::Session => env.dbus_session_bus_address.as_deref(),
            _ => env.dbus_system_bus_address.as_deref(),
        };
        let no_session_bus = cfg.control.dbus == DbusBus::Session && address.is_none();
        match dbus::start(cfg.control.dbus, address, dispatcher.clone()).await {
            Ok(conn) => {
                tracing::info!(bus = cfg.control.dbus.as_str(), name = llmd_proto::dbus::BUS_NAME, "D-Bus name owned");
                dbus_conn = Some(conn);
            }
            Err(e) if dev || no_session_bus => {
                tracing::warn!("D-Bus is off: {e}");
                *shared.dbus.write().unwrap_or_else(|e| e.into_inner()) = "off".into();
            }
            Err(e) => {
                let _ = stop_tx.send(true);
                let _ = socket_task.await;
                return Err(Box::new(e).into());
            }
        }
    } else {
        tracing::info!("D-Bus is off (control.dbus = \"off\")");
    }

    let started = load_configured_models(&cfg.models, &dispatcher, &mut signals).await;
    let stop_reason = match started {
        Ok(None) => {
            let status =
                format!("ready: {} model(s); HTTP on {http_addr}; socket {}", cfg.models.len(), socket_path.display());
            shared.set_state(DaemonState::Ready);
            notify::ready(&status);
            tracing::info!("{status}");
            if let Some(period) = notify::watchdog_period() {
                tracing::info!(
                    period_ms = period.as_millis() as u64,
                    "systemd watchdog enabled; pinging every half period"
                );
                let models = models.clone();
                tokio::spawn(notify::watchdog(period, move || liveness(models.clone(), period)));
            }
            loop {
                match signals.next().await {
                    Wake::Stop(sig) => break sig,
                    Wake::Reload => reload(&shared, &source, dev, &env, &log),
                }
            }
        }
        Ok(Some(sig)) => sig,
        Err(e) => {
            shutdown(&shared, &models, drain, stop_tx, http_task, socket_task, dbus_conn, &socket_path).await;
            return Err(e);
        }
    };
    tracing::info!(signal = stop_reason, "stopping");
    shutdown(&shared, &models, drain, stop_tx, http_task, socket_task, dbus_conn, &socket_path).await;
    Ok(())
}

/// Loads `[[models]]` one by one with progress in `STATUS=`. `Ok(Some(signal))` when a stop
/// signal arrived meanwhile.
async fn load_configured_models(
    models: &[crate::config::ModelConfig],
    dispatcher: &Dispatcher,
    signals: &mut Signals,
) -> Result<Option<&'static str>, DaemonError> {
    let n = models.len();
    for (i, m) in models.iter().enumerate() {
        let name = m.served_name();
        let base = format!("loading model {name} ({}/{n})", i + 1);
        notify::status(&base);
        notify::extend_timeout(LOAD_EXTENSION);
        tracing::info!(model = %name, source = %m.source, "{base}");
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let load = dispatcher.models.load(m.to_load_params(), m.reasoning_parser, Some(ptx));
        tokio::pin!(load);
        let mut keepalive = tokio::time::interval(LOAD_EXTENSION / 3);
        let mut last_phase = String::new();
        let mut last_status = std::time::Instant::now();
        let result = loop {
            tokio::select! {
                r = &mut load => break r,
                Some(p) = prx.recv() => {
                    // One STATUS= per phase change or second: a load reports every tensor, and
                    // sd_notify datagrams are sent synchronously.
                    if p.phase != last_phase || last_status.elapsed() >= Duration::from_secs(1) {
                        let pct = p.total.filter(|t| *t > 0).map(|t| format!(" {}%", p.done * 100 / t)).unwrap_or_default();
                        notify::status(&format!("{base}: {}{pct}", p.phase));
                        last_phase = p.phase.clone();
                        last_status = std::time::Instant::now();
                    }
                }
                _ = keepalive.tick() => notify::extend_timeout(LOAD_EXTENSION),
                wake = signals.next() => match wake {
                    Wake::Stop(sig) => return Ok(Some(sig)),
                    Wake::Reload => tracing::warn!("SIGHUP while starting: ignored until the daemon is ready"),
                },
            }
        };
        result.map_err(|source| DaemonError::ModelLoad { name, source })?;
    }
    Ok(None)
}

/// The watchdog's question: does the model manager answer, and has every engine loop run
/// within the last watchdog period?
async fn liveness(models: ModelManager, period: Duration) -> Result<(), String> {
    match tokio::time::timeout(period / 4, models.heartbeats()).await {
        Err(_) | Ok(None) => Err("the model manager did not answer".into()),
        Ok(Some(beats)) => {
            for (name, beat) in beats {
                let age = beat.elapsed();
                if age > period {
                    return Err(format!("the engine loop of model `{name}` last ran {age:?} ago"));
                }
            }
            Ok(())
        }
    }
}

/// SIGHUP: re-read the file; apply API keys and log level; keep the old config on errors.
fn reload(shared: &Shared, source: &ConfigSource, dev: bool, env: &Env, log: &LogHandle) {
    shared.set_state(DaemonState::Reloading);
    notify::reloading();
    tracing::info!("SIGHUP: reloading configuration");
    match Settings::load(source, dev, env) {
        Ok(new) => {
            let mut settings = shared.settings.write().unwrap_or_else(|e| e.into_inner());
            let restart_only = restart_only_changes(&settings.config, &new.config);
            if !restart_only.is_empty() {
                tracing::warn!(keys = %restart_only.join(", "), "these changes take effect after a restart");
            }
            if let Err(e) = log.set_level(&new.config.log.level) {
                tracing::error!("{e}");
            }
            shared.api_keys.replace(new.api_keys.iter().map(|k| k.expose()));
            tracing::info!(api_keys = new.api_keys.len(), log_level = %new.config.log.level, "configuration reloaded");
            *settings = new;
        }
        Err(e) => tracing::error!("reload failed, keeping the previous configuration: {e}"),
    }
    shared.set_state(DaemonState::Ready);
    notify::ready("ready (configuration reloaded)");
}

fn restart_only_changes(old: &crate::config::Config, new: &crate::config::Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.server.listen != new.server.listen {
        keys.push("server.listen");
    }
    if old.control != new.control {
        keys.push("[control]");
    }
    if old.storage != new.storage {
        keys.push("[storage]");
    }
    if old.engine != new.engine {
        keys.push("[engine]");
    }
    if old.models != new.models {
        keys.push("[[models]] (use llmctl load/unload to change models now)");
    }
    if old.log.target != new.log.target {
        keys.push("log.target");
    }
    keys
}

#[allow(clippy::too_many_arguments)]
async fn shutdown(
    shared: &Shared,
    models: &ModelManager,
    drain: Duration,
    stop_tx: watch::Sender<bool>,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    socket_task: tokio::task::JoinHandle<()>,
    dbus_conn: Option<zbus::Connection>,
    socket_path: &std::path::Path,
) {
    shared.set_state(DaemonState::Stopping);
    notify::stopping(&format!("stopping: letting in-flight requests finish (up to {}s)", drain.as_secs()));
    // Stop accepting: no new control connections, no new HTTP connections, name released.
    let _ = stop_tx.send(true);
    drop(dbus_conn);
    let drained = async {
        models.shutdown_all(drain).await;
        let _ = http_task.await;
    };
    // One extra second for the engines' own drain to report back.
    if tokio::time::timeout(drain + Duration::from_secs(1), drained).await.is_err() {
        tracing::warn!(
            timeout_secs = drain.as_secs(),
            "requests still running at the shutdown timeout; exiting anyway"
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), socket_task).await;
    let _ = std::fs::remove_file(socket_path);
    tracing::info!("llmd stopped");
}
