//! llmd's model store: pulls models from Hugging Face and ModelScope into their own cache
//! layouts (so caches made by `huggingface-cli` and `modelscope` are reused and vice versa),
//! lists and removes them.
//!
//! Downloads resume from `.incomplete` files with `Range`, retry 429/5xx and dropped
//! connections with exponential backoff (honouring `Retry-After`), verify every file (SHA-256
//! for LFS and ModelScope files, git blob SHA-1 for small Hugging Face files) before an atomic
//! rename, and run several files at once. A model is listed as complete only once every file is
//! verified. Concurrent pulls of the same model and revision share one download.
//!
//! [`Store::pull_checked`] (and [`Store::resolve_for_load_checked`]) fetch a repository's
//! metadata files first (config.json, tokenizer files, chat templates: see
//! [`is_metadata_file`]) and hand a [`Manifest`] (those files plus the repository's listing
//! with sizes) to the caller's check before any weight file is requested, so a model the
//! daemon cannot serve costs a few kilobytes, not its weights. Until the whole model is there,
//! the snapshot is marked incomplete and is neither listed nor loaded.
//!
//! The daemon builds one [`Store`] from a [`StoreConfig`] (it reads `HF_ENDPOINT`, `HF_TOKEN`,
//! `HF_HUB_CACHE`, `HF_HUB_OFFLINE`, `MODELSCOPE_DOMAIN`…; this crate reads no environment) and
//! maps [`StoreError::code`] onto control-protocol errors.

mod disk;
mod download;
mod error;
mod hf;
mod http;
mod layout;
mod model_ref;
mod ms;
mod progress;
mod remote;
mod select;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use llmd_proto::{Progress, PullParams, StoredModel};
use parking_lot::Mutex;
use reqwest::Url;
use tokio::sync::{Semaphore, watch};

pub use disk::{DEFAULT_DISK_RESERVE, check_disk_space, free_bytes, required_free_bytes};
pub use error::StoreError;
pub use http::RetryPolicy;
pub use model_ref::{Hub, ModelRef, RepoRef, validate_repo_file_path, validate_repo_id, validate_revision};
pub use ms::{DEFAULT_MODELSCOPE_ENDPOINT, modelscope_endpoint_from_domain};
pub use select::{FileFilter, is_metadata_file, is_weight_file};

use crate::download::{FetchJob, blocking, hash_file};
use crate::error::IoContext;
use crate::hf::HfApi;
use crate::layout::{HfRepoDir, MsModelDir, RecordFile, read_record, write_record};
use crate::ms::MsApi;
use crate::progress::{FileTrack, TICK, Tracker};
use crate::remote::{Expected, RemoteFile};

/// The default Hugging Face endpoint.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// Reads a Hugging Face token file (`$HF_HOME/token`, as `huggingface-cli login` writes it);
/// `None` when it is missing or empty.
pub fn read_hf_token_file(path: &Path) -> Option<String> {
    let t = fs::read_to_string(path).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Where and how the store works. The daemon fills it from its config and environment.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// llmd's models folder (`storage.models_dir`).
    pub models_dir: PathBuf,
    /// Root of the Hugging Face cache (`HF_HUB_CACHE`, else `models_dir`): holds `models--org--name`.
    pub hf_cache_dir: PathBuf,
    /// Root of the ModelScope cache (`MODELSCOPE_CACHE`, else `models_dir`): holds `models/org/name`.
    pub modelscope_cache_dir: PathBuf,
    /// `HF_ENDPOINT`, e.g. `https://huggingface.co` or a mirror such as `https://hf-mirror.com`.
    pub hf_endpoint: String,
    /// ModelScope endpoint; see [`modelscope_endpoint_from_domain`] for `MODELSCOPE_DOMAIN`.
    pub modelscope_endpoint: String,
    /// `HF_TOKEN` or the token file's content; sent as `Authorization: Bearer` to the hub only.
    pub hf_token: Option<String>,
    /// Cache only (`storage.offline` / `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Files downloaded at once, over all pulls.
    pub max_concurrent_downloads: usize,
    /// Hub of a bare `org/name`.
    pub default_hub: Hub,
    /// Space kept free besides the 5% margin ([`DEFAULT_DISK_RESERVE`] = 1 GiB).
    pub disk_reserve_bytes: u64,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
}

impl StoreConfig {
    /// Defaults for everything but the models folder: public hubs, caches in `models_dir`,
    /// 8 downloads at once, Hugging Face as default hub.
    pub fn new(models_dir: impl Into<PathBuf>) -> StoreConfig {
        let models_dir = models_dir.into();
        StoreConfig {
            hf_cache_dir: models_dir.clone(),
            modelscope_cache_dir: models_dir.clone(),
            models_dir,
            hf_endpoint: DEFAULT_HF_ENDPOINT.into(),
            modelscope_endpoint: DEFAULT_MODELSCOPE_ENDPOINT.into(),
            hf_token: None,
            offline: false,
            max_concurrent_downloads: 8,
            default_hub: Hub::HuggingFace,
            disk_reserve_bytes: DEFAULT_DISK_RESERVE,
            retry: RetryPolicy::default(),
        }
    }
}

/// The result of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledModel {
    /// `hf:org/name` or `ms:org/name`.
    pub id: String,
    /// The folder to load from (the snapshot folder for Hugging Face).
    pub path: PathBuf,
    /// The commit pulled (or the revision name when ModelScope does not say).
    pub revision: String,
    /// Bytes of the selected files.
    pub size_bytes: u64,
}

/// One file of a repository as the hub lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoFile {
    /// Path inside the repository.
    pub path: String,
    /// Bytes, when the hub says.
    pub size: Option<u64>,
}

/// What a checked pull knows before it fetches any weight file: see [`Store::pull_checked`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `hf:org/name` or `ms:org/name`.
    pub id: String,
    /// The commit (or the revision name when ModelScope does not say).
    pub revision: String,
    /// The folder holding the selected metadata files (config.json, tokenizer files...): the
    /// snapshot folder for Hugging Face. The weights will land here too.
    pub dir: PathBuf,
    /// Every file of the repository at that revision.
    pub files: Vec<RepoFile>,
    /// The selected files that are weights ([`is_weight_file`]): what the pull would fetch next.
    pub weights: Vec<RepoFile>,
}

impl Manifest {
    /// Bytes of the selected weight files; `None` when the hub did not give every size.
    pub fn weight_bytes(&self) -> Option<u64> {
        self.weights.iter().map(|f| f.size).sum()
    }
}

type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;
type PullResult = Option<Result<Fetched, StoreError>>;

/// How much of the selection a pull fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    /// Only the selected metadata files; the snapshot stays marked incomplete.
    Metadata,
    /// Every selected file; the snapshot is marked complete at the end.
    All,
}

/// What one run of [`run_pull`] produced.
#[derive(Debug, Clone)]
struct Fetched {
    model: PulledModel,
    manifest: Manifest,
}

/// Identifies pulls that can share one download.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PullKey {
    hub: Hub,
    repo: String,
    revision: String,
    include: Vec<String>,
    exclude: Vec<String>,
    scope: Scope,
}

/// A running pull, shared by every caller that joined it.
struct PullShared {
    operation: String,
    key: PullKey,
    subscribers: Mutex<Vec<ProgressFn>>,
    last: Mutex<Option<Progress>>,
    result: watch::Receiver<PullResult>,
    abort: Mutex<Option<tokio::task::AbortHandle>>,
    cancelled: AtomicBool,
}

impl PullShared {
    fn emit(&self, p: Progress) {
        *self.last.lock() = Some(p.clone());
        let subs = self.subscribers.lock().clone();
        for s in subs {
            s(p.clone());
        }
    }
}

struct Inner {
    cfg: StoreConfig,
    hf_endpoint: Url,
    ms_endpoint: Url,
    http: http::Http,
    downloads: Semaphore,
    pulls: Mutex<HashMap<PullKey, Arc<PullShared>>>,
    next_op: AtomicU64,
}

/// The model store. Cheap to clone; clones share downloads and state.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("config", &self.inner.cfg).finish_non_exhaustive()
    }
}

fn parse_endpoint(what: &str, s: &str) -> Result<Url, StoreError> {
    let url = Url::parse(s).map_err(|e| StoreError::InvalidRef(format!("{what} `{s}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(StoreError::InvalidRef(format!("{what} `{s}` must be an http(s) URL")));
    }
    Ok(url)
}

/// Removes a finished (or aborted) pull from the table of running pulls.
struct Deregister {
    inner: Arc<Inner>,
    key: PullKey,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.inner.pulls.lock().remove(&self.key);
    }
}

impl Store {
    /// Checks the configuration and builds the HTTP clients. Touches no disk and no network.
    pub fn new(cfg: StoreConfig) -> Result<Store, StoreError> {
        let hf_endpoint = parse_endpoint("hf_endpoint", &cfg.hf_endpoint)?;
        let ms_endpoint = parse_endpoint("modelscope_endpoint", &cfg.modelscope_endpoint)?;
        let http = http::Http::new(cfg.retry.clone())?;
        let downloads = Semaphore::new(cfg.max_concurrent_downloads.max(1));
        Ok(Store {
            inner: Arc::new(Inner {
                cfg,
                hf_endpoint,
                ms_endpoint,
                http,
                downloads,
                pulls: Mutex::new(HashMap::new()),
                next_op: AtomicU64::new(1),
            }),
        })
    }

    /// The configuration the store runs with.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// Parses a source with the configured default hub.
    pub fn parse_ref(&self, source: &str) -> Result<ModelRef, StoreError> {
        ModelRef::parse_with_hub(source, self.inner.cfg.default_hub)
    }

    /// Merges the `@rev` of the source with a separate revision field; both given and
    /// different is an error.
    fn hub_ref(&self, source: &str, revision: Option<&str>) -> Result<RepoRef, StoreError> {
        let mut r = match self.parse_ref(source)? {
            ModelRef::Hub(r) => r,
            ModelRef::Local(p) => {
                return Err(StoreError::InvalidRef(format!(
                    "`{}` is a local folder: it is loaded in place, there is nothing to pull",
                    p.display()
                )));
            }
        };
        if let Some(rev) = revision {
            validate_revision(rev)?;
            match &r.revision {
                Some(own) if own != rev => {
                    return Err(StoreError::InvalidRef(format!(
                        "`{source}` names revision `{own}` but `{rev}` was also given"
                    )));
                }
                _ => r.revision = Some(rev.to_string()),
            }
        }
        Ok(r)
    }

    /// Downloads a model (or finds it complete in the cache) and returns where it is.
    ///
    /// `progress` gets throttled events (a few per second) until the pull ends. A second pull of
    /// the same model, revision and file selection while one runs joins it: it gets the same
    /// events (and operation id) and the same outcome. In offline mode only the cache is used.
    pub async fn pull(
        &self,
        params: &PullParams,
        progress: impl Fn(Progress) + Send + Sync + 'static,
    ) -> Result<PulledModel, StoreError> {
        let r = self.hub_ref(&params.source, params.revision.as_deref())?;
        if self.inner.cfg.offline {
            return self.cached(&r).ok_or_else(|| StoreError::Offline { model: r.to_string() });
        }
        Ok(self.shared_pull(r, params, Scope::All, Arc::new(progress)).await?.model)
    }

    /// A pull that stops for `check` before the weights: it fetches the selected metadata files
    /// (into the cache, where the rest of the pull finds them), then calls `check` with the
    /// [`Manifest`]; only if that returns `Ok` does it fetch the remaining files, as
    /// [`Store::pull`] does. A refusal (by convention [`StoreError::Refused`]) is returned as
    /// is; the snapshot then holds only metadata files and stays marked incomplete. The two
    /// steps report progress under their own operation ids. Offline, only the cache is used
    /// and `check` is not called.
    pub async fn pull_checked(
        &self,
        params: &PullParams,
        check: impl FnOnce(&Manifest) -> Result<(), StoreError> + Send,
        progress: impl Fn(Progress) + Send + Sync + 'static,
    ) -> Result<PulledModel, StoreError> {
        let r = self.hub_ref(&params.source, params.revision.as_deref())?;
        if self.inner.cfg.offline {
            return self.cached(&r).ok_or_else(|| StoreError::Offline { model: r.to_string() });
        }
        let progress: ProgressFn = Arc::new(progress);
        let manifest = self.shared_pull(r.clone(), params, Scope::Metadata, progress.clone()).await?.manifest;
        if let Err(e) = check(&manifest) {
            tracing::warn!(model = %r, error = %e, "refused before downloading the weights");
            return Err(e);
        }
        Ok(self.shared_pull(r, params, Scope::All, progress).await?.model)
    }

    /// Runs (or joins) the pull of `r` with `params`' file selection.
    async fn shared_pull(
        &self,
        r: RepoRef,
        params: &PullParams,
        scope: Scope,
        progress: ProgressFn,
    ) -> Result<Fetched, StoreError> {
        let filter = FileFilter::new(&params.include, &params.exclude)?;
        let key = PullKey {
            hub: r.hub,
            repo: r.repo.clone(),
            revision: r.revision_or_default().to_string(),
            include: params.include.clone(),
            exclude: params.exclude.clone(),
            scope,
        };
        // The table lock is never held across an await (the future must stay `Send`).
        let (rx, op) = {
            let mut pulls = self.inner.pulls.lock();
            if let Some(shared) = pulls.get(&key) {
                tracing::info!(model = %r, operation = %shared.operation, "joining a running pull");
                shared.subscribers.lock().push(progress.clone());
                if let Some(p) = shared.last.lock().clone() {
                    progress(p);
                }
                (shared.result.clone(), shared.operation.clone())
            } else {
                let operation = format!("pull-{}", self.inner.next_op.fetch_add(1, Ordering::Relaxed));
                let (tx, rx) = watch::channel(None);
                let shared = Arc::new(PullShared {
                    operation: operation.clone(),
                    key: key.clone(),
                    subscribers: Mutex::new(vec![progress]),
                    last: Mutex::new(None),
                    result: rx.clone(),
                    abort: Mutex::new(None),
                    cancelled: AtomicBool::new(false),
                });
                pulls.insert(key.clone(), shared.clone());
                let inner = self.inner.clone();
                let guard = Deregister { inner: inner.clone(), key: key.clone() };
                let task_shared = shared.clone();
                let task = tokio::spawn(async move {
                    let _guard = guard;
                    let shared = task_shared;
                    let tracker = Arc::new(Tracker::new(shared.operation.clone(), r.to_string()));
                    let result = run_pull(&inner, &r, &filter, scope, &tracker, &shared).await;
                    if let Err(e) = &result {
                        tracing::warn!(model = %r, error = %e, "pull failed");
                    }
                    let _ = tx.send(Some(result));
                });
                *shared.abort.lock() = Some(task.abort_handle());
                (rx, operation)
            }
        };
        wait(rx, &op).await
    }

    /// The folder to load `source` from: a local folder as is, a complete cached snapshot, or
    /// (unless offline) the result of pulling it with the default file selection.
    pub async fn resolve_for_load(
        &self,
        source: &str,
        revision: Option<&str>,
        progress: impl Fn(Progress) + Send + Sync + 'static,
    ) -> Result<PathBuf, StoreError> {
        self.resolve_for_load_checked(source, revision, |_| Ok(()), progress).await
    }

    /// [`Store::resolve_for_load`], with `check` run as in [`Store::pull_checked`] when the
    /// model has to be pulled (local folders and complete cached snapshots are not checked).
    pub async fn resolve_for_load_checked(
        &self,
        source: &str,
        revision: Option<&str>,
        check: impl FnOnce(&Manifest) -> Result<(), StoreError> + Send,
        progress: impl Fn(Progress) + Send + Sync + 'static,
    ) -> Result<PathBuf, StoreError> {
        if let ModelRef::Local(p) = self.parse_ref(source)? {
            return if p.is_dir() {
                Ok(p)
            } else {
                Err(StoreError::NotFound(format!("model folder `{}` does not exist", p.display())))
            };
        }
        let r = self.hub_ref(source, revision)?;
        if let Some(m) = self.cached(&r) {
            return Ok(m.path);
        }
        if self.inner.cfg.offline {
            return Err(StoreError::Offline { model: r.to_string() });
        }
        let params = PullParams { source: r.to_string(), revision: None, include: vec![], exclude: vec![] };
        Ok(self.pull_checked(&params, check, progress).await?.path)
    }

    /// A complete copy of the model in the cache, if there is one.
    fn cached(&self, r: &RepoRef) -> Option<PulledModel> {
        let cfg = &self.inner.cfg;
        match r.hub {
            Hub::HuggingFace => {
                let dir = HfRepoDir::new(&cfg.hf_cache_dir, &r.repo);
                let commit = dir.local_commit(r.revision_or_default())?;
                if !dir.snapshot_complete(&commit) {
                    return None;
                }
                let path = dir.snapshot(&commit);
                let size_bytes = layout::size_following_links(&path);
                Some(PulledModel { id: r.id(), path, revision: commit, size_bytes })
            }
            Hub::ModelScope => {
                let dir = MsModelDir::new(&cfg.modelscope_cache_dir, &r.repo);
                if !dir.complete() {
                    return None;
                }
                let record = read_record(&dir.record_path());
                let rev = r.revision_or_default();
                let matches = match &record {
                    Some(rec) => rec.revision.as_deref() == Some(rev) || rec.commit.as_deref() == Some(rev),
                    // A folder from modelscope itself carries no revision: take it for the default.
                    None => r.revision.is_none(),
                };
                if !matches {
                    return None;
                }
                let revision = record.and_then(|r| r.commit.or(r.revision)).unwrap_or_else(|| rev.to_string());
                Some(PulledModel { id: r.id(), size_bytes: dir.size(), path: dir.root, revision })
            }
        }
    }

    /// Cancels a running pull by its operation id. Joined callers get [`StoreError::Cancelled`];
    /// partial files stay for a later resume. Returns whether such a pull was running.
    pub fn cancel(&self, operation: &str) -> bool {
        let shared = self.inner.pulls.lock().values().find(|s| s.operation == operation).cloned();
        match shared {
            Some(s) => {
                s.cancelled.store(true, Ordering::SeqCst);
                if let Some(h) = s.abort.lock().take() {
                    h.abort();
                }
                self.inner.pulls.lock().remove(&s.key);
                true
            }
            None => false,
        }
    }

    /// Complete models in both caches. `loaded` is left false for the daemon to fill.
    pub fn list(&self) -> Result<Vec<StoredModel>, StoreError> {
        let cfg = &self.inner.cfg;
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir(&cfg.hf_cache_dir) {
            let mut folders: Vec<String> =
                rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_string)).collect();
            folders.sort();
            for folder in folders {
                let Some(repo) = HfRepoDir::repo_of_folder(&folder) else { continue };
                if validate_repo_id(Hub::HuggingFace, &repo).is_err() {
                    continue;
                }
                let dir = HfRepoDir::new(&cfg.hf_cache_dir, &repo);
                for commit in dir.commits() {
                    if !dir.snapshot_complete(&commit) {
                        continue;
                    }
                    let path = dir.snapshot(&commit);
                    let revision = dir.refs_to(&commit).into_iter().next().unwrap_or_else(|| commit.clone());
                    out.push(StoredModel {
                        id: format!("hf:{repo}"),
                        source: "hf".into(),
                        revision: Some(revision),
                        size_bytes: layout::size_following_links(&path),
                        architecture: layout::architecture(&path),
                        path: path.to_string_lossy().into_owned(),
                        loaded: false,
                    });
                }
            }
        }
        let ms_models = cfg.modelscope_cache_dir.join("models");
        for org_dir in sorted_dirs(&ms_models) {
            for model_dir in sorted_dirs(&org_dir) {
                let dir = MsModelDir { root: model_dir.clone() };
                if !dir.complete() {
                    continue;
                }
                let record = read_record(&dir.record_path());
                let org = org_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let name = model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let repo = match &record {
                    Some(r) if !r.repo.is_empty() => r.repo.clone(),
                    _ => format!("{org}/{}", name.replace("___", ".")),
                };
                out.push(StoredModel {
                    id: format!("ms:{repo}"),
                    source: "ms".into(),
                    revision: record.and_then(|r| r.revision.or(r.commit)),
                    size_bytes: dir.size(),
                    architecture: layout::architecture(&model_dir),
                    path: model_dir.to_string_lossy().into_owned(),
                    loaded: false,
                });
            }
        }
        Ok(out)
    }

    /// Deletes a model's files and returns the bytes freed: `hf:org/name` removes the whole
    /// repository folder (every snapshot, ref and blob, and its locks); `hf:org/name@rev` only
    /// that snapshot, its refs and the blobs no other snapshot uses; `ms:org/name` its folder.
    /// Refused while a pull of it runs. The daemon refuses while the model is loaded.
    pub async fn remove(&self, id: &str) -> Result<u64, StoreError> {
        let r = match self.parse_ref(id)? {
            ModelRef::Hub(r) => r,
            ModelRef::Local(p) => {
                return Err(StoreError::InvalidRef(format!(
                    "`{}` is a local folder; llmd only removes what it downloaded",
                    p.display()
                )));
            }
        };
        if let Some(s) = self.inner.pulls.lock().values().find(|s| s.key.hub == r.hub && s.key.repo == r.repo) {
            return Err(StoreError::Busy(format!(
                "a pull of `{}` is running (operation {}); cancel it first",
                r.id(),
                s.operation
            )));
        }
        let cfg = self.inner.cfg.clone();
        blocking(move || remove_blocking(&cfg, &r)).await
    }
}

async fn wait(mut rx: watch::Receiver<PullResult>, op: &str) -> Result<Fetched, StoreError> {
    match rx.wait_for(Option::is_some).await.map(|v| v.clone()) {
        Ok(Some(r)) => r,
        _ => Err(StoreError::Cancelled(op.to_string())),
    }
}

fn sorted_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn remove_blocking(cfg: &StoreConfig, r: &RepoRef) -> Result<u64, StoreError> {
    match r.hub {
        Hub::HuggingFace => {
            let dir = HfRepoDir::new(&cfg.hf_cache_dir, &r.repo);
            if !dir.root.is_dir() {
                return Err(StoreError::NotFound(format!("`{}` is not in the store", r.id())));
            }
            let Some(rev) = &r.revision else {
                let freed = layout::size_on_disk(&dir.root);
                fs::remove_dir_all(&dir.root).at(&dir.root)?;
                let _ = fs::remove_dir_all(dir.cache.join(".locks").join(&dir.folder));
                return Ok(freed);
            };
            let commit = dir
                .local_commit(rev)
                .filter(|c| dir.snapshot(c).is_dir())
                .ok_or_else(|| StoreError::NotFound(format!("`{r}` is not in the store")))?;
            let mine = dir.snapshot_blobs(&commit);
            let mut others = std::collections::HashSet::new();
            for c in dir.commits().into_iter().filter(|c| *c != commit) {
                others.extend(dir.snapshot_blobs(&c));
            }
            let snap = dir.snapshot(&commit);
            fs::remove_dir_all(&snap).at(&snap)?;
            let _ = fs::remove_file(dir.record_path(&commit));
            for name in dir.refs_to(&commit) {
                let p = dir.root.join("refs").join(name);
                fs::remove_file(&p).at(&p)?;
            }
            let mut freed = 0;
            for blob in mine.difference(&others) {
                // Only files inside this repository's blobs folder are ever deleted.
                if blob.parent() != fs::canonicalize(dir.root.join("blobs")).ok().as_deref() {
                    continue;
                }
                freed += fs::metadata(blob).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(blob).at(blob)?;
            }
            if dir.commits().is_empty() {
                freed += layout::size_on_disk(&dir.root);
                fs::remove_dir_all(&dir.root).at(&dir.root)?;
                let _ = fs::remove_dir_all(dir.cache.join(".locks").join(&dir.folder));
            }
            Ok(freed)
        }
        Hub::ModelScope => {
            let dir = MsModelDir::new(&cfg.modelscope_cache_dir, &r.repo);
            if !dir.root.is_dir() {
                return Err(StoreError::NotFound(format!("`{}` is not in the store", r.id())));
            }
            if let (Some(rev), Some(rec)) = (&r.revision, read_record(&dir.record_path()))
                && rec.revision.as_deref() != Some(rev)
                && rec.commit.as_deref() != Some(rev)
            {
                return Err(StoreError::NotFound(format!("`{r}` is not in the store")));
            }
            let freed = layout::size_on_disk(&dir.root);
            fs::remove_dir_all(&dir.root).at(&dir.root)?;
            Ok(freed)
        }
    }
}

/// One selected file with where it goes.
struct Planned {
    file: RemoteFile,
    /// Final location of the verified content.
    dest: PathBuf,
    incomplete: PathBuf,
    lock: PathBuf,
    /// Already in place and verified.
    present: bool,
    track: Arc<FileTrack>,
}

async fn run_pull(
    inner: &Arc<Inner>,
    r: &RepoRef,
    filter: &FileFilter,
    scope: Scope,
    tracker: &Arc<Tracker>,
    shared: &Arc<PullShared>,
) -> Result<Fetched, StoreError> {
    shared.emit(tracker.snapshot());
    let cfg = &inner.cfg;
    let revision = r.revision_or_default().to_string();
    let token = cfg.hf_token.as_deref();
    let hf = HfApi { http: &inner.http, endpoint: &inner.hf_endpoint, token };
    let msapi = MsApi { http: &inner.http, endpoint: &inner.ms_endpoint };

    // 1. Resolve and list.
    let (commit, files) = match r.hub {
        Hub::HuggingFace => {
            let commit = if model_ref::is_commit_id(&revision) {
                revision.to_ascii_lowercase()
            } else {
                hf.resolve_revision(&r.repo, &revision).await?
            };
            let files = hf.list_files(&r.repo, &commit).await?;
            (Some(commit), files)
        }
        Hub::ModelScope => {
            let listing = msapi.list_files(&r.repo, &revision).await?;
            (listing.commit, listing.files)
        }
    };
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    let selected: Vec<String> = filter.select(&paths).into_iter().map(str::to_string).collect();
    if selected.is_empty() {
        return Err(StoreError::NotFound(format!(
            "no file of `{r}` matches the selection ({} files in the repository)",
            files.len()
        )));
    }
    let listing: Vec<RepoFile> = files.iter().map(|f| RepoFile { path: f.path.clone(), size: f.size }).collect();
    let mut chosen: Vec<RemoteFile> = files.into_iter().filter(|f| selected.contains(&f.path)).collect();
    let weights: Vec<RepoFile> = chosen
        .iter()
        .filter(|f| select::is_weight_file(&f.path))
        .map(|f| RepoFile { path: f.path.clone(), size: f.size })
        .collect();
    if scope == Scope::Metadata {
        chosen.retain(|f| select::is_metadata_file(&f.path));
    }

    // 2. Plan: where each file goes and what is already there.
    let hf_dir = HfRepoDir::new(&cfg.hf_cache_dir, &r.repo);
    let ms_dir = MsModelDir::new(&cfg.modelscope_cache_dir, &r.repo);
    let ms_record = read_record(&ms_dir.record_path()).filter(|rec| rec.revision.as_deref() == Some(&revision));
    let mut plan = Vec::new();
    for f in chosen.iter_mut() {
        if r.hub == Hub::HuggingFace && f.etag.is_none() {
            hf.head_file(&r.repo, commit.as_deref().unwrap_or(&revision), f).await?;
        }
    }
    for f in chosen {
        let (dest, incomplete, lock) = match r.hub {
            Hub::HuggingFace => {
                // Present for every Hugging Face file after `head_file`.
                let etag = f.etag.clone().unwrap_or_default();
                (hf_dir.blob(&etag), hf_dir.incomplete(&etag), hf_dir.lock(&etag))
            }
            Hub::ModelScope => (ms_dir.file(&f.path), ms_dir.incomplete(&f.path), ms_dir.lock(&f.path)),
        };
        let present = match r.hub {
            Hub::HuggingFace => size_matches(&dest, f.size),
            Hub::ModelScope => {
                let recorded = ms_record.as_ref().and_then(|rec| rec.files.get(&f.path));
                let same = recorded.is_some_and(|rf| *rf == record_file(&f));
                if same && size_matches(&dest, f.size) {
                    true
                } else if let (true, Some(exp)) = (size_matches(&dest, f.size), f.expected.clone()) {
                    // Found without a record (modelscope's own download, or a kill before the
                    // record was written): trust it only after hashing.
                    let (d, size) = (dest.clone(), f.size.unwrap_or(0));
                    blocking(move || hash_file(&d, &exp, size)).await?
                } else {
                    false
                }
            }
        };
        let track = tracker.add_file(&f.path, f.size);
        plan.push(Planned { file: f, dest, incomplete, lock, present, track });
    }
    let total: u64 = plan.iter().filter_map(|p| p.file.size).sum();

    // 3. Disk space for what is still missing.
    let mut missing = 0;
    for p in &plan {
        if p.present {
            continue;
        }
        let partial = fs::metadata(&p.incomplete).map(|m| m.len()).unwrap_or(0);
        missing += p.file.size.unwrap_or(0).saturating_sub(partial);
    }
    let target = match r.hub {
        Hub::HuggingFace => &cfg.hf_cache_dir,
        Hub::ModelScope => &cfg.modelscope_cache_dir,
    };
    let free = free_bytes(target)?;
    check_disk_space(target, missing, free, cfg.disk_reserve_bytes)?;

    // 4. Mark the snapshot as in progress (unless it is already complete: adding files to a
    // complete snapshot never makes its existing files partial). Before fetching only the
    // metadata, always: a snapshot folder without a record and all of whose links resolve
    // counts as complete (a huggingface-cli download), which metadata links alone would be.
    let record_path = match r.hub {
        Hub::HuggingFace => hf_dir.record_path(commit.as_deref().unwrap_or_default()),
        Hub::ModelScope => ms_dir.record_path(),
    };
    let mut record = match r.hub {
        Hub::HuggingFace => read_record(&record_path).unwrap_or_default(),
        Hub::ModelScope => ms_record.clone().unwrap_or_default(),
    };
    record.repo = r.repo.clone();
    record.revision = Some(revision.clone());
    record.commit = commit.clone();
    let all_present = plan.iter().all(|p| p.present);
    let hf_complete = r.hub == Hub::HuggingFace && hf_dir.snapshot_complete(commit.as_deref().unwrap_or_default());
    let already_complete = match r.hub {
        Hub::HuggingFace => hf_complete,
        Hub::ModelScope => all_present && ms_record.as_ref().is_some_and(|rec| rec.complete),
    };
    let mark_incomplete = match scope {
        Scope::All => !all_present && !hf_complete,
        Scope::Metadata => !already_complete,
    };
    if mark_incomplete {
        record.complete = false;
        let (path, rec) = (record_path.clone(), record.clone());
        blocking(move || write_record(&path, &rec)).await?;
    }

    // 5. Download, with the ticker sending progress.
    tracker.set_phase("downloading");
    shared.emit(tracker.snapshot());
    let commit_dir = commit.clone().unwrap_or_default();
    let fetches = plan.iter().map(|p| fetch_one(inner, r, p, token, &hf, &hf_dir, &commit_dir));
    let all = futures::future::try_join_all(fetches);
    tokio::pin!(all);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            res = &mut all => { res?; break; }
            _ = ticker.tick() => shared.emit(tracker.snapshot()),
        }
    }

    let path = match r.hub {
        Hub::HuggingFace => hf_dir.snapshot(&commit_dir),
        Hub::ModelScope => ms_dir.root.clone(),
    };
    let revision_done = commit.clone().unwrap_or_else(|| revision.clone());
    let manifest = Manifest { id: r.id(), revision: revision_done.clone(), dir: path.clone(), files: listing, weights };
    let model = PulledModel { id: r.id(), path, revision: revision_done, size_bytes: total };
    for p in &plan {
        record.files.insert(p.file.path.clone(), record_file(&p.file));
    }
    if scope == Scope::Metadata {
        // The files are recorded (ModelScope finds them by the record); the snapshot stays as
        // marked in step 4 and no ref moves.
        if mark_incomplete {
            let (path, rec) = (record_path.clone(), record.clone());
            blocking(move || write_record(&path, &rec)).await?;
        }
        tracker.set_phase("checking");
        shared.emit(tracker.snapshot());
        return Ok(Fetched { model, manifest });
    }

    // 6. Record completion, then move the ref (so a ref never names an incomplete snapshot).
    record.complete = true;
    let (path, rec) = (record_path.clone(), record.clone());
    blocking(move || write_record(&path, &rec)).await?;
    if let (Hub::HuggingFace, Some(c)) = (r.hub, &commit)
        && &revision != c
    {
        let (dir, rev, c) = (hf_dir.clone(), revision.clone(), c.clone());
        blocking(move || dir.write_ref(&rev, &c)).await?;
    }
    tracker.set_phase("complete");
    shared.emit(tracker.snapshot());
    Ok(Fetched { model, manifest })
}

fn size_matches(path: &Path, size: Option<u64>) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && size.is_none_or(|s| m.len() == s))
}

fn record_file(f: &RemoteFile) -> RecordFile {
    RecordFile {
        size: f.size,
        hash: f.expected.as_ref().map(|e| match e {
            Expected::Sha256(h) => format!("sha256:{h}"),
            Expected::GitSha1(h) => format!("git-sha1:{h}"),
        }),
    }
}

/// Fetches one planned file (unless present) under a download permit and the file's lock, then
/// links it into the snapshot (Hugging Face).
async fn fetch_one(
    inner: &Arc<Inner>,
    r: &RepoRef,
    p: &Planned,
    token: Option<&str>,
    hf: &HfApi<'_>,
    hf_dir: &HfRepoDir,
    commit: &str,
) -> Result<(), StoreError> {
    let size = p.file.size;
    if !p.present {
        let _permit = inner
            .downloads
            .acquire()
            .await
            .map_err(|_| StoreError::Protocol("the download semaphore was closed".into()))?;
        p.track.started.store(true, Ordering::Relaxed);
        // Another process (or pull) may hold this file; wait for it, then look again.
        let lock = lock_file(p.lock.clone()).await?;
        if !size_matches(&p.dest, size) {
            if let Some(parent) = p.incomplete.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            if let Some(parent) = p.dest.parent() {
                fs::create_dir_all(parent).at(parent)?;
            }
            let repo = r.repo.clone();
            let what = format!("`{}`", p.file.path);
            let ms_endpoint = inner.ms_endpoint.to_string();
            let hub = r.hub;
            let map_status = move |s: reqwest::StatusCode, h: &reqwest::header::HeaderMap, b: String| match hub {
                Hub::HuggingFace => hf.status_error(&repo, &what, s, h, b),
                Hub::ModelScope => match s.as_u16() {
                    401 | 403 => StoreError::Gated(format!("ModelScope refused {what} of `{repo}` (HTTP {s})")),
                    404 => StoreError::NotFound(format!("{what} of `{repo}` not found on {ms_endpoint}")),
                    code => StoreError::Http { url: what.clone(), status: code, detail: http::excerpt(&b) },
                },
            };
            let job = FetchJob {
                http: &inner.http,
                url: &p.file.url,
                // The token is for Hugging Face only.
                token: if r.hub == Hub::HuggingFace { token } else { None },
                name: &p.file.path,
                size,
                expected: p.file.expected.as_ref(),
                incomplete: p.incomplete.clone(),
                dest: p.dest.clone(),
                done: p.track.done.clone(),
                fetched: p.track.fetched.clone(),
                map_status: &map_status,
            };
            job.run().await?;
        }
        drop(lock);
    }
    p.track.started.store(true, Ordering::Relaxed);
    p.track.done.store(size.unwrap_or_else(|| fs::metadata(&p.dest).map(|m| m.len()).unwrap_or(0)), Ordering::Relaxed);
    if r.hub == Hub::HuggingFace {
        let etag = p.file.etag.clone().unwrap_or_default();
        let (dir, commit, path) = (hf_dir.clone(), commit.to_string(), p.file.path.clone());
        blocking(move || dir.link(&commit, &path, &etag)).await?;
    }
    Ok(())
}

/// Takes an exclusive `flock` on `path` (created if needed), waiting on a blocking thread.
/// The lock goes with the process, so a `kill -9` never leaves it held.
async fn lock_file(path: PathBuf) -> Result<nix::fcntl::Flock<fs::File>, StoreError> {
    blocking(move || {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).at(parent)?;
        }
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).at(&path)?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| StoreError::io(&path, std::io::Error::from(e)))
    })
    .await
}
