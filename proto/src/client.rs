//! Async client for the control socket: connect, handshake, then one request at a time.

use std::path::{Path, PathBuf};

use tokio::net::UnixStream;

use crate::PROTOCOL_VERSION;
use crate::framing::{self, FrameError};
use crate::messages::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "permission denied on {socket}: add yourself to group {group} (sudo usermod -aG {group} $USER, then log in again)"
    )]
    PermissionDenied { socket: PathBuf, group: String },
    #[error("cannot reach llmd at {socket}: {source}; is llmd running? systemctl status llmd")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    #[error("the daemon closed the connection before answering")]
    Closed,
    #[error("unexpected answer from the daemon: {0}")]
    Unexpected(String),
    #[error("{0}")]
    Remote(ControlError),
}

impl ClientError {
    /// True when the daemon could not be reached at all (llmctl exits 3 then).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. } | ClientError::PermissionDenied { .. })
    }
}

/// A handshaken connection to the daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u64,
    welcome: Welcome,
}

impl Client {
    /// Connects to `socket` and performs the hello handshake.
    /// `group` only shapes the permission-denied hint.
    pub async fn connect(socket: &Path, group: &str, client_name: &str) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket).await.map_err(|source| match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                ClientError::PermissionDenied { socket: socket.to_path_buf(), group: group.to_string() }
            }
            _ => ClientError::Unreachable { socket: socket.to_path_buf(), source },
        })?;
        let mut client = Client { stream, next_id: 0, welcome: Welcome { protocol: 0, daemon_version: String::new() } };
        let hello = Request::Hello { protocol: PROTOCOL_VERSION, client: client_name.to_string() };
        match client.call(hello, |_| {}).await? {
            Reply::Hello(welcome) => client.welcome = welcome,
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        }
        Ok(client)
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Sends `request`, passes each progress event to `on_progress`, returns the final reply.
    pub async fn call(
        &mut self,
        request: Request,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<Reply, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        framing::write_message(&mut self.stream, &ClientFrame { id, request }).await?;
        loop {
            let frame: ServerFrame = framing::read_message(&mut self.stream).await?.ok_or(ClientError::Closed)?;
            if frame.id() != id {
                return Err(ClientError::Unexpected(format!(
                    "answer for request {} while waiting for {id}",
                    frame.id()
                )));
            }
            match frame {
                ServerFrame::Progress { progress, .. } => on_progress(&progress),
                ServerFrame::Reply { reply, .. } => return Ok(reply),
                ServerFrame::Error { error, .. } => return Err(ClientError::Remote(error)),
            }
        }
    }
}
