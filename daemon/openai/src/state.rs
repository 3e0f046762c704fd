//! Shared state of the router: the daemon's model registry, API keys, options, metrics.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::backend::ModelRegistry;
use crate::metrics::Metrics;

/// The accepted API keys, reloadable while serving (the daemon calls [`ApiKeys::replace`] on
/// SIGHUP). Only SHA-256 digests are kept, so keys are never in memory dumps or logs, and
/// comparing digests in constant time hides both the key and its length.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Arc<RwLock<Arc<Vec<[u8; 32]>>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys, not even their digests.
        f.debug_struct("ApiKeys").field("count", &self.digests.read().len()).finish()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeys {
    /// Keys from config / key file; empty strings and surrounding whitespace are dropped.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(keys: I) -> Self {
        let this = ApiKeys::default();
        this.replace(keys);
        this
    }

    /// Swaps in a new key set (SIGHUP reload). Requests in flight keep the old set.
    pub fn replace<I: IntoIterator<Item = S>, S: AsRef<str>>(&self, keys: I) {
        let digests: Vec<[u8; 32]> = keys
            .into_iter()
            .map(|k| k.as_ref().trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| digest(&k))
            .collect();
        *self.digests.write() = Arc::new(digests);
    }

    /// Whether any key is set (then `/v1/*` requires one).
    pub fn is_enabled(&self) -> bool {
        !self.digests.read().is_empty()
    }

    /// Whether `presented` is one of the keys. Every key is compared, in constant time.
    pub fn check(&self, presented: &str) -> bool {
        let keys = self.digests.read().clone();
        let d = digest(presented);
        let mut ok = subtle::Choice::from(0u8);
        for k in keys.iter() {
            ok |= k.ct_eq(&d);
        }
        bool::from(ok)
    }
}

/// Server options the daemon fills from its config (`[server]`).
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// Bodies larger than this get 413.
    pub max_body_bytes: usize,
    /// CORS origins; `"*"` allows any. Empty: no CORS headers.
    pub allowed_origins: Vec<String>,
    /// `/metrics` requires an API key (when keys are set).
    pub metrics_require_auth: bool,
    /// `/health` requires an API key (when keys are set).
    pub health_require_auth: bool,
    /// Longest a non-streaming request may take before it is cancelled (504).
    /// Streaming requests are not cut: the client sees tokens and can disconnect.
    pub request_timeout: Option<Duration>,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            max_body_bytes: 32 << 20,
            allowed_origins: Vec::new(),
            metrics_require_auth: false,
            health_require_auth: false,
            request_timeout: None,
        }
    }
}

/// Appends text to `/metrics` (the daemon's GPU gauges from telemetry).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// Everything handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) registry: Arc<dyn ModelRegistry>,
    pub(crate) keys: ApiKeys,
    pub(crate) options: Arc<ApiOptions>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) extra_metrics: Option<ExtraMetrics>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").field("keys", &self.keys).field("options", &self.options).finish_non_exhaustive()
    }
}

impl ApiState {
    /// State over the daemon's registry, with `keys` (keep a clone to reload them) and options.
    pub fn new(registry: Arc<dyn ModelRegistry>, keys: ApiKeys, options: ApiOptions) -> Self {
        let metrics = Arc::new(Metrics::new(registry.clone()));
        ApiState { registry, keys, options: Arc::new(options), metrics, extra_metrics: None }
    }

    /// Adds text the daemon appends to `/metrics` at each scrape.
    pub fn with_extra_metrics(mut self, extra: ExtraMetrics) -> Self {
        self.extra_metrics = Some(extra);
        self
    }

    /// The key set (to reload it on SIGHUP).
    pub fn keys(&self) -> &ApiKeys {
        &self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_check_and_reload() {
        let keys = ApiKeys::new(["sk-one", " sk-two \n", ""]);
        assert!(keys.is_enabled());
        assert!(keys.check("sk-one"));
        assert!(keys.check("sk-two"));
        assert!(!keys.check("sk-on"));
        assert!(!keys.check(""));
        let shared = keys.clone();
        shared.replace(["sk-three"]);
        assert!(!keys.check("sk-one"), "a clone shares the reloaded set");
        assert!(keys.check("sk-three"));
        keys.replace(Vec::<String>::new());
        assert!(!keys.is_enabled());
        assert!(!format!("{keys:?}").contains("sk-"));
    }
}
