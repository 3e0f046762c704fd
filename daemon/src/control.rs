//! The one dispatcher behind both control transports (Unix socket and D-Bus): authorization,
//! audit logging, and routing of each [`Request`] to the subsystem that answers it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use llmd_openai::ApiKeys;
use llmd_options::{Backend, Device};
use llmd_proto::{
    ControlError, DaemonState, DoctorParams, DoctorReport, ErrorCode, GpuReport, Progress, PullParams, Reply, Request,
    StatusInfo, StoredModel, Welcome,
};
use llmd_store::Store;
use llmd_telemetry::Telemetry;
use tokio::sync::{mpsc, watch};

use crate::auth::{Authorizer, Caller};
use crate::config::Settings;
use crate::models::ModelManager;
use crate::store::{self, store_error};

/// Daemon-wide state shared by the transports, the HTTP server and the life-cycle code.
#[derive(Debug)]
pub struct Shared {
    pub phase: watch::Sender<DaemonState>,
    pub started: Instant,
    /// The effective settings; replaced on a successful SIGHUP reload.
    pub settings: RwLock<Settings>,
    /// Current API keys (config + key file), swapped on reload; the HTTP API checks these.
    pub api_keys: ApiKeys,
    pub http_listen: SocketAddr,
    pub socket: PathBuf,
    /// The bus actually in use: "system", "session" or "off".
    pub dbus: RwLock<String>,
}

impl Shared {
    pub fn new(settings: Settings, http_listen: SocketAddr) -> Shared {
        let (phase, _) = watch::channel(DaemonState::Starting);
        Shared {
            phase,
            started: Instant::now(),
            api_keys: ApiKeys::new(settings.api_keys.iter().map(|k| k.expose())),
            socket: settings.config.control.socket.clone(),
            dbus: RwLock::new(settings.config.control.dbus.as_str().to_string()),
            settings: RwLock::new(settings),
            http_listen,
        }
    }

    pub fn state(&self) -> DaemonState {
        *self.phase.borrow()
    }

    pub fn set_state(&self, state: DaemonState) {
        self.phase.send_replace(state);
    }
}

/// Routes requests. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pub shared: Arc<Shared>,
    pub models: ModelManager,
    pub authz: Arc<Authorizer>,
    pub store: Store,
    pub telemetry: Arc<Telemetry>,
}

/// A blocking helper task that died (panicked): the request fails, the daemon goes on.
fn join_error(what: &str, e: tokio::task::JoinError) -> ControlError {
    ControlError::new(ErrorCode::Failed, format!("{what} failed inside llmd: {e}"))
}

impl Dispatcher {
    /// Handles one request for `caller`. Progress of long operations goes to `progress`.
    pub async fn handle(
        &self,
        request: Request,
        caller: &Caller,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<Reply, ControlError> {
        let method = request.method();
        if request.is_mutating() {
            if !self.authz.allows(caller) {
                tracing::warn!(uid = caller.uid, pid = ?caller.pid, transport = caller.transport, method, "refused mutating call");
                return Err(ControlError::new(ErrorCode::PermissionDenied, self.authz.denial(caller, method)));
            }
            tracing::info!(uid = caller.uid, pid = ?caller.pid, transport = caller.transport, method, request = ?request, "mutating call");
            if self.shared.state() == DaemonState::Stopping {
                return Err(ControlError::new(ErrorCode::Unavailable, "llmd is stopping; try again after it restarts"));
            }
        }
        match request {
            Request::Hello { .. } => Ok(Reply::Hello(Welcome {
                protocol: llmd_proto::PROTOCOL_VERSION,
                daemon_version: env!("CARGO_PKG_VERSION").to_string(),
            })),
            Request::Status => Ok(Reply::Status(self.status().await)),
            Request::Ps => Ok(Reply::Ps { models: self.models.ps().await? }),
            Request::Load(params) => {
                let parser = self.reasoning_parser_for(&params.source);
                Ok(Reply::Loaded(self.models.load(params, parser, progress).await?))
            }
            Request::Unload { name } => {
                self.models.unload(name.clone()).await?;
                Ok(Reply::Unloaded { name })
            }
            Request::Cancel { operation } => {
                // Pulls are run (and cancelled) by the store, loads by the model manager.
                if !self.store.cancel(&operation) {
                    self.models.cancel(operation.clone()).await?;
                }
                Ok(Reply::Cancelled { operation })
            }
            Request::List => Ok(Reply::List { models: self.list().await? }),
            Request::Pull(params) => Ok(Reply::Pulled(self.pull(params, progress).await?)),
            Request::Rm { model } => {
                let freed_bytes = self.rm(&model).await?;
                Ok(Reply::Removed { model, freed_bytes })
            }
            Request::Gpus => Ok(Reply::Gpus(self.gpu_report().await?)),
            Request::Doctor(params) => Ok(Reply::Doctor(self.doctor(params, caller).await?)),
        }
    }

    /// The models on disk, each marked `loaded` when a served model uses it.
    async fn list(&self) -> Result<Vec<StoredModel>, ControlError> {
        let store = self.store.clone();
        let mut models = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| join_error("listing models", e))?
            .map_err(store_error)?;
        let running = self.models.ps().await?;
        for m in &mut models {
            m.loaded = !store::loaded_from(&self.store, m, &running).is_empty();
        }
        Ok(models)
    }

    /// Downloads a model; progress goes to the caller and to the D-Bus `Progress` signal.
    async fn pull(
        &self,
        params: PullParams,
        progress: Option<mpsc::UnboundedSender<Progress>>,
    ) -> Result<StoredModel, ControlError> {
        let models = self.models.clone();
        let sink = move |p: Progress| {
            if let Some(tx) = &progress {
                let _ = tx.send(p.clone());
            }
            models.announce(p);
        };
        // Its own task: a client that detaches does not stop it between the metadata check and
        // the weights (the store runs each of the two downloads in a task of its own).
        let store_handle = self.store.clone();
        let pulled = tokio::spawn(async move { store::pull(&store_handle, &params, sink).await })
            .await
            .map_err(|e| join_error("pulling", e))?
            .map_err(store_error)?;
        tracing::info!(model = %pulled.id, revision = %pulled.revision, bytes = pulled.size_bytes, "pull finished");
        // The listing reads the architecture from the snapshot's config.json.
        let path = pulled.path.to_string_lossy().into_owned();
        let listed = self.list().await.ok().and_then(|all| all.into_iter().find(|m| m.path == path));
        Ok(listed.unwrap_or_else(|| StoredModel {
            source: pulled.id.split(':').next().unwrap_or("hf").to_string(),
            id: pulled.id,
            revision: Some(pulled.revision),
            path,
            size_bytes: pulled.size_bytes,
            architecture: None,
            loaded: false,
        }))
    }

    /// Removes a model's files, refused while a served model uses them.
    async fn rm(&self, id: &str) -> Result<u64, ControlError> {
        let running = self.models.ps().await?;
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| join_error("listing models", e))?
            .map_err(store_error)?;
        let users = store::loaded_users_of(&self.store, id, &stored, &running);
        if let Some(first) = users.first() {
            let names: Vec<String> = users.iter().map(|m| format!("`{}`", m.name)).collect();
            return Err(ControlError::new(
                ErrorCode::Conflict,
                format!(
                    "cannot remove `{id}`: it is loaded as {}; unload it first (llmctl unload {})",
                    names.join(", "),
                    first.name
                ),
            ));
        }
        self.store.remove(id).await.map_err(store_error)
    }

    /// A fresh GPU report in which this daemon's processes name the model on each GPU.
    async fn gpu_report(&self) -> Result<GpuReport, ControlError> {
        let running = self.models.ps().await?;
        let telemetry = self.telemetry.clone();
        let me = std::process::id();
        tokio::task::spawn_blocking(move || {
            telemetry.report_with_owners(&|pid, gpu| {
                if pid != me {
                    return None;
                }
                running.iter().find(|m| m.gpus.contains(&gpu)).map(|m| m.name.clone())
            })
        })
        .await
        .map_err(|e| join_error("reading GPU telemetry", e))
    }

    /// `llmctl doctor`: the host checks with this daemon's config and the caller's identity.
    async fn doctor(&self, params: DoctorParams, caller: &Caller) -> Result<DoctorReport, ControlError> {
        let gpus = self.gpu_report().await?;
        let settings = self.shared.settings.read().unwrap_or_else(|e| e.into_inner()).clone();
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.list().unwrap_or_default())
            .await
            .map_err(|e| join_error("listing models", e))?;
        let storage = &settings.config.storage;
        let configured = settings
            .config
            .models
            .iter()
            .map(|m| llmd_telemetry::ConfiguredModel {
                name: m.served_name(),
                size_bytes: None,
                downloaded: std::path::Path::new(&m.source).is_dir()
                    || store::is_stored(&self.store, &m.source, &stored),
            })
            .collect();
        let config = llmd_telemetry::DoctorConfig {
            models_dir: storage.models_dir.clone(),
            models: configured,
            http_listen: self.shared.http_listen.to_string(),
            hub_endpoint: (!storage.offline).then(|| storage.hf_endpoint.clone()),
            control_group: Some(settings.config.control.group.clone()),
            config_error: None,
        };
        let mut ctx = llmd_telemetry::DoctorContext::new(gpus, config);
        // Read-only D-Bus calls come without an identity (uid u32::MAX): skip the membership check.
        ctx.caller =
            (caller.uid != u32::MAX).then(|| llmd_telemetry::Caller { uid: caller.uid, gids: caller.gids.clone() });
        ctx.llmd_user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| nix::unistd::getuid().to_string());
        // This daemon is listening on `http_listen` right now.
        ctx.http_held_by_llmd = true;
        ctx.quick = params.quick;
        let telemetry = self.telemetry.clone();
        tokio::task::spawn_blocking(move || {
            ctx.p2p = telemetry.p2p_matrix();
            llmd_telemetry::run_checks(&ctx)
        })
        .await
        .map_err(|e| join_error("running host checks", e))
    }

    /// A `[[models]]` entry's reasoning parser applies when `llmctl load` names the same source.
    fn reasoning_parser_for(&self, source: &str) -> Option<llmd_options::ReasoningParser> {
        let settings = self.shared.settings.read().unwrap_or_else(|e| e.into_inner());
        settings.config.models.iter().find(|m| m.source == source).and_then(|m| m.reasoning_parser)
    }

    pub async fn status(&self) -> StatusInfo {
        let models_loaded = self.models.ps().await.map(|m| m.len() as u32).unwrap_or(0);
        let telemetry = self.telemetry.clone();
        let gpus = tokio::task::spawn_blocking(move || telemetry.report().gpus.len() as u32).await.unwrap_or(0);
        let settings = self.shared.settings.read().unwrap_or_else(|e| e.into_inner()).clone();
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: llmd_proto::PROTOCOL_VERSION,
            state: self.shared.state(),
            pid: std::process::id(),
            uptime_secs: self.shared.started.elapsed().as_secs(),
            http_listen: self.shared.http_listen.to_string(),
            socket: self.shared.socket.display().to_string(),
            dbus: self.shared.dbus.read().unwrap_or_else(|e| e.into_inner()).clone(),
            // "auto" means a GPU only in a CUDA build on a host with one.
            device: match settings.config.engine.device {
                Device::Cuda => Backend::Cuda,
                Device::Auto if cfg!(feature = "cuda") && gpus > 0 => Backend::Cuda,
                Device::Auto | Device::Cpu => Backend::Cpu,
            },
            models_dir: settings.config.storage.models_dir.display().to_string(),
            models_loaded,
            gpus,
        }
    }
}
