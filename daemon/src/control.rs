//! The one dispatcher behind both control transports (Unix socket and D-Bus): authorization,
//! audit logging, and routing of each [`Request`] to the subsystem that answers it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use llmd_proto::{ControlError, DaemonState, ErrorCode, Progress, Reply, Request, StatusInfo, Welcome};
use tokio::sync::{mpsc, watch};

use crate::auth::{Authorizer, Caller};
use crate::config::{Device, Settings};
use crate::models::ModelManager;
use crate::secret::Secret;

/// Daemon-wide state shared by the transports, the HTTP server and the life-cycle code.
#[derive(Debug)]
pub struct Shared {
    pub phase: watch::Sender<DaemonState>,
    pub started: Instant,
    /// The effective settings; replaced on a successful SIGHUP reload.
    pub settings: RwLock<Settings>,
    /// Current API keys (config + key file), swapped on reload; the HTTP API reads these.
    pub api_keys: Arc<RwLock<Vec<Secret>>>,
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
            api_keys: Arc::new(RwLock::new(settings.api_keys.clone())),
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
}

/// Answer for a subsystem that is not linked into this build yet.
fn not_linked(method: &str, subsystem: &str) -> ControlError {
    ControlError::new(
        ErrorCode::Unavailable,
        format!("`{method}` is not available: the {subsystem} is not linked into this llmd build"),
    )
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
                self.models.cancel(operation.clone()).await?;
                Ok(Reply::Cancelled { operation })
            }
            Request::List => Err(not_linked(method, "model store (llmd-store)")),
            Request::Pull(_) => Err(not_linked(method, "model store (llmd-store)")),
            Request::Rm { .. } => Err(not_linked(method, "model store (llmd-store)")),
            Request::Gpus => Err(not_linked(method, "GPU telemetry (llmd-telemetry)")),
            Request::Doctor(_) => Err(not_linked(method, "host checks (llmd-telemetry)")),
        }
    }

    /// A `[[models]]` entry's reasoning parser applies when `llmctl load` names the same source.
    fn reasoning_parser_for(&self, source: &str) -> Option<crate::config::ReasoningParser> {
        let settings = self.shared.settings.read().unwrap_or_else(|e| e.into_inner());
        settings.config.models.iter().find(|m| m.source == source).and_then(|m| m.reasoning_parser)
    }

    pub async fn status(&self) -> StatusInfo {
        let models_loaded = self.models.ps().await.map(|m| m.len() as u32).unwrap_or(0);
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
            // Without GPU telemetry linked in, "auto" can only mean the CPU.
            device: match settings.config.engine.device {
                Device::Cuda => "cuda".into(),
                Device::Auto | Device::Cpu => "cpu".into(),
            },
            models_dir: settings.config.storage.models_dir.display().to_string(),
            models_loaded,
            gpus: 0,
        }
    }
}
