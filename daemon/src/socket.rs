//! The control socket: binding (permissions, group, stale-socket recovery) and the
//! per-connection protocol loop (handshake, typed errors, progress, limits).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use llmd_proto::framing::{self, FrameError};
use llmd_proto::{
    ControlError, ErrorCode, MAX_FRAME_BYTES, PROTOCOL_VERSION, Reply, Request, ServerFrame, decode_client_frame,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::auth::{Caller, proc_groups};
use crate::control::Dispatcher;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "another llmd is already running: it answers on {0}; stop it first (systemctl stop llmd) or set control.socket"
    )]
    LiveDaemon(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error(
        "control.group `{0}` does not exist: create it (groupadd --system {0}) or set control.group to an existing group"
    )]
    NoGroup(String),
    #[error("cannot look up control.group `{group}`: {source}")]
    GroupLookup {
        group: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SocketError + 'a {
    move |source| SocketError::Io { what, path: path.to_path_buf(), source }
}

/// The group that will own the socket.
#[derive(Debug, Clone)]
pub struct SocketGroup {
    /// gid applied with chown; `None` keeps the daemon's own group (dev mode fallback).
    pub gid: Option<u32>,
    /// Set when the configured group was missing and the fallback was taken.
    pub fallback_note: Option<String>,
}

/// Resolves `control.group`. In `--dev` a missing group falls back to the user's own group.
pub fn resolve_group(name: &str, dev: bool) -> Result<SocketGroup, SocketError> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(SocketGroup { gid: Some(g.gid.as_raw()), fallback_note: None }),
        Ok(None) if dev => Ok(SocketGroup {
            gid: None,
            fallback_note: Some(format!(
                "control.group `{name}` does not exist; --dev keeps the socket in your own group (gid {})",
                nix::unistd::getgid()
            )),
        }),
        Ok(None) => Err(SocketError::NoGroup(name.to_string())),
        Err(source) => Err(SocketError::GroupLookup { group: name.to_string(), source }),
    }
}

/// A bound control socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct BoundSocket {
    pub listener: UnixListener,
    pub path: PathBuf,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket at `path` with mode 0660 and group `group`.
///
/// A socket file left by a crashed run is replaced; one a live daemon answers on is not.
/// The socket is bound under a temporary name, given its mode and group, then renamed into
/// place, so it is never reachable with looser permissions.
pub fn bind(path: &Path, group: &SocketGroup) -> Result<BoundSocket, SocketError> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io("create the socket folder", dir))?;
        // Group members must reach the socket; the socket's own mode guards it.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io("set the mode of", dir))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::LiveDaemon(path.to_path_buf())),
            Err(_) => {
                // Nobody listens: a crashed run left it behind.
                std::fs::remove_file(path).map_err(io("remove the stale socket", path))?;
                tracing::warn!(socket = %path.display(), "replaced a stale control socket left by an earlier run");
            }
        },
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", path)(e)),
    }
    let tmp = path.with_extension(format!("sock.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io("bind", &tmp))?;
    let finish = || -> Result<(), SocketError> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660)).map_err(io("set the mode of", &tmp))?;
        if let Some(gid) = group.gid {
            std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(io("change the group of", &tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io("move the socket into place at", path))
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(BoundSocket { listener, path: path.to_path_buf() })
}

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Accepts connections until `stop` turns true.
pub async fn serve(socket: Arc<BoundSocket>, dispatcher: Dispatcher, limits: Limits, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let accepted = tokio::select! {
            a = socket.listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(limit = limits.max_connections, "refused a control connection: too many open");
            tokio::spawn(async move {
                let mut stream = stream;
                let err = ControlError::new(
                    ErrorCode::Unavailable,
                    format!("too many control connections (limit {}); try again", limits.max_connections),
                );
                let _ = framing::write_message(&mut stream, &ServerFrame::Error { id: 0, error: err }).await;
            });
            continue;
        };
        let dispatcher = dispatcher.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            connection(stream, dispatcher, limits.idle_timeout, stop).await;
            drop(permit);
        });
    }
}

async fn send(stream: &mut UnixStream, frame: &ServerFrame) -> bool {
    match framing::write_message(stream, frame).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, "control client went away");
            false
        }
    }
}

fn caller_of(stream: &UnixStream) -> Option<Caller> {
    let cred = stream.peer_cred().ok()?;
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    let mut gids = pid.and_then(|p| proc_groups(Path::new("/proc"), p).ok()).unwrap_or_default();
    gids.push(cred.gid());
    Some(Caller { uid: cred.uid(), gids, pid, transport: "socket" })
}

async fn connection(mut stream: UnixStream, dispatcher: Dispatcher, idle: Duration, mut stop: watch::Receiver<bool>) {
    let Some(caller) = caller_of(&stream) else {
        tracing::warn!("control connection without peer credentials; closing");
        return;
    };
    let mut greeted = false;
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(idle, framing::read_frame(&mut stream, MAX_FRAME_BYTES)) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let bytes = match read {
            Err(_) => {
                tracing::debug!(uid = caller.uid, "closing idle control connection");
                return;
            }
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return,
            Ok(Err(FrameError::TooLarge { len, max })) => {
                let err = ControlError::new(
                    ErrorCode::FrameTooLarge,
                    format!("frame of {len} bytes exceeds the limit of {max} bytes"),
                );
                send(&mut stream, &ServerFrame::Error { id: 0, error: err }).await;
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "control connection ended");
                return;
            }
        };
        let frame = match decode_client_frame(&bytes) {
            Ok(f) => f,
            Err((id, error)) => {
                if !send(&mut stream, &ServerFrame::Error { id, error }).await {
                    return;
                }
                continue;
            }
        };
        let id = frame.id;
        if !greeted {
            match &frame.request {
                Request::Hello { protocol, .. } if *protocol == PROTOCOL_VERSION => greeted = true,
                Request::Hello { protocol, client } => {
                    let err = ControlError::new(
                        ErrorCode::VersionMismatch,
                        format!(
                            "{client} speaks protocol {protocol}, this llmd speaks {PROTOCOL_VERSION}; update llmctl or llmd"
                        ),
                    );
                    send(&mut stream, &ServerFrame::Error { id, error: err }).await;
                    return;
                }
                other => {
                    let err = ControlError::new(
                        ErrorCode::VersionMismatch,
                        format!(
                            "the first request must be `hello` with protocol {PROTOCOL_VERSION}, got `{}`",
                            other.method()
                        ),
                    );
                    send(&mut stream, &ServerFrame::Error { id, error: err }).await;
                    return;
                }
            }
        }
        if !answer(&mut stream, &dispatcher, &caller, id, frame.request).await {
            return;
        }
    }
}

/// Runs one request, forwarding its progress frames, then the final frame. False when the
/// client went away.
async fn answer(stream: &mut UnixStream, dispatcher: &Dispatcher, caller: &Caller, id: u64, request: Request) -> bool {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let work = dispatcher.handle(request, caller, Some(tx));
    tokio::pin!(work);
    let result: Result<Reply, ControlError> = loop {
        tokio::select! {
            biased;
            Some(progress) = rx.recv() => {
                if !send(stream, &ServerFrame::Progress { id, progress }).await {
                    // The operation keeps running (Ctrl-C in llmctl detaches, it does not cancel).
                    return false;
                }
            }
            r = &mut work => break r,
        }
    };
    while let Ok(progress) = rx.try_recv() {
        if !send(stream, &ServerFrame::Progress { id, progress }).await {
            return false;
        }
    }
    let frame = match result {
        Ok(reply) => ServerFrame::Reply { id, reply },
        Err(error) => ServerFrame::Error { id, error },
    };
    send(stream, &frame).await
}
