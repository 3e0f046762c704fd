//! Free-space check before a download.

use std::path::Path;

use crate::StoreError;

/// Extra space kept free besides the 5% margin, by default.
pub const DEFAULT_DISK_RESERVE: u64 = 1 << 30;

/// Bytes that must be free to download `missing` more bytes: 5% margin plus `reserve`.
pub fn required_free_bytes(missing: u64, reserve: u64) -> u64 {
    missing.saturating_add(missing / 20).saturating_add(reserve)
}

/// Refuses, with the numbers, when `free` bytes are not enough for `missing` more bytes.
/// Pure so that the rule is testable without filling a disk.
pub fn check_disk_space(path: &Path, missing: u64, free: u64, reserve: u64) -> Result<(), StoreError> {
    let needed = required_free_bytes(missing, reserve);
    if missing > 0 && free < needed {
        return Err(StoreError::InsufficientDisk { path: path.to_path_buf(), missing, needed, free, reserve });
    }
    Ok(())
}

/// Free bytes for an unprivileged writer on the filesystem holding `path` (or its nearest
/// existing ancestor, since the cache folder may not exist yet).
pub fn free_bytes(path: &Path) -> Result<u64, StoreError> {
    let mut probe = path;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    let st = nix::sys::statvfs::statvfs(probe).map_err(|e| StoreError::io(probe, std::io::Error::from(e)))?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_and_reserve_are_required() {
        let gib = 1u64 << 30;
        assert_eq!(required_free_bytes(20 * gib, gib), 22 * gib);
        check_disk_space(Path::new("/m"), 20 * gib, 22 * gib, gib).unwrap();
        let err = check_disk_space(Path::new("/m"), 20 * gib, 22 * gib - 1, gib).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&(20 * gib).to_string()) && msg.contains(&(22 * gib - 1).to_string()), "{msg}");
        assert_eq!(err.code(), llmd_proto::ErrorCode::InsufficientResources);
        // Nothing to download needs no space.
        check_disk_space(Path::new("/m"), 0, 0, gib).unwrap();
    }

    #[test]
    fn free_bytes_walks_up_to_an_existing_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(&dir.path().join("not/yet/there")).unwrap() > 0);
    }
}
