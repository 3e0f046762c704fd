//! The ModelScope protocol, as modelscope's `snapshot_download` speaks it.
//!
//! - `GET {endpoint}/api/v1/models/{org}/{name}/repo/files?Revision={rev}&Recursive=true` →
//!   `{"Code": 200, "Data": {"Files": [{"Path", "Type": "blob"|"tree", "Size", "Sha256", "Revision"}]}}`
//! - `GET {endpoint}/api/v1/models/{org}/{name}/repo?Revision={rev}&FilePath={path}`: the file.
//!
//! The endpoint comes from `MODELSCOPE_DOMAIN` (see [`modelscope_endpoint_from_domain`]).

use reqwest::header::HeaderMap;
use reqwest::{StatusCode, Url};
use serde::Deserialize;

use crate::StoreError;
use crate::http::{Http, excerpt};
use crate::model_ref::validate_repo_file_path;
use crate::remote::{Expected, RemoteFile};

/// The default ModelScope endpoint.
pub const DEFAULT_MODELSCOPE_ENDPOINT: &str = "https://www.modelscope.cn";

/// Turns `MODELSCOPE_DOMAIN` (`www.modelscope.cn`, or a full `http(s)://` URL) into an endpoint
/// URL, the way modelscope's `get_endpoint` does (https unless a scheme is given).
pub fn modelscope_endpoint_from_domain(domain: &str) -> String {
    let d = domain.trim().trim_end_matches('/');
    if d.starts_with("http://") || d.starts_with("https://") { d.to_string() } else { format!("https://{d}") }
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "Code", default)]
    code: Option<i64>,
    #[serde(rename = "Message", default)]
    message: Option<String>,
    #[serde(rename = "Data", default)]
    data: Option<FilesData>,
}

#[derive(Deserialize)]
struct FilesData {
    #[serde(rename = "Files", default)]
    files: Vec<MsFile>,
}

#[derive(Deserialize)]
struct MsFile {
    #[serde(rename = "Path")]
    path: String,
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Size", default)]
    size: Option<u64>,
    #[serde(rename = "Sha256", default)]
    sha256: Option<String>,
    #[serde(rename = "Revision", default)]
    revision: Option<String>,
}

/// A ModelScope endpoint.
#[derive(Debug, Clone)]
pub(crate) struct MsApi<'a> {
    pub http: &'a Http,
    pub endpoint: &'a Url,
}

/// The listing of a repository: files, and the commit they belong to when the hub says.
pub(crate) struct MsListing {
    pub files: Vec<RemoteFile>,
    pub commit: Option<String>,
}

impl<'a> MsApi<'a> {
    fn repo_url(&self, repo: &str, tail: &[&str]) -> Url {
        let mut url = self.endpoint.clone();
        if let Ok(mut p) = url.path_segments_mut() {
            p.pop_if_empty();
            p.extend(["api", "v1", "models"]);
            p.extend(repo.split('/'));
            p.extend(tail);
        }
        url
    }

    fn status_error(&self, repo: &str, what: &str, status: StatusCode, body: String) -> StoreError {
        match status.as_u16() {
            401 | 403 => StoreError::Gated(format!(
                "ModelScope refused access to `{repo}` (HTTP {}): it is private or needs its terms accepted \
                 (log in with `modelscope login` and give llmd the token)",
                status.as_u16()
            )),
            404 => StoreError::NotFound(format!("{what} of `{repo}` not found on {}", self.endpoint)),
            s => StoreError::Http { url: what.to_string(), status: s, detail: excerpt(&body) },
        }
    }

    /// Lists every file of the repository at `revision`.
    pub async fn list_files(&self, repo: &str, revision: &str) -> Result<MsListing, StoreError> {
        let mut url = self.repo_url(repo, &["repo", "files"]);
        url.query_pairs_mut().append_pair("Revision", revision).append_pair("Recursive", "true");
        let resp = self
            .http
            .send(
                url.as_str(),
                || self.http.follow.get(url.clone()),
                |s, _h: &HeaderMap, b| self.status_error(repo, "file listing", s, b),
            )
            .await?;
        let env: Envelope =
            resp.json().await.map_err(|e| StoreError::Protocol(format!("file listing of `{repo}`: {e}")))?;
        // ModelScope answers some errors with HTTP 200 and a JSON code.
        match env.code {
            Some(200) | None => {}
            Some(404) => {
                return Err(StoreError::NotFound(format!(
                    "`{repo}` (revision `{revision}`) not found on {}: {}",
                    self.endpoint,
                    env.message.unwrap_or_default()
                )));
            }
            Some(c) => {
                return Err(StoreError::Protocol(format!(
                    "file listing of `{repo}`: code {c}: {}",
                    env.message.unwrap_or_default()
                )));
            }
        }
        let data = env.data.ok_or_else(|| StoreError::Protocol(format!("file listing of `{repo}` has no Data")))?;
        let mut commit = None;
        let mut files = Vec::new();
        for f in data.files {
            if f.kind == "tree" {
                continue;
            }
            validate_repo_file_path(&f.path)?;
            if commit.is_none() {
                commit = f.revision.clone().filter(|r| !r.is_empty());
            }
            let mut url = self.repo_url(repo, &["repo"]);
            url.query_pairs_mut().append_pair("Revision", revision).append_pair("FilePath", &f.path);
            let expected = f
                .sha256
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(|h| Expected::Sha256(h.to_ascii_lowercase()));
            files.push(RemoteFile { path: f.path, size: f.size, etag: None, expected, url: url.to_string() });
        }
        Ok(MsListing { files, commit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_becomes_endpoint() {
        assert_eq!(modelscope_endpoint_from_domain("www.modelscope.cn"), "https://www.modelscope.cn");
        assert_eq!(modelscope_endpoint_from_domain("http://127.0.0.1:9/"), "http://127.0.0.1:9");
    }
}
