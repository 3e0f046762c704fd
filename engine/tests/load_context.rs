//! A checkpoint with an active sliding window is served only with contexts that fit inside it
//! (neither backend applies the window): the default context stops at the window, and a
//! `max_model_len` beyond it is refused before anything is read.

use std::path::Path;
use std::time::Duration;

use llmd_engine::{EngineHandle, LoadOptions};
use llmd_options::Device;

/// A copy of the mistral fixture whose config enables a 64-token sliding window.
fn windowed_mistral() -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/mistral");
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    let path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["sliding_window"] = serde_json::json!(64);
    std::fs::write(&path, cfg.to_string()).unwrap();
    tmp
}

fn options(dir: &Path, max_model_len: Option<u32>) -> LoadOptions {
    let mut opts = LoadOptions::new(dir.to_path_buf(), "mistral");
    opts.device = Device::Cpu;
    opts.cpu_kv_cache_bytes = 4 << 20;
    opts.max_model_len = max_model_len;
    opts
}

#[test]
fn the_default_context_stops_at_the_window() {
    let d = windowed_mistral();
    let h = EngineHandle::load(options(d.path(), None), &mut |_| {}).unwrap();
    assert_eq!(h.info().max_model_len, 64);
    h.shutdown(Duration::ZERO);
    let h = EngineHandle::load(options(d.path(), Some(32)), &mut |_| {}).unwrap();
    assert_eq!(h.info().max_model_len, 32);
    h.shutdown(Duration::ZERO);
}

#[test]
fn a_context_beyond_the_window_is_refused_before_reading() {
    let d = windowed_mistral();
    let mut phases = Vec::new();
    let err = EngineHandle::load(options(d.path(), Some(128)), &mut |p| phases.push(p.phase))
        .err()
        .unwrap_or_else(|| panic!("max_model_len 128 with a 64-token window was accepted"));
    let msg = err.to_string();
    assert!(msg.contains("`max_model_len` = 128") && msg.contains("`sliding_window` = 64"), "{msg}");
    assert!(phases.is_empty(), "refused only after {phases:?}");
}
