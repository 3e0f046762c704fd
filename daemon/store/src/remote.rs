//! What a hub's listing says about one file.

/// The checksum a downloaded file must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expected {
    /// Hex SHA-256 of the content (LFS files on Hugging Face, every file on ModelScope).
    Sha256(String),
    /// Hex git blob SHA-1: SHA-1 of `blob {size}\0` followed by the content (small files on Hugging Face).
    GitSha1(String),
}

impl Expected {
    pub fn algo(&self) -> &'static str {
        match self {
            Expected::Sha256(_) => "sha256",
            Expected::GitSha1(_) => "git-sha1",
        }
    }

    pub fn hex(&self) -> &str {
        match self {
            Expected::Sha256(h) | Expected::GitSha1(h) => h,
        }
    }
}

/// One file of a repository at a fixed revision.
#[derive(Debug, Clone)]
pub(crate) struct RemoteFile {
    /// Path inside the repository, already checked by `validate_repo_file_path`.
    pub path: String,
    pub size: Option<u64>,
    /// Blob name in the Hugging Face cache (the hub's ETag); `None` on ModelScope.
    pub etag: Option<String>,
    pub expected: Option<Expected>,
    /// Where to `GET` it.
    pub url: String,
}
