//! Parsing and validation of model references, revisions and repository file paths.
//!
//! Everything here ends up as a path component of the cache or of a URL, so the rules are strict:
//! no `..`, no absolute names, only the characters the hubs themselves allow.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// A model hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hub {
    /// Hugging Face (`hf:`), or a mirror of it through `HF_ENDPOINT`.
    HuggingFace,
    /// ModelScope (`ms:`).
    ModelScope,
}

impl Hub {
    /// The prefix used in model references and in [`llmd_proto::StoredModel::source`].
    pub fn prefix(self) -> &'static str {
        match self {
            Hub::HuggingFace => "hf",
            Hub::ModelScope => "ms",
        }
    }

    /// The revision used when none is given.
    pub fn default_revision(self) -> &'static str {
        match self {
            Hub::HuggingFace => "main",
            Hub::ModelScope => "master",
        }
    }

    /// Parses `hf`/`huggingface` or `ms`/`modelscope` (the `storage.default_hub` setting).
    pub fn parse(s: &str) -> Result<Hub, StoreError> {
        match s {
            "hf" | "huggingface" => Ok(Hub::HuggingFace),
            "ms" | "modelscope" => Ok(Hub::ModelScope),
            other => Err(StoreError::InvalidRef(format!("unknown hub `{other}`: expected `hf` or `ms`"))),
        }
    }
}

/// A repository on a hub, with an optional revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoRef {
    pub hub: Hub,
    /// `org/name` (Hugging Face also has a few legacy ids without an org, e.g. `gpt2`).
    pub repo: String,
    pub revision: Option<String>,
}

impl RepoRef {
    /// The requested revision or the hub's default branch.
    pub fn revision_or_default(&self) -> &str {
        self.revision.as_deref().unwrap_or(self.hub.default_revision())
    }

    /// `hf:org/name`, the id used by `llmctl list`/`rm`.
    pub fn id(&self) -> String {
        format!("{}:{}", self.hub.prefix(), self.repo)
    }
}

impl fmt::Display for RepoRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.hub.prefix(), self.repo)?;
        if let Some(rev) = &self.revision {
            write!(f, "@{rev}")?;
        }
        Ok(())
    }
}

/// What a `source` string names: a repository on a hub or a folder on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    Hub(RepoRef),
    /// A folder path: absolute, or relative starting with `./` or `../`.
    Local(PathBuf),
}

impl ModelRef {
    /// Parses `hf:org/name[@rev]`, `ms:org/name[@rev]`, a bare `org/name[@rev]` (on Hugging
    /// Face) or a folder path (absolute, or starting with `./` or `../`; `~` is not expanded).
    pub fn parse(source: &str) -> Result<ModelRef, StoreError> {
        ModelRef::parse_with_hub(source, Hub::HuggingFace)
    }

    /// [`ModelRef::parse`] with the hub a bare `org/name` means (`storage.default_hub`).
    pub fn parse_with_hub(source: &str, default_hub: Hub) -> Result<ModelRef, StoreError> {
        let source = source.trim();
        if source.is_empty() {
            return Err(StoreError::InvalidRef("the model source is empty".into()));
        }
        if source.starts_with('/') || source.starts_with("./") || source.starts_with("../") {
            if source.contains('\0') {
                return Err(StoreError::InvalidRef("the folder path contains a NUL byte".into()));
            }
            return Ok(ModelRef::Local(PathBuf::from(source)));
        }
        let (hub, rest) = if let Some(rest) = source.strip_prefix("hf:") {
            (Hub::HuggingFace, rest)
        } else if let Some(rest) = source.strip_prefix("ms:") {
            (Hub::ModelScope, rest)
        } else {
            (default_hub, source)
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((repo, rev)) => (repo, Some(rev)),
            None => (rest, None),
        };
        validate_repo_id(hub, repo)?;
        if let Some(rev) = revision {
            validate_revision(rev)?;
        }
        Ok(ModelRef::Hub(RepoRef { hub, repo: repo.to_string(), revision: revision.map(str::to_string) }))
    }
}

/// Checks a repository id: one or two segments (`org/name`; ModelScope always needs the org)
/// of `[A-Za-z0-9._-]`, at most 96 characters each, no `..`/`--` (they would break the cache
/// folder names) and no leading or trailing `.`/`-`.
pub fn validate_repo_id(hub: Hub, repo: &str) -> Result<(), StoreError> {
    let bad = |why: &str| Err(StoreError::InvalidRef(format!("repository id `{repo}` {why}")));
    if repo.is_empty() {
        return bad("is empty");
    }
    if repo.starts_with('/') || repo.starts_with('\\') {
        return bad("is an absolute path; expected `org/name`");
    }
    if repo.contains("..") {
        return bad("contains `..`");
    }
    if repo.contains("--") {
        return bad("contains `--`, which the cache layout reserves as a separator");
    }
    let segments: Vec<&str> = repo.split('/').collect();
    let allowed = match hub {
        Hub::HuggingFace => 1..=2,
        Hub::ModelScope => 2..=2,
    };
    if !allowed.contains(&segments.len()) {
        return bad("must have the form `org/name`");
    }
    for seg in segments {
        if seg.is_empty() || seg.len() > 96 {
            return bad("has an empty or over-long (>96) segment");
        }
        if let Some(c) = seg.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return bad(&format!("contains the character {c:?}; only letters, digits, `.`, `_` and `-` are allowed"));
        }
        if seg.starts_with(['.', '-']) || seg.ends_with(['.', '-']) {
            return bad("has a segment starting or ending with `.` or `-`");
        }
    }
    Ok(())
}

/// Checks a revision: a branch, tag or commit of `[A-Za-z0-9._/-]` (so `refs/pr/1` works), at
/// most 200 characters, no `..`, no empty segment, not absolute.
pub fn validate_revision(rev: &str) -> Result<(), StoreError> {
    let bad = |why: &str| Err(StoreError::InvalidRef(format!("revision `{rev}` {why}")));
    if rev.is_empty() || rev.len() > 200 {
        return bad("is empty or longer than 200 characters");
    }
    if rev.starts_with('/') || rev.ends_with('/') || rev.contains("//") {
        return bad("has an empty path segment or is absolute");
    }
    if rev.contains("..") {
        return bad("contains `..`");
    }
    if let Some(c) = rev.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))) {
        return bad(&format!("contains the character {c:?}"));
    }
    if rev.split('/').any(|s| s == ".") {
        return bad("contains a `.` segment");
    }
    Ok(())
}

/// Checks a file path from a hub's listing before it becomes a path under the snapshot folder:
/// relative, `/`-separated, no `.`/`..`/empty segments, no backslash or control characters.
/// A hub that sends anything else is misbehaving (or malicious), so this is a protocol error.
pub fn validate_repo_file_path(path: &str) -> Result<(), StoreError> {
    let bad = |why: &str| Err(StoreError::Protocol(format!("the hub listed an unsafe file name {path:?}: {why}")));
    if path.is_empty() || path.len() > 1024 {
        return bad("empty or longer than 1024 bytes");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    if path.contains('\\') || path.chars().any(char::is_control) {
        return bad("backslash or control character");
    }
    for seg in path.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, `.` or `..` path segment");
        }
    }
    Ok(())
}

/// Checks a commit id from the hub (it becomes a folder name): 40 (git SHA-1) or 64 (SHA-256)
/// lowercase or uppercase hex digits.
pub fn validate_commit(commit: &str) -> Result<(), StoreError> {
    if matches!(commit.len(), 40 | 64) && commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(StoreError::Protocol(format!("the hub returned a malformed commit id {commit:?}")))
    }
}

/// Checks an ETag (it becomes a blob file name): 1 to 128 of `[A-Za-z0-9_-]`.
pub fn validate_etag(etag: &str) -> Result<(), StoreError> {
    if !etag.is_empty()
        && etag.len() <= 128
        && etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(StoreError::Protocol(format!("the hub returned an unusable ETag {etag:?}")))
    }
}

/// Whether a revision string is already a full commit id.
pub(crate) fn is_commit_id(rev: &str) -> bool {
    rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(s: &str) -> RepoRef {
        match ModelRef::parse(s).unwrap() {
            ModelRef::Hub(r) => r,
            ModelRef::Local(p) => panic!("parsed {s} as local {p:?}"),
        }
    }

    #[test]
    fn parses_hub_references() {
        let r = hub("hf:Qwen/Qwen2.5-0.5B-Instruct@main");
        assert_eq!(
            (r.hub, r.repo.as_str(), r.revision.as_deref()),
            (Hub::HuggingFace, "Qwen/Qwen2.5-0.5B-Instruct", Some("main"))
        );
        let r = hub("ms:qwen/Qwen2.5-7B");
        assert_eq!((r.hub, r.revision_or_default()), (Hub::ModelScope, "master"));
        let r = hub("org/name@refs/pr/3");
        assert_eq!((r.hub, r.revision.as_deref()), (Hub::HuggingFace, Some("refs/pr/3")));
        assert_eq!(hub("gpt2").repo, "gpt2");
        assert_eq!(r.to_string(), "hf:org/name@refs/pr/3");
        match ModelRef::parse_with_hub("org/name", Hub::ModelScope).unwrap() {
            ModelRef::Hub(r) => assert_eq!(r.hub, Hub::ModelScope),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_local_folders() {
        assert_eq!(ModelRef::parse("/srv/models/x").unwrap(), ModelRef::Local("/srv/models/x".into()));
        assert_eq!(ModelRef::parse("./x").unwrap(), ModelRef::Local("./x".into()));
    }

    #[test]
    fn rejects_bad_references_with_a_reason() {
        for (s, needle) in [
            ("hf:../etc/passwd", "`..`"),
            ("hf:org/../x", "`..`"),
            ("hf:/etc/passwd", "absolute"),
            ("ms:name-only", "org/name"),
            ("hf:a/b/c", "org/name"),
            ("hf:org/na me", "' '"),
            ("hf:org/name@../../x", "`..`"),
            ("hf:org/name@main;rm", "';'"),
            ("hf:org--x/name", "`--`"),
            ("hf:org/.hidden", "starting or ending"),
            ("", "empty"),
            ("hf:org/name@", "empty"),
        ] {
            let err = ModelRef::parse(s).unwrap_err().to_string();
            assert!(err.contains(needle), "{s:?}: {err}");
        }
    }

    #[test]
    fn file_paths_from_listings_are_checked() {
        for ok in ["config.json", "original/params.json", "a/b/c.safetensors", ".gitattributes"] {
            validate_repo_file_path(ok).unwrap();
        }
        for bad in ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", "a\\b", "", "x\n"] {
            assert!(validate_repo_file_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_etag("../blob").is_err());
        assert!(validate_commit("not-a-commit").is_err());
        validate_commit(&"a".repeat(40)).unwrap();
    }
}
