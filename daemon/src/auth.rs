//! Who may call mutating methods: uid 0, the daemon's own uid, and members of the control
//! group (primary or supplementary). The same rule serves the socket and D-Bus.

use std::path::Path;

/// A caller as the transport identified it (kernel peer credentials or the bus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// All groups of the caller (primary and supplementary), as far as they could be read.
    pub gids: Vec<u32>,
    pub pid: Option<u32>,
    /// "socket" or "dbus", for log lines.
    pub transport: &'static str,
}

/// The authorization rule.
#[derive(Debug, Clone)]
pub struct Authorizer {
    pub daemon_uid: u32,
    /// gid of `control.group`; `None` when the group does not exist (dev mode).
    pub group_gid: Option<u32>,
    pub group_name: String,
}

impl Authorizer {
    pub fn allows(&self, caller: &Caller) -> bool {
        caller.uid == 0 || caller.uid == self.daemon_uid || self.group_gid.is_some_and(|g| caller.gids.contains(&g))
    }

    /// Why a caller was refused, for the error message.
    pub fn denial(&self, caller: &Caller, method: &str) -> String {
        format!(
            "uid {} may not call `{method}`: only root, the daemon's user (uid {}) and members of group `{}` may change models",
            caller.uid, self.daemon_uid, self.group_name
        )
    }
}

/// Groups of process `pid` from `/proc/<pid>/status`: the real gid (`Gid:`) and the
/// supplementary groups (`Groups:`).
pub fn proc_groups(proc_root: &Path, pid: u32) -> std::io::Result<Vec<u32>> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status"))?;
    Ok(parse_status_groups(&text))
}

fn parse_status_groups(status: &str) -> Vec<u32> {
    let mut gids = Vec::new();
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("Gid:") {
            // Real, effective, saved, filesystem: the real and effective ones both count.
            gids.extend(rest.split_whitespace().take(2).filter_map(|g| g.parse::<u32>().ok()));
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            gids.extend(rest.split_whitespace().filter_map(|g| g.parse::<u32>().ok()));
        }
    }
    gids.sort_unstable();
    gids.dedup();
    gids
}

/// Groups of user `uid` from the user database (for D-Bus callers, where only the uid is known).
pub fn user_groups(uid: u32) -> Vec<u32> {
    use nix::unistd::{User, getgrouplist};
    let Ok(Some(user)) = User::from_uid(uid.into()) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return vec![user.gid.as_raw()];
    };
    match getgrouplist(&name, user.gid) {
        Ok(groups) => groups.into_iter().map(|g| g.as_raw()).collect(),
        Err(_) => vec![user.gid.as_raw()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let s = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 998 \n";
        assert_eq!(parse_status_groups(s), vec![4, 24, 27, 998, 1000]);
    }

    #[test]
    fn rule() {
        let a = Authorizer { daemon_uid: 990, group_gid: Some(998), group_name: "llmd".into() };
        let c = |uid, gids: Vec<u32>| Caller { uid, gids, pid: None, transport: "socket" };
        assert!(a.allows(&c(0, vec![])));
        assert!(a.allows(&c(990, vec![])));
        assert!(a.allows(&c(1000, vec![1000, 998])));
        assert!(!a.allows(&c(65534, vec![65534])));
        let none = Authorizer { group_gid: None, ..a };
        assert!(!none.allows(&c(1000, vec![998])));
        assert!(none.denial(&c(1000, vec![]), "load").contains("uid 1000"));
    }

    #[test]
    fn own_process_groups() {
        let gids = proc_groups(Path::new("/proc"), std::process::id()).unwrap();
        assert!(gids.contains(&nix::unistd::getgid().as_raw()));
    }
}
