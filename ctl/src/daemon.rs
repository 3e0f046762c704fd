//! Reaching the daemon: which socket, connecting with the right hint, and how failures map to
//! exit codes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use llmd_proto::{Client, ClientError, ControlError, DEFAULT_CONTROL_GROUP, DEFAULT_SOCKET};

/// Why a command did not succeed; each maps to one exit code.
#[derive(Debug)]
pub enum Failure {
    /// The daemon (or the HTTP API for `chat`) could not be reached: exit 3.
    Unreachable(String),
    /// The daemon refused or failed the operation: exit 1, with its stable code.
    Remote(ControlError),
    /// Anything else that went wrong on our side of the operation: exit 1.
    Failed(String),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Unreachable(_) => 3,
            Failure::Remote(_) | Failure::Failed(_) => 1,
        }
    }

    /// Stable code for `--json` error output.
    pub fn code(&self) -> &str {
        match self {
            Failure::Unreachable(_) => "unreachable",
            Failure::Remote(e) => e.code.as_str(),
            Failure::Failed(_) => "failed",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::Unreachable(m) | Failure::Failed(m) => m.clone(),
            Failure::Remote(e) => format!("{} ({})", e.message, e.code.as_str()),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        if e.is_unreachable() {
            return Failure::Unreachable(e.to_string());
        }
        match e {
            ClientError::Remote(error) => Failure::Remote(error),
            other => Failure::Failed(other.to_string()),
        }
    }
}

/// The socket to use. An explicit path (flag or `LLMD_SOCKET`) always wins. Otherwise the
/// system socket, unless it is absent and a `llmd --dev` socket exists under
/// `$XDG_RUNTIME_DIR/llmd/`, so a developer's daemon is found without flags.
pub fn resolve_socket(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(path) = explicit {
        return path;
    }
    let system = PathBuf::from(DEFAULT_SOCKET);
    let dev = std::env::var_os("XDG_RUNTIME_DIR").map(|dir| PathBuf::from(dir).join("llmd").join("llmd.sock"));
    pick_socket(system, dev)
}

fn pick_socket(system: PathBuf, dev: Option<PathBuf>) -> PathBuf {
    // symlink_metadata, not exists(): a socket we may not stat through is still "there".
    if system.symlink_metadata().is_ok() {
        return system;
    }
    match dev {
        Some(dev) if dev.symlink_metadata().is_ok() => dev,
        _ => system,
    }
}

/// Group named in the permission-denied hint: the socket's own group when it can be read,
/// since an admin may have configured another `control.group` than the default.
fn socket_group(socket: &Path) -> String {
    let Ok(meta) = socket.metadata() else { return DEFAULT_CONTROL_GROUP.to_string() };
    if meta.gid() == 0 {
        // A root-group socket means the daemon could not set its group; the default is the fix.
        return DEFAULT_CONTROL_GROUP.to_string();
    }
    group_name(meta.gid()).unwrap_or_else(|| DEFAULT_CONTROL_GROUP.to_string())
}

fn group_name(gid: u32) -> Option<String> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id = fields.nth(1)?.parse::<u32>().ok()?;
        (id == gid).then(|| name.to_string())
    })
}

/// Connects and performs the handshake.
pub async fn connect(socket: &Path) -> Result<Client, Failure> {
    let name = format!("llmctl {}", env!("CARGO_PKG_VERSION"));
    Ok(Client::connect(socket, &socket_group(socket), &name).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_socket_only_when_system_socket_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("system.sock");
        let dev = dir.path().join("dev.sock");
        assert_eq!(pick_socket(system.clone(), Some(dev.clone())), system, "neither exists: keep the default");
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(pick_socket(system.clone(), Some(dev.clone())), dev);
        std::fs::write(&system, b"").unwrap();
        assert_eq!(pick_socket(system.clone(), Some(dev)), system);
        assert_eq!(resolve_socket(Some(PathBuf::from("/x.sock"))), PathBuf::from("/x.sock"));
    }

    #[test]
    fn failures_map_to_exit_codes() {
        let unreachable = ClientError::Unreachable {
            socket: "/nope".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let f = Failure::from(unreachable);
        assert_eq!(f.exit_code(), 3);
        assert!(f.message().contains("systemctl status llmd"));
        let f = Failure::from(ClientError::Remote(ControlError::new(llmd_proto::ErrorCode::NotFound, "no model `x`")));
        assert_eq!((f.exit_code(), f.code(), f.message().as_str()), (1, "not_found", "no model `x` (not_found)"));
    }
}
