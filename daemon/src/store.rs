//! The model store (llmd-store) inside the daemon: the [`Store`] built from the settings,
//! the [`SourceResolver`] that pulls hub ids before a load, [`pull`] for `llmctl pull`, and
//! the one mapping of store errors onto control-protocol errors ([`store_error`]). Both pull
//! paths stop after the metadata files for the checks of [`crate::preflight`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use llmd_proto::{ControlError, LoadParams, Progress, PullParams, RunningModel, StoredModel};
use llmd_store::{Hub, ModelRef, PulledModel, Store, StoreConfig, StoreError};
use llmd_telemetry::Telemetry;

use crate::config::{EngineConfig, Settings};
use crate::models::{ProgressSink, SourceResolver};
use crate::preflight::{self, Target};

/// The store configured from `[storage]` and the environment (read by `env.rs`/`config.rs`:
/// HF_ENDPOINT, HF_TOKEN or the token file, HF_HUB_CACHE/HF_HOME, HF_HUB_OFFLINE,
/// MODELSCOPE_CACHE, MODELSCOPE_DOMAIN). Touches no disk and no network.
pub fn open(settings: &Settings) -> Result<Store, StoreError> {
    let storage = &settings.config.storage;
    let mut cfg = StoreConfig::new(storage.models_dir.clone());
    cfg.hf_cache_dir = storage.models_dir.clone();
    cfg.modelscope_cache_dir = settings.modelscope_cache.clone();
    cfg.hf_endpoint = storage.hf_endpoint.clone();
    cfg.modelscope_endpoint = storage.modelscope_endpoint.clone();
    cfg.hf_token = settings.hf_token.as_ref().map(|t| t.expose().to_string());
    cfg.offline = storage.offline;
    cfg.max_concurrent_downloads = storage.max_concurrent_downloads.max(1) as usize;
    Store::new(cfg)
}

/// The one store error → control error mapping.
pub fn store_error(e: StoreError) -> ControlError {
    ControlError::new(e.code(), e.to_string())
}

/// `llmctl pull`: with the default file selection (or only `exclude`), the store fetches the
/// metadata first and the weights only if [`preflight::check_pull`] passes (architecture,
/// weight format, config.json). An explicit `include` list is fetched as asked, unchecked: it
/// is how files of a model llmd does not serve are downloaded anyway.
pub async fn pull(
    store: &Store,
    params: &PullParams,
    progress: impl Fn(Progress) + Send + Sync + 'static,
) -> Result<PulledModel, StoreError> {
    if params.include.is_empty() {
        store.pull_checked(params, preflight::check_pull, progress).await
    } else {
        tracing::info!(model = %params.source, include = ?params.include, "pull with an explicit file selection: not checked");
        store.pull(params, progress).await
    }
}

/// Resolves `[[models]]`/`llmctl load` sources: local folders in place, hub ids from the cache
/// or pulled first (with progress frames), after [`preflight::check_load`] has seen their
/// metadata: architecture, weight format, config.json, and whether the weights fit where
/// `engine` will run them (GPU memory from `telemetry`, or host memory).
#[derive(Debug, Clone)]
pub struct StoreResolver {
    pub store: Store,
    pub engine: EngineConfig,
    pub telemetry: Arc<Telemetry>,
}

impl SourceResolver for StoreResolver {
    fn resolve(
        &self,
        params: &LoadParams,
        progress: ProgressSink,
    ) -> BoxFuture<'static, Result<PathBuf, ControlError>> {
        let store = self.store.clone();
        let (engine, telemetry) = (self.engine.clone(), self.telemetry.clone());
        let params = params.clone();
        Box::pin(async move {
            let name = params.name.clone().unwrap_or_else(|| crate::config::default_served_name(&params.source));
            let check =
                |m: &llmd_store::Manifest| preflight::check_load(m, &name, &params, &Target::of(&engine, &telemetry));
            store
                .resolve_for_load_checked(&params.source, params.revision.as_deref(), check, move |p| progress(p))
                .await
                .map_err(store_error)
        })
    }
}

/// A hub repository as (hub, repo), ignoring the revision; `None` for local folders and
/// sources that do not parse.
fn hub_repo(store: &Store, source: &str) -> Option<(Hub, String)> {
    match store.parse_ref(source) {
        Ok(ModelRef::Hub(r)) => Some((r.hub, r.repo)),
        _ => None,
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b || a.starts_with(&b),
        _ => false,
    }
}

/// Whether the hub model `source` is complete in `stored` (the store's listing).
pub fn is_stored(store: &Store, source: &str, stored: &[StoredModel]) -> bool {
    let repo = hub_repo(store, source);
    repo.is_some() && stored.iter().any(|s| hub_repo(store, &s.id) == repo)
}

/// The loaded models that serve `stored` (same hub repository, or loaded from its folder).
pub fn loaded_from<'a>(store: &Store, stored: &StoredModel, running: &'a [RunningModel]) -> Vec<&'a RunningModel> {
    let repo = hub_repo(store, &stored.id);
    running
        .iter()
        .filter(|m| {
            let by_repo = repo.is_some() && hub_repo(store, &m.source) == repo;
            by_repo || same_folder(Path::new(&m.source), Path::new(&stored.path))
        })
        .collect()
}

/// The loaded models that would lose their files if `id` (an `llmctl rm` argument) were removed.
pub fn loaded_users_of<'a>(
    store: &Store,
    id: &str,
    stored: &[StoredModel],
    running: &'a [RunningModel],
) -> Vec<&'a RunningModel> {
    let repo = hub_repo(store, id);
    let mut users: Vec<&RunningModel> =
        running.iter().filter(|m| repo.is_some() && hub_repo(store, &m.source) == repo).collect();
    for s in stored.iter().filter(|s| repo.is_some() && hub_repo(store, &s.id) == repo) {
        for m in loaded_from(store, s, running) {
            if !users.iter().any(|u| u.name == m.name) {
                users.push(m);
            }
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(name: &str, source: &str) -> RunningModel {
        RunningModel {
            name: name.into(),
            source: source.into(),
            architecture: "Qwen2ForCausalLM".into(),
            params: 1,
            dtype: llmd_options::Dtype::Float32,
            device: llmd_options::Backend::Cpu,
            tp: 1,
            gpus: vec![],
            max_model_len: 16,
            weight_bytes: 4,
            kv_cache_bytes: 0,
            kv_block_size: 16,
            kv_blocks_total: 1,
            kv_blocks_used: 0,
            running: 0,
            waiting: 0,
            loaded_at: 0,
        }
    }

    fn stored(id: &str, path: &Path) -> StoredModel {
        StoredModel {
            id: id.into(),
            source: "hf".into(),
            revision: Some("main".into()),
            path: path.display().to_string(),
            size_bytes: 1,
            architecture: None,
            loaded: false,
        }
    }

    #[test]
    fn loaded_models_are_matched_by_repo_and_by_folder() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = dir.path().join("models--org--tiny/snapshots/abc");
        std::fs::create_dir_all(&snapshot).unwrap();
        let store = Store::new(StoreConfig::new(dir.path())).unwrap();
        let s = stored("hf:org/tiny", &snapshot);
        let ps = vec![
            running("bare", "org/tiny"),
            running("prefixed", "hf:org/tiny@main"),
            running("by-path", &snapshot.display().to_string()),
            running("other", "hf:org/other"),
            running("ms", "ms:org/tiny"),
        ];
        let names: Vec<_> = loaded_from(&store, &s, &ps).iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["bare", "prefixed", "by-path"]);
        let users: Vec<_> = loaded_users_of(&store, "hf:org/tiny@main", std::slice::from_ref(&s), &ps)
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(users, ["bare", "prefixed", "by-path"]);
        assert!(loaded_users_of(&store, "hf:org/unused", &[s], &ps).is_empty());
    }

    #[test]
    fn store_errors_keep_their_code_and_message() {
        let e = store_error(StoreError::NotFound("repository `org/x` not found".into()));
        assert_eq!(e.code, llmd_proto::ErrorCode::NotFound);
        assert!(e.message.contains("org/x"));
    }
}
