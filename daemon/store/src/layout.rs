//! On-disk cache layouts, shared with the hubs' own tools.
//!
//! **Hugging Face** (huggingface_hub's layout, so `huggingface-cli download` caches are reused
//! and vice versa):
//! ```text
//! <hf cache>/models--org--name/
//!     blobs/<etag>                  verified content (ETag = sha256 for LFS, git sha1 otherwise)
//!     blobs/<etag>.incomplete       a download in progress (resumed with Range)
//!     snapshots/<commit>/<path>     relative symlink → ../../blobs/<etag>
//!     refs/<revision>               the commit a branch or tag pointed to
//!     .llmd/<commit>.json           llmd's record: complete or not, which files
//! <hf cache>/.locks/models--org--name/<etag>.lock   flock held while a blob downloads
//! ```
//! A snapshot with an llmd record is complete only when the record says so; one without (made
//! by another tool) counts as complete when it is non-empty and no symlink dangles.
//!
//! **ModelScope** (modelscope's `snapshot_download` layout):
//! ```text
//! <ms cache>/models/<org>/<name>/<path>      the files themselves
//! <ms cache>/models/<org>/<name>/._____temp/ downloads in progress
//! <ms cache>/models/<org>/<name>/.llmd.json  llmd's record
//! ```
//! Recent modelscope versions write names with every `.` replaced by `___`
//! (`Qwen2.5-7B` → `Qwen2___5-7B`) so the folder is importable as Python code. llmd writes that
//! form too, and reads either form, preferring the `___` one when both exist.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::StoreError;
use crate::error::IoContext;

/// llmd's record of a snapshot (Hugging Face) or model folder (ModelScope).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Record {
    /// `org/name`.
    pub repo: String,
    /// The revision asked for (branch, tag or commit).
    pub revision: Option<String>,
    pub commit: Option<String>,
    /// True once every listed file is verified and in place.
    pub complete: bool,
    /// Path in the repository → its size and checksum.
    pub files: BTreeMap<String, RecordFile>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RecordFile {
    pub size: Option<u64>,
    /// `sha256:<hex>` or `git-sha1:<hex>`.
    pub hash: Option<String>,
}

pub(crate) fn read_record(path: &Path) -> Option<Record> {
    let text = fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Writes a file so that readers see either the old or the new content, never a mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).at(parent)?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).at(&tmp)?;
    f.write_all(bytes).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    drop(f);
    fs::rename(&tmp, path).at(path)
}

pub(crate) fn write_record(path: &Path, record: &Record) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Protocol(e.to_string()))?;
    write_atomic(path, &json)
}

/// A repository's folder in the Hugging Face cache.
#[derive(Debug, Clone)]
pub(crate) struct HfRepoDir {
    pub cache: PathBuf,
    pub root: PathBuf,
    pub folder: String,
}

impl HfRepoDir {
    pub fn new(cache: &Path, repo: &str) -> HfRepoDir {
        let folder = format!("models--{}", repo.replace('/', "--"));
        HfRepoDir { cache: cache.to_path_buf(), root: cache.join(&folder), folder }
    }

    /// The repo id a `models--org--name` folder stands for.
    pub fn repo_of_folder(folder: &str) -> Option<String> {
        folder.strip_prefix("models--").map(|r| r.replace("--", "/"))
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.root.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn lock(&self, etag: &str) -> PathBuf {
        self.cache.join(".locks").join(&self.folder).join(format!("{etag}.lock"))
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.root.join("snapshots").join(commit)
    }

    pub fn record_path(&self, commit: &str) -> PathBuf {
        self.root.join(".llmd").join(format!("{commit}.json"))
    }

    pub fn read_ref(&self, revision: &str) -> Option<String> {
        let s = fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let s = s.trim();
        crate::model_ref::validate_commit(s).ok().map(|()| s.to_string())
    }

    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), StoreError> {
        write_atomic(&self.root.join("refs").join(revision), commit.as_bytes())
    }

    /// The commit a revision names locally: itself when it is a commit with a snapshot, else
    /// what `refs/<revision>` says.
    pub fn local_commit(&self, revision: &str) -> Option<String> {
        if crate::model_ref::is_commit_id(revision) && self.snapshot(revision).is_dir() {
            return Some(revision.to_ascii_lowercase());
        }
        self.read_ref(revision)
    }

    /// Points `snapshots/<commit>/<path>` at `blobs/<etag>` with a relative symlink, replacing
    /// whatever was there (atomically, through a temporary link and a rename).
    pub fn link(&self, commit: &str, path: &str, etag: &str) -> Result<(), StoreError> {
        let link = self.snapshot(commit).join(path);
        let parent = link.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).at(parent)?;
        let depth = path.split('/').count() - 1;
        let mut target = PathBuf::new();
        for _ in 0..depth + 2 {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        if fs::read_link(&link).is_ok_and(|t| t == target) {
            return Ok(());
        }
        let tmp = parent.join(format!(".{}.link-{}", etag, std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).at(&tmp)?;
        fs::rename(&tmp, &link).at(&link)
    }

    /// Whether a snapshot is complete (see the module doc).
    pub fn snapshot_complete(&self, commit: &str) -> bool {
        let snap = self.snapshot(commit);
        if !snap.is_dir() {
            return false;
        }
        match read_record(&self.record_path(commit)) {
            Some(r) => r.complete,
            None => {
                let files = walk_files(&snap);
                !files.is_empty() && files.iter().all(|f| f.exists())
            }
        }
    }

    /// Commits of the snapshots on disk.
    pub fn commits(&self) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.root.join("snapshots")) else { return Vec::new() };
        let mut v: Vec<String> =
            rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect();
        v.sort();
        v
    }

    /// Revision names (`refs/…`) pointing at `commit`.
    pub fn refs_to(&self, commit: &str) -> Vec<String> {
        let refs = self.root.join("refs");
        let mut out = Vec::new();
        for f in walk_files(&refs) {
            if fs::read_to_string(&f).is_ok_and(|c| c.trim() == commit)
                && let Ok(rel) = f.strip_prefix(&refs)
            {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
        out.sort_by_key(|r| (r != "main", r.clone()));
        out
    }

    /// Blob files (canonical paths) a snapshot's links resolve to.
    pub fn snapshot_blobs(&self, commit: &str) -> HashSet<PathBuf> {
        walk_files(&self.snapshot(commit)).into_iter().filter_map(|f| fs::canonicalize(f).ok()).collect()
    }
}

/// A model's folder in the ModelScope cache.
#[derive(Debug, Clone)]
pub(crate) struct MsModelDir {
    pub root: PathBuf,
}

impl MsModelDir {
    /// The folder for `org/name`: the existing one among the `___` and dotted spellings, else
    /// the `___` one (see the module doc).
    pub fn new(cache: &Path, repo: &str) -> MsModelDir {
        let (org, name) = repo.split_once('/').unwrap_or(("", repo));
        let base = cache.join("models").join(org);
        let escaped = base.join(name.replace('.', "___"));
        let dotted = base.join(name);
        let root = if !escaped.exists() && dotted.exists() { dotted } else { escaped };
        MsModelDir { root }
    }

    pub fn temp_dir(&self) -> PathBuf {
        self.root.join("._____temp")
    }

    pub fn incomplete(&self, path: &str) -> PathBuf {
        self.temp_dir().join(format!("{path}.incomplete"))
    }

    pub fn lock(&self, path: &str) -> PathBuf {
        self.temp_dir().join(format!("{path}.lock"))
    }

    pub fn file(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    pub fn record_path(&self) -> PathBuf {
        self.root.join(".llmd.json")
    }

    /// Whether the folder holds a complete model (see the module doc).
    pub fn complete(&self) -> bool {
        match read_record(&self.record_path()) {
            Some(r) => r.complete,
            None => self.root.join("config.json").is_file() && walk_files(&self.temp_dir()).is_empty(),
        }
    }

    /// Size of the model's files (not the temp folder or hidden bookkeeping files).
    pub fn size(&self) -> u64 {
        walk_files(&self.root)
            .iter()
            .filter(|f| {
                f.strip_prefix(&self.root)
                    .map(|rel| !rel.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.')))
                    .unwrap_or(false)
            })
            .filter_map(|f| fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Every non-directory entry under `dir`, recursively (symlinks are not followed into).
pub(crate) fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    out
}

/// Total size of the distinct files under `dir`, following symlinks (blobs shared by two links
/// count once).
pub(crate) fn size_following_links(dir: &Path) -> u64 {
    let mut seen = HashSet::new();
    walk_files(dir)
        .into_iter()
        .filter_map(|f| fs::canonicalize(&f).ok())
        .filter(|c| seen.insert(c.clone()))
        .filter_map(|c| fs::metadata(c).ok())
        .map(|m| m.len())
        .sum()
}

/// Bytes of every regular file under `dir` (not following links): what deleting it frees.
pub(crate) fn size_on_disk(dir: &Path) -> u64 {
    walk_files(dir)
        .into_iter()
        .filter_map(|f| fs::symlink_metadata(f).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// `architectures[0]` (or `model_type`) of a model folder's `config.json`.
pub(crate) fn architecture(dir: &Path) -> Option<String> {
    let text = fs::read(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    v.get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| v.get("model_type").and_then(|m| m.as_str()))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_links_are_relative_and_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let repo = HfRepoDir::new(dir.path(), "org/name");
        assert!(repo.root.ends_with("models--org--name"));
        assert_eq!(HfRepoDir::repo_of_folder("models--org--name").as_deref(), Some("org/name"));
        fs::create_dir_all(repo.root.join("blobs")).unwrap();
        fs::write(repo.blob("abc"), b"x").unwrap();
        let commit = "c".repeat(40);
        repo.link(&commit, "sub/dir/f.json", "abc").unwrap();
        let link = repo.snapshot(&commit).join("sub/dir/f.json");
        assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from("../../../../blobs/abc"));
        assert_eq!(fs::read(&link).unwrap(), b"x");
        // Foreign snapshot (no record): complete when nothing dangles.
        assert!(repo.snapshot_complete(&commit));
        repo.link(&commit, "g.json", "missing").unwrap();
        assert!(!repo.snapshot_complete(&commit));
    }

    #[test]
    fn ms_folder_prefers_existing_spelling() {
        let dir = tempfile::tempdir().unwrap();
        assert!(MsModelDir::new(dir.path(), "qwen/Qwen2.5-7B").root.ends_with("models/qwen/Qwen2___5-7B"));
        fs::create_dir_all(dir.path().join("models/qwen/Qwen2.5-7B")).unwrap();
        assert!(MsModelDir::new(dir.path(), "qwen/Qwen2.5-7B").root.ends_with("models/qwen/Qwen2.5-7B"));
    }
}
