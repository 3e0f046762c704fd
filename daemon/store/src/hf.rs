//! The Hugging Face Hub protocol, as huggingface_hub speaks it.
//!
//! - `GET {endpoint}/api/models/{repo}/revision/{rev}` → `{"sha": <commit>}`
//! - `GET {endpoint}/api/models/{repo}/tree/{commit}?recursive=true` → a JSON array of entries
//!   (`type`, `path`, `size`, `oid` = git blob SHA-1, `lfs.oid` = SHA-256), paginated through
//!   `Link: <next>; rel="next"`
//! - `{endpoint}/{repo}/resolve/{commit}/{path}`: the file; LFS files redirect to a CDN host.
//!   `HEAD` without following redirects gives `X-Repo-Commit`, `ETag`, `X-Linked-Etag`,
//!   `X-Linked-Size`; used only when the tree lacks an entry's oid.
//! - errors: `X-Error-Code` (`RepoNotFound`, `GatedRepo`, `RevisionNotFound`, `EntryNotFound`),
//!   else 401/403 (gated or private) and 404.

use reqwest::header::{AUTHORIZATION, HeaderMap, LINK};
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::StoreError;
use crate::http::{Http, excerpt};
use crate::model_ref::{validate_commit, validate_etag, validate_repo_file_path};
use crate::remote::{Expected, RemoteFile};

/// A Hugging Face endpoint (the hub or a mirror) with the token to send.
#[derive(Debug, Clone)]
pub(crate) struct HfApi<'a> {
    pub http: &'a Http,
    pub endpoint: &'a Url,
    pub token: Option<&'a str>,
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    oid: Option<String>,
    #[serde(default)]
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    oid: String,
    #[serde(default)]
    size: Option<u64>,
}

impl<'a> HfApi<'a> {
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        {
            // Infallible for http(s) endpoints, which `StoreConfig` validated.
            if let Ok(mut path) = url.path_segments_mut() {
                path.pop_if_empty();
                for s in segments {
                    // `push` percent-encodes, so `refs/pr/1` becomes one `refs%2Fpr%2F1` segment.
                    path.push(s);
                }
            }
        }
        url
    }

    fn get(&self, client: &reqwest::Client, url: &Url) -> reqwest::RequestBuilder {
        let req = client.get(url.clone());
        match self.token {
            Some(t) => req.header(AUTHORIZATION, format!("Bearer {t}")),
            None => req,
        }
    }

    /// Maps a failed status to an error a person can act on.
    pub fn status_error(
        &self,
        repo: &str,
        what: &str,
        status: StatusCode,
        headers: &HeaderMap,
        body: String,
    ) -> StoreError {
        let code = headers.get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("");
        let token_hint = if self.token.is_some() {
            "the configured HF token was refused or has no access to it"
        } else {
            "set HF_TOKEN (or run `huggingface-cli login`) with a token that has access"
        };
        match (code, status.as_u16()) {
            ("GatedRepo", _) => StoreError::Gated(format!(
                "`{repo}` is a gated repository: accept its terms at {}/{repo} and {token_hint}",
                self.endpoint.as_str().trim_end_matches('/')
            )),
            ("RepoNotFound", _) => StoreError::NotFound(format!(
                "repository `{repo}` not found on {} (if it is private, {token_hint})",
                self.endpoint
            )),
            ("RevisionNotFound", _) => StoreError::NotFound(format!("{what} of `{repo}`: revision not found")),
            ("EntryNotFound", _) => StoreError::NotFound(format!("{what} of `{repo}`: file not found")),
            (_, 401 | 403) => StoreError::Gated(format!(
                "access to `{repo}` was refused (HTTP {}): it is gated or private; {token_hint}",
                status.as_u16()
            )),
            (_, 404) => StoreError::NotFound(format!("{what} of `{repo}` not found on {}", self.endpoint)),
            _ => StoreError::Http { url: what.to_string(), status: status.as_u16(), detail: excerpt(&body) },
        }
    }

    /// Resolves a branch, tag or commit to the commit id.
    pub async fn resolve_revision(&self, repo: &str, revision: &str) -> Result<String, StoreError> {
        let url = self.url(&["api", "models"]).join_segments(repo, &["revision", revision]);
        let what = format!("revision `{revision}`");
        let resp = self
            .http
            .send(url.as_str(), || self.get(&self.http.follow, &url), |s, h, b| self.status_error(repo, &what, s, h, b))
            .await?;
        let info: RevisionInfo =
            resp.json().await.map_err(|e| StoreError::Protocol(format!("revision info of `{repo}`: {e}")))?;
        validate_commit(&info.sha)?;
        Ok(info.sha.to_ascii_lowercase())
    }

    /// Lists every file of the repository at `commit`, following the pagination links.
    pub async fn list_files(&self, repo: &str, commit: &str) -> Result<Vec<RemoteFile>, StoreError> {
        let mut url = self.url(&["api", "models"]).join_segments(repo, &["tree", commit]);
        url.query_pairs_mut().append_pair("recursive", "true");
        let mut files = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            if pages > 10_000 {
                return Err(StoreError::Protocol(format!("the file listing of `{repo}` does not end")));
            }
            let resp = self
                .http
                .send(
                    url.as_str(),
                    || self.get(&self.http.follow, &url),
                    |s, h, b| self.status_error(repo, "file listing", s, h, b),
                )
                .await?;
            let next = next_link(resp.headers(), &url)?;
            let entries: Vec<TreeEntry> =
                resp.json().await.map_err(|e| StoreError::Protocol(format!("file listing of `{repo}`: {e}")))?;
            for e in entries {
                if e.kind != "file" {
                    continue;
                }
                validate_repo_file_path(&e.path)?;
                let (etag, expected, size) = match e.lfs {
                    Some(lfs) => {
                        let oid = lfs.oid.to_ascii_lowercase();
                        (Some(oid.clone()), Some(Expected::Sha256(oid)), lfs.size.or(e.size))
                    }
                    None => match e.oid {
                        Some(oid) => {
                            let oid = oid.to_ascii_lowercase();
                            (Some(oid.clone()), Some(Expected::GitSha1(oid)), e.size)
                        }
                        None => (None, None, e.size),
                    },
                };
                if let Some(etag) = &etag {
                    validate_etag(etag)?;
                }
                let file_url = self.url(&[]).join_segments(repo, &["resolve", commit]).join_path(&e.path);
                files.push(RemoteFile { path: e.path, size, etag, expected, url: file_url.to_string() });
            }
            match next {
                Some(n) => url = n,
                None => break,
            }
        }
        Ok(files)
    }

    /// `HEAD` on the file's resolve URL (no redirects) for its ETag and size, when the tree
    /// listing did not carry them.
    pub async fn head_file(&self, repo: &str, commit: &str, file: &mut RemoteFile) -> Result<(), StoreError> {
        let url = Url::parse(&file.url).map_err(|e| StoreError::Protocol(format!("bad file URL: {e}")))?;
        let what = format!("`{}`", file.path);
        let resp = self
            .http
            .send(
                url.as_str(),
                || {
                    let req = self.http.no_follow.head(url.clone());
                    match self.token {
                        Some(t) => req.header(AUTHORIZATION, format!("Bearer {t}")),
                        None => req,
                    }
                },
                |s, h, b| self.status_error(repo, &what, s, h, b),
            )
            .await?;
        let h = resp.headers();
        let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        if let Some(c) = header("x-repo-commit")
            && !c.eq_ignore_ascii_case(commit)
        {
            return Err(StoreError::Protocol(format!("{what}: X-Repo-Commit {c} differs from the resolved {commit}")));
        }
        let etag = header("x-linked-etag")
            .or_else(|| header("etag"))
            .map(|e| normalize_etag(&e))
            .ok_or_else(|| StoreError::Protocol(format!("{what}: no ETag in the HEAD answer")))?;
        validate_etag(&etag)?;
        let size = header("x-linked-size").or_else(|| header("content-length")).and_then(|s| s.parse().ok());
        file.expected = match etag.len() {
            64 if etag.bytes().all(|b| b.is_ascii_hexdigit()) => Some(Expected::Sha256(etag.to_ascii_lowercase())),
            40 if etag.bytes().all(|b| b.is_ascii_hexdigit()) => Some(Expected::GitSha1(etag.to_ascii_lowercase())),
            _ => None,
        };
        file.etag = Some(etag);
        file.size = file.size.or(size);
        Ok(())
    }
}

/// `"abc"` / `W/"abc"` → `abc`.
pub(crate) fn normalize_etag(raw: &str) -> String {
    raw.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// The `rel="next"` target of a `Link` header, only when it stays on the listing's origin, so a
/// hostile page cannot send the token elsewhere.
fn next_link(headers: &HeaderMap, current: &Url) -> Result<Option<Url>, StoreError> {
    let Some(link) = headers.get(LINK).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    for part in link.split(',') {
        let mut pieces = part.split(';');
        let target = pieces.next().unwrap_or("").trim();
        if !pieces.any(|p| p.trim().replace(' ', "") == "rel=\"next\"") {
            continue;
        }
        let target = target.trim_start_matches('<').trim_end_matches('>');
        let url = current.join(target).map_err(|e| StoreError::Protocol(format!("bad pagination link: {e}")))?;
        if url.origin() != current.origin() {
            return Err(StoreError::Protocol(format!("pagination link to another host: {url}")));
        }
        return Ok(Some(url));
    }
    Ok(None)
}

/// Appending path pieces to URLs.
trait UrlExt {
    /// Pushes the `/`-separated segments of `repo` (kept as separate segments), then `rest`
    /// (each one segment, percent-encoded).
    fn join_segments(self, repo: &str, rest: &[&str]) -> Url;
    /// Pushes each `/`-separated segment of a repository file path.
    fn join_path(self, path: &str) -> Url;
}

impl UrlExt for Url {
    fn join_segments(mut self, repo: &str, rest: &[&str]) -> Url {
        if let Ok(mut p) = self.path_segments_mut() {
            p.pop_if_empty();
            p.extend(repo.split('/'));
            p.extend(rest);
        }
        self
    }

    fn join_path(mut self, path: &str) -> Url {
        if let Ok(mut p) = self.path_segments_mut() {
            p.pop_if_empty();
            p.extend(path.split('/'));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_revisions_as_one_segment() {
        let http = Http::new(Default::default()).unwrap();
        let endpoint = Url::parse("https://hf-mirror.com/").unwrap();
        let api = HfApi { http: &http, endpoint: &endpoint, token: None };
        let url = api.url(&["api", "models"]).join_segments("org/name", &["revision", "refs/pr/1"]);
        assert_eq!(url.as_str(), "https://hf-mirror.com/api/models/org/name/revision/refs%2Fpr%2F1");
        let url = api.url(&[]).join_segments("org/name", &["resolve", "abc"]).join_path("sub dir/x.json");
        assert_eq!(url.as_str(), "https://hf-mirror.com/org/name/resolve/abc/sub%20dir/x.json");
    }

    #[test]
    fn pagination_link_stays_on_origin() {
        let cur = Url::parse("http://127.0.0.1:5/api/models/a/b/tree/c?recursive=true").unwrap();
        let mut h = HeaderMap::new();
        h.insert(LINK, "<http://127.0.0.1:5/api/models/a/b/tree/c?cursor=2>; rel=\"next\"".parse().unwrap());
        assert_eq!(next_link(&h, &cur).unwrap().unwrap().query(), Some("cursor=2"));
        h.insert(LINK, "<http://evil.example/x>; rel=\"next\"".parse().unwrap());
        assert!(next_link(&h, &cur).is_err());
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }
}
