//! The D-Bus face of the control plane: `org.llmd.Daemon1` at `/org/llmd/Daemon1`, interface
//! `org.llmd.Daemon1.Manager`, exactly the methods, property and signals of the proxy in
//! `llmd_proto::dbus`. Requests go through the same [`Dispatcher`] as the socket.
//!
//! Mutating methods are authorized by the caller's uid as the bus reports it
//! (`GetConnectionUnixUser` on the message's sender), never by the daemon's own identity.

use llmd_proto::dbus::{BUS_NAME, OBJECT_PATH};
use llmd_proto::{ControlError, ErrorCode, LoadParams, PullParams, Reply, Request};
use zbus::fdo::{DBusProxy, RequestNameFlags, RequestNameReply};
use zbus::message::Header;
use zbus::names::BusName;
use zbus::object_server::SignalEmitter;
use zbus::{Connection, interface};

use crate::auth::{Caller, user_groups};
use crate::config::DbusBus;
use crate::control::Dispatcher;
use crate::models::ModelEvent;

/// Errors on the bus, one name per protocol error code (`org.llmd.Daemon1.Error.NotFound`...).
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.llmd.Daemon1.Error")]
pub enum DbusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    BadFrame(String),
    FrameTooLarge(String),
    UnknownMethod(String),
    VersionMismatch(String),
    PermissionDenied(String),
    InvalidArgument(String),
    NotFound(String),
    Conflict(String),
    InsufficientResources(String),
    Unavailable(String),
    Cancelled(String),
    Failed(String),
}

impl From<ControlError> for DbusError {
    fn from(e: ControlError) -> Self {
        let m = e.message;
        match e.code {
            ErrorCode::BadFrame => DbusError::BadFrame(m),
            ErrorCode::FrameTooLarge => DbusError::FrameTooLarge(m),
            ErrorCode::UnknownMethod => DbusError::UnknownMethod(m),
            ErrorCode::VersionMismatch => DbusError::VersionMismatch(m),
            ErrorCode::PermissionDenied => DbusError::PermissionDenied(m),
            ErrorCode::InvalidArgument => DbusError::InvalidArgument(m),
            ErrorCode::NotFound => DbusError::NotFound(m),
            ErrorCode::Conflict => DbusError::Conflict(m),
            ErrorCode::InsufficientResources => DbusError::InsufficientResources(m),
            ErrorCode::Unavailable => DbusError::Unavailable(m),
            ErrorCode::Cancelled => DbusError::Cancelled(m),
            ErrorCode::Failed => DbusError::Failed(m),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbusSetupError {
    #[error("cannot connect to the D-Bus {bus} bus: {source}; set control.dbus = \"off\" to run without D-Bus")]
    Connect {
        bus: &'static str,
        #[source]
        source: zbus::Error,
    },
    #[error("the D-Bus name {BUS_NAME} is already owned on the {0} bus: is another llmd running?")]
    NameTaken(&'static str),
    #[error("cannot own {BUS_NAME} on the {bus} bus: {source} (is the bus policy file installed?)")]
    Name {
        bus: &'static str,
        #[source]
        source: zbus::Error,
    },
}

/// The served object.
pub struct Manager {
    dispatcher: Dispatcher,
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, DbusError> {
    serde_json::to_string(v).map_err(|e| DbusError::Failed(format!("cannot encode the reply: {e}")))
}

fn options<T: serde::de::DeserializeOwned>(options_json: &str, source: &str) -> Result<T, DbusError> {
    let mut value: serde_json::Value = if options_json.trim().is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_str(options_json)
            .map_err(|e| DbusError::InvalidArgument(format!("`options_json` is not JSON: {e}")))?
    };
    let Some(obj) = value.as_object_mut() else {
        return Err(DbusError::InvalidArgument("`options_json` must be a JSON object".into()));
    };
    if obj.contains_key("source") {
        return Err(DbusError::InvalidArgument(
            "`options_json` must not contain `source`; pass it as the first argument".into(),
        ));
    }
    obj.insert("source".into(), serde_json::Value::String(source.to_string()));
    serde_json::from_value(value).map_err(|e| DbusError::InvalidArgument(format!("invalid `options_json`: {e}")))
}

impl Manager {
    async fn caller(&self, header: &Header<'_>, conn: &Connection) -> Result<Caller, DbusError> {
        let sender = header.sender().ok_or_else(|| DbusError::PermissionDenied("message has no sender".into()))?;
        let proxy = DBusProxy::new(conn).await.map_err(DbusError::ZBus)?;
        let uid = proxy
            .get_connection_unix_user(BusName::Unique(sender.to_owned()))
            .await
            .map_err(|e| DbusError::PermissionDenied(format!("cannot ask the bus who the caller is: {e}")))?;
        Ok(Caller { uid, gids: user_groups(uid), pid: None, transport: "dbus" })
    }

    async fn call(&self, request: Request, caller: &Caller) -> Result<Reply, DbusError> {
        Ok(self.dispatcher.handle(request, caller, None).await?)
    }

    fn anonymous() -> Caller {
        // Read-only methods are open to all; no identity is needed to answer them.
        Caller { uid: u32::MAX, gids: Vec::new(), pid: None, transport: "dbus" }
    }
}

#[interface(name = "org.llmd.Daemon1.Manager")]
impl Manager {
    /// JSON of the daemon status.
    async fn status(&self) -> Result<String, DbusError> {
        match self.call(Request::Status, &Self::anonymous()).await? {
            Reply::Status(s) => json(&s),
            other => Err(DbusError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// JSON array of the models on disk.
    async fn list(&self) -> Result<String, DbusError> {
        match self.call(Request::List, &Self::anonymous()).await? {
            Reply::List { models } => json(&models),
            other => Err(DbusError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// JSON array of the loaded models.
    async fn ps(&self) -> Result<String, DbusError> {
        match self.call(Request::Ps, &Self::anonymous()).await? {
            Reply::Ps { models } => json(&models),
            other => Err(DbusError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// Loads a model; returns JSON of the loaded model.
    async fn load(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        source: &str,
        options_json: &str,
    ) -> Result<String, DbusError> {
        let caller = self.caller(&header, conn).await?;
        let params: LoadParams = options(options_json, source)?;
        match self.call(Request::Load(params), &caller).await? {
            Reply::Loaded(m) => json(&m),
            other => Err(DbusError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// Unloads a model after draining its requests.
    async fn unload(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: &str,
    ) -> Result<(), DbusError> {
        let caller = self.caller(&header, conn).await?;
        self.call(Request::Unload { name: name.to_string() }, &caller).await.map(|_| ())
    }

    /// Pulls a model into the store; returns JSON of the stored model.
    async fn pull(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        source: &str,
        options_json: &str,
    ) -> Result<String, DbusError> {
        let caller = self.caller(&header, conn).await?;
        let params: PullParams = options(options_json, source)?;
        match self.call(Request::Pull(params), &caller).await? {
            Reply::Pulled(m) => json(&m),
            other => Err(DbusError::Failed(format!("unexpected reply {other:?}"))),
        }
    }

    /// "starting", "ready", "reloading" or "stopping".
    #[zbus(property)]
    async fn state(&self) -> String {
        self.dispatcher.shared.state().as_str().to_string()
    }

    #[zbus(signal)]
    async fn model_loaded(emitter: &SignalEmitter<'_>, name: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn model_unloaded(emitter: &SignalEmitter<'_>, name: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn progress(emitter: &SignalEmitter<'_>, operation: &str, progress_json: &str) -> zbus::Result<()>;
}

/// Connects to the bus, serves the object and owns the name.
pub async fn start(bus: DbusBus, address: Option<&str>, dispatcher: Dispatcher) -> Result<Connection, DbusSetupError> {
    let bus_name: &'static str = bus.as_str();
    let connect = |source| DbusSetupError::Connect { bus: bus_name, source };
    let builder = match (address, bus) {
        (Some(addr), _) => zbus::connection::Builder::address(addr).map_err(connect)?,
        (None, DbusBus::Session) => zbus::connection::Builder::session().map_err(connect)?,
        (None, _) => zbus::connection::Builder::system().map_err(connect)?,
    };
    let events = dispatcher.models.subscribe();
    let mut phase = dispatcher.shared.phase.subscribe();
    let conn =
        builder.serve_at(OBJECT_PATH, Manager { dispatcher }).map_err(connect)?.build().await.map_err(connect)?;
    let flags = RequestNameFlags::DoNotQueue.into();
    match conn.request_name_with_flags(BUS_NAME, flags).await {
        Ok(RequestNameReply::PrimaryOwner) | Ok(RequestNameReply::AlreadyOwner) => {}
        Ok(_) | Err(zbus::Error::NameTaken) => return Err(DbusSetupError::NameTaken(bus_name)),
        Err(source) => return Err(DbusSetupError::Name { bus: bus_name, source }),
    }

    // Signals follow the model manager's events and the daemon phase.
    let iface = conn.object_server().interface::<_, Manager>(OBJECT_PATH).await.map_err(connect)?;
    let events_iface = iface.clone();
    tokio::spawn(async move {
        let mut events = events;
        loop {
            let event = match events.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "D-Bus signal relay lagged");
                    continue;
                }
                Err(_) => break,
            };
            let emitter = events_iface.signal_emitter();
            let sent = match &event {
                ModelEvent::Loaded(name) => Manager::model_loaded(emitter, name).await,
                ModelEvent::Unloaded(name) => Manager::model_unloaded(emitter, name).await,
                ModelEvent::Progress(p) => match serde_json::to_string(p) {
                    Ok(j) => Manager::progress(emitter, &p.operation, &j).await,
                    Err(_) => Ok(()),
                },
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "cannot emit D-Bus signal");
            }
        }
    });
    tokio::spawn(async move {
        while phase.changed().await.is_ok() {
            let manager = iface.get().await;
            if let Err(e) = manager.state_changed(iface.signal_emitter()).await {
                tracing::debug!(error = %e, "cannot emit State change");
            }
        }
    });
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_merge_source_and_reject_bad_json() {
        let p: LoadParams = options("{\"tp\":2}", "/m").unwrap();
        assert_eq!(p, LoadParams { source: "/m".into(), tp: Some(2), ..Default::default() });
        let p: LoadParams = options("", "/m").unwrap();
        assert_eq!(p.source, "/m");
        assert!(matches!(options::<LoadParams>("[1]", "/m"), Err(DbusError::InvalidArgument(_))));
        assert!(matches!(options::<LoadParams>("{\"source\":\"x\"}", "/m"), Err(DbusError::InvalidArgument(_))));
        assert!(matches!(options::<LoadParams>("{\"bogus\":1}", "/m"), Err(DbusError::InvalidArgument(_))));
    }
}
