//! Pulls against the fake hub: layout, hashes, resume, faults, sharing, selection, safety,
//! offline mode, disk check, list and remove, ModelScope.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FakeFile, FakeHub, FakeRepo};
use llmd_proto::{ErrorCode, Progress, PullParams};
use llmd_store::{RetryPolicy, Store, StoreConfig, StoreError};
use parking_lot::Mutex;

pub fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const CONFIG: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}"#;

fn tiny_repo(seed: u8) -> FakeRepo {
    FakeRepo::new(
        seed,
        vec![
            FakeFile::mem("config.json", CONFIG, false),
            FakeFile::mem("tokenizer.json", r#"{"model": {"type": "BPE"}}"#, false),
            FakeFile::mem("tokenizer_config.json", r#"{"chat_template": "{{ messages }}"}"#, false),
            FakeFile::mem("README.md", "# tiny", false),
            FakeFile::mem("model.safetensors", pseudo_random(2 << 20, seed as u64), true),
            FakeFile::mem("pytorch_model.bin", pseudo_random(1000, 7), true),
            FakeFile::mem("original/consolidated.00.pth", pseudo_random(1000, 8), true),
        ],
    )
}

fn config(dir: &Path, hub: &FakeHub) -> StoreConfig {
    let mut cfg = StoreConfig::new(dir);
    cfg.hf_endpoint = hub.url.clone();
    cfg.modelscope_endpoint = hub.url.clone();
    cfg.hf_token = Some("good-token".into());
    cfg.retry =
        RetryPolicy { max_attempts: 4, base_delay: Duration::from_millis(20), max_delay: Duration::from_secs(5) };
    cfg.disk_reserve_bytes = 0;
    cfg
}

fn store(dir: &Path, hub: &FakeHub) -> Store {
    Store::new(config(dir, hub)).unwrap()
}

fn params(source: &str) -> PullParams {
    PullParams { source: source.into(), ..Default::default() }
}

fn collector() -> (Arc<Mutex<Vec<Progress>>>, impl Fn(Progress) + Send + Sync + 'static) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    (events, move |p| e.lock().push(p))
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[tokio::test]
async fn hf_pull_writes_huggingface_hub_layout() {
    let hub = FakeHub::start().await;
    let repo = tiny_repo(1);
    let weights = repo.files[4].clone();
    hub.add_hf("org/tiny", repo.clone());
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let (events, cb) = collector();
    let m = s.pull(&params("hf:org/tiny"), cb).await.unwrap();

    let root = dir.path().join("models--org--tiny");
    assert_eq!(m.id, "hf:org/tiny");
    assert_eq!(m.revision, repo.commit);
    assert_eq!(m.path, root.join("snapshots").join(&repo.commit));
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), repo.commit);
    // Snapshot entries are relative symlinks to blobs named by the ETag.
    let link = m.path.join("model.safetensors");
    assert_eq!(std::fs::read_link(&link).unwrap(), PathBuf::from(format!("../../blobs/{}", weights.sha256())));
    let content = std::fs::read(&link).unwrap();
    assert_eq!(sha256_hex(&content), weights.sha256());
    let cfg_link = std::fs::read_link(m.path.join("config.json")).unwrap();
    assert_eq!(cfg_link, PathBuf::from(format!("../../blobs/{}", repo.files[0].git_sha1())));
    // Default selection: no README, no .bin, no original/.
    let mut names: Vec<String> =
        std::fs::read_dir(&m.path).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]);
    assert!(
        !std::fs::read_dir(root.join("blobs")).unwrap().any(|e| e
            .unwrap()
            .path()
            .to_string_lossy()
            .ends_with(".incomplete"))
    );
    assert_eq!(m.size_bytes, (2 << 20) + CONFIG.len() as u64 + 26 + 35);

    // The LFS file came from the other host, without the token; the hub got the token.
    let lfs = hub.body_gets("model.safetensors");
    assert_eq!(lfs.len(), 1);
    assert!(lfs[0].on_lfs_host && !lfs[0].authorization, "{lfs:?}");
    assert!(hub.log().iter().filter(|l| !l.on_lfs_host).all(|l| l.authorization));
    // The tree listing was paginated (page size 2).
    assert!(hub.log().iter().filter(|l| l.path.contains("/tree/")).count() >= 4);

    // Progress: operation id, phases, final totals.
    let ev = events.lock().clone();
    assert!(ev.iter().all(|p| p.operation == ev[0].operation && p.model == "hf:org/tiny"));
    assert_eq!(ev[0].phase, "resolving");
    let last = ev.last().unwrap();
    assert_eq!((last.phase.as_str(), last.done, last.total), ("complete", m.size_bytes, Some(m.size_bytes)));
    assert_eq!(last.files.len(), 4);

    // Listed with its architecture.
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, "hf:org/tiny");
    assert_eq!(list[0].revision.as_deref(), Some("main"));
    assert_eq!(list[0].architecture.as_deref(), Some("Qwen2ForCausalLM"));
    assert_eq!(list[0].size_bytes, m.size_bytes);

    // A second pull downloads nothing.
    hub.clear_log();
    let again = s.pull(&params("hf:org/tiny"), |_| {}).await.unwrap();
    assert_eq!(again, m);
    assert!(hub.log().iter().all(|l| l.file.is_none()), "{:?}", hub.log());
}

#[tokio::test]
async fn drops_and_503_are_retried_and_resumed() {
    let hub = FakeHub::start().await;
    let repo = tiny_repo(2);
    let weights = repo.files[4].sha256();
    hub.add_hf("org/tiny", repo);
    {
        let mut f = hub.state.faults.lock();
        f.drop_after.insert("model.safetensors".into(), 1 << 20);
        f.status_once.insert("config.json".into(), (503, Some(1)));
        f.status_once.insert("tokenizer.json".into(), (429, None));
    }
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let m = store(dir.path(), &hub).pull(&params("org/tiny"), |_| {}).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "Retry-After: 1 was not honoured");
    let gets = hub.body_gets("model.safetensors");
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range_start, None);
    assert_eq!(gets[1].range_start, Some(1 << 20), "the retry must resume from the bytes on disk");
    assert_eq!(hub.bytes_sent("model.safetensors"), 2 << 20, "no byte fetched twice");
    assert_eq!(sha256_hex(&std::fs::read(m.path.join("model.safetensors")).unwrap()), weights);
    assert_eq!(hub.body_gets("config.json").len(), 2);
}

#[tokio::test]
async fn corrupt_bytes_are_fetched_again_then_fail_clearly() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", tiny_repo(3));
    hub.state.faults.lock().corrupt_once.insert("model.safetensors".into());
    hub.state.faults.lock().corrupt_once.insert("config.json".into());
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let m = s.pull(&params("hf:org/tiny"), |_| {}).await.unwrap();
    assert_eq!(hub.body_gets("model.safetensors").len(), 2);
    assert_eq!(hub.body_gets("config.json").len(), 2, "git-sha1 of small files is checked too");
    assert_eq!(std::fs::read_to_string(m.path.join("config.json")).unwrap(), CONFIG);

    // Always corrupt: bounded attempts, a clear error, nothing listed.
    let hub = FakeHub::start().await;
    hub.add_hf("org/bad", tiny_repo(4));
    hub.state.faults.lock().corrupt_always.insert("model.safetensors".into());
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let err = s.pull(&params("hf:org/bad"), |_| {}).await.unwrap_err();
    assert!(matches!(err, StoreError::HashMismatch { attempts: 3, .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors") && err.to_string().contains("sha256"), "{err}");
    assert_eq!(hub.body_gets("model.safetensors").len(), 3);
    assert!(s.list().unwrap().is_empty(), "a partial snapshot must not be listed");
    let snap = dir.path().join("models--org--bad/snapshots").join(tiny_repo(4).commit);
    assert!(!snap.join("model.safetensors").exists());
    assert!(s.resolve_for_load("hf:org/bad", None, |_| {}).await.is_err());
}

#[tokio::test]
async fn gated_and_missing_repos_give_actionable_errors() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/gated", tiny_repo(5));
    hub.state.gated.lock().insert("org/gated".into());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &hub);
    cfg.hf_token = None;
    let s = Store::new(cfg).unwrap();
    let err = s.pull(&params("hf:org/gated"), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::PermissionDenied);
    assert!(err.to_string().contains("set HF_TOKEN"), "{err}");
    // With the token it works.
    store(dir.path(), &hub).pull(&params("hf:org/gated"), |_| {}).await.unwrap();

    let err = s.pull(&params("hf:org/nope"), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert!(err.to_string().contains("not found"), "{err}");
    let err = store(dir.path(), &hub).pull(&params("hf:org/gated@v9"), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound, "{err}");
}

#[tokio::test]
async fn offline_mode_uses_the_cache_only() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", tiny_repo(6));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &hub);
    cfg.offline = true;
    let offline = Store::new(cfg).unwrap();
    let err = offline.pull(&params("hf:org/tiny"), |_| {}).await.unwrap_err();
    assert!(matches!(err, StoreError::Offline { .. }) && err.to_string().contains("offline"), "{err}");
    let err = offline.resolve_for_load("hf:org/tiny", None, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
    assert!(hub.log().is_empty(), "offline mode must not touch the network");

    let online = store(dir.path(), &hub);
    let path = online.resolve_for_load("hf:org/tiny", None, |_| {}).await.unwrap();
    hub.clear_log();
    assert_eq!(offline.resolve_for_load("hf:org/tiny", None, |_| {}).await.unwrap(), path);
    assert_eq!(offline.pull(&params("hf:org/tiny"), |_| {}).await.unwrap().path, path);
    assert_eq!(online.resolve_for_load("hf:org/tiny", Some("main"), |_| {}).await.unwrap(), path);
    assert!(hub.log().is_empty());
    // Local folders load in place.
    assert_eq!(offline.resolve_for_load(path.to_str().unwrap(), None, |_| {}).await.unwrap(), path);
    let err = offline.resolve_for_load("/no/such/folder", None, |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::NotFound);
}

#[tokio::test]
async fn concurrent_pulls_of_one_model_share_the_download() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", tiny_repo(7));
    // Slow enough that the second caller arrives while the first downloads.
    hub.state.faults.lock().throttle.insert("model.safetensors".into(), Duration::from_millis(5));
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let (ev1, cb1) = collector();
    let (ev2, cb2) = collector();
    let s2 = s.clone();
    let first = tokio::spawn(async move { s2.pull(&params("hf:org/tiny"), cb1).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = s.pull(&params("hf:org/tiny@main"), cb2).await.unwrap();
    let first = first.await.unwrap().unwrap();
    assert_eq!(first, second);
    assert_eq!(hub.body_gets("model.safetensors").len(), 1);
    assert_eq!(hub.log().iter().filter(|l| l.path.contains("/revision/")).count(), 1);
    let (ev1, ev2) = (ev1.lock().clone(), ev2.lock().clone());
    assert!(!ev2.is_empty());
    assert_eq!(ev1[0].operation, ev2[0].operation);
    assert_eq!(ev1.last(), ev2.last());
}

#[tokio::test]
async fn include_and_exclude_select_files() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", tiny_repo(8));
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let p = PullParams {
        source: "hf:org/tiny".into(),
        include: vec!["*.json".into()],
        exclude: vec!["tokenizer*".into()],
        ..Default::default()
    };
    let m = s.pull(&p, |_| {}).await.unwrap();
    let names: Vec<String> =
        std::fs::read_dir(&m.path).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["config.json"]);
    let p = PullParams { source: "hf:org/tiny".into(), include: vec!["original/*".into()], ..Default::default() };
    let m = s.pull(&p, |_| {}).await.unwrap();
    assert!(m.path.join("original/consolidated.00.pth").is_file());
    assert_eq!(
        std::fs::read_link(m.path.join("original/consolidated.00.pth")).unwrap(),
        PathBuf::from(format!("../../../blobs/{}", tiny_repo(8).files[6].sha256()))
    );
    let p = PullParams { source: "hf:org/tiny".into(), include: vec!["*.gguf".into()], ..Default::default() };
    assert_eq!(s.pull(&p, |_| {}).await.unwrap_err().code(), ErrorCode::NotFound);
    let p = PullParams { source: "hf:org/tiny".into(), include: vec!["[".into()], ..Default::default() };
    assert_eq!(s.pull(&p, |_| {}).await.unwrap_err().code(), ErrorCode::InvalidArgument);
}

#[tokio::test]
async fn traversal_names_are_rejected() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    for bad in ["hf:../etc", "hf:org/../../x", "hf:/abs/path", "ms:org/x@../../y", "hf:org/a b"] {
        let err = s.pull(&params(bad), |_| {}).await.unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "{bad}: {err}");
    }
    assert!(hub.log().is_empty());

    // A malicious listing with `..` in a file path fails before anything is written.
    let mut repo = tiny_repo(9);
    repo.extra_entries
        .push(serde_json::json!({"type": "file", "path": "../../../evil.json", "size": 3, "oid": "a".repeat(40)}));
    hub.add_hf("org/evil", repo.clone());
    let err = s.pull(&params("hf:org/evil"), |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("unsafe file name"), "{err}");
    assert!(!dir.path().join("evil.json").exists() && !dir.path().join("models--org--evil/snapshots").exists());
    // The same through ModelScope.
    hub.add_ms(
        "org/evil",
        FakeRepo {
            extra_entries: vec![
                serde_json::json!({"Path": "/etc/passwd", "Type": "blob", "Size": 3, "Sha256": "b".repeat(64)}),
            ],
            ..repo
        },
    );
    let err = s.pull(&params("ms:org/evil"), |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("unsafe file name"), "{err}");
}

#[tokio::test]
async fn disk_space_is_checked_before_downloading() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", tiny_repo(10));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &hub);
    cfg.disk_reserve_bytes = u64::MAX / 4;
    let err = Store::new(cfg).unwrap().pull(&params("hf:org/tiny"), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InsufficientResources);
    let StoreError::InsufficientDisk { missing, free, .. } = &err else { panic!("{err}") };
    assert!(*missing >= 2 << 20 && *free > 0);
    assert!(err.to_string().contains(&missing.to_string()), "{err}");
    assert!(hub.log().iter().all(|l| l.file.is_none()), "nothing downloaded");
}

#[tokio::test]
async fn list_and_remove_only_touch_one_model() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/a", tiny_repo(11));
    hub.add_hf("org/b", tiny_repo(12));
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    s.pull(&params("hf:org/a"), |_| {}).await.unwrap();
    let b = s.pull(&params("hf:org/b"), |_| {}).await.unwrap();
    assert_eq!(s.list().unwrap().len(), 2);
    let freed = s.remove("hf:org/a").await.unwrap();
    assert!(freed >= 2 << 20, "{freed}");
    assert!(!dir.path().join("models--org--a").exists());
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, "hf:org/b");
    assert!(b.path.join("model.safetensors").is_file());
    assert_eq!(s.remove("hf:org/a").await.unwrap_err().code(), ErrorCode::NotFound);
    assert_eq!(s.remove("/some/folder").await.unwrap_err().code(), ErrorCode::InvalidArgument);
    // One revision of a repository with two snapshots: shared blobs stay.
    let mut v2 = tiny_repo(12);
    v2.commit = "ee".repeat(20);
    v2.files[0] = FakeFile::mem("config.json", r#"{"architectures": ["LlamaForCausalLM"]}"#, false);
    hub.add_hf("org/b", v2.clone());
    s.pull(&params(&format!("hf:org/b@{}", v2.commit)), |_| {}).await.unwrap();
    assert_eq!(s.list().unwrap().len(), 2);
    let freed = s.remove(&format!("hf:org/b@{}", b.revision)).await.unwrap();
    assert_eq!(freed, CONFIG.len() as u64, "only the blob no other snapshot uses");
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].architecture.as_deref(), Some("LlamaForCausalLM"));
    assert!(PathBuf::from(&list[0].path).join("model.safetensors").is_file());
}

#[tokio::test]
async fn a_cache_made_by_huggingface_cli_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models--org--foreign");
    let commit = "ab".repeat(20);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::create_dir_all(root.join("snapshots").join(&commit)).unwrap();
    std::fs::write(root.join("blobs/1111"), CONFIG).unwrap();
    std::fs::write(root.join("refs/main"), &commit).unwrap();
    std::os::unix::fs::symlink("../../blobs/1111", root.join("snapshots").join(&commit).join("config.json")).unwrap();
    let hub = FakeHub::start().await;
    let mut cfg = config(dir.path(), &hub);
    cfg.offline = true;
    let s = Store::new(cfg).unwrap();
    let path = s.resolve_for_load("hf:org/foreign", None, |_| {}).await.unwrap();
    assert_eq!(path, root.join("snapshots").join(&commit));
    let list = s.list().unwrap();
    assert_eq!((list[0].id.as_str(), list[0].architecture.as_deref()), ("hf:org/foreign", Some("Qwen2ForCausalLM")));
}

#[tokio::test]
async fn cancel_stops_a_pull_and_keeps_partial_bytes() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", tiny_repo(13));
    hub.state.faults.lock().throttle.insert("model.safetensors".into(), Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let (events, cb) = collector();
    let s2 = s.clone();
    let task = tokio::spawn(async move { s2.pull(&params("hf:org/tiny"), cb).await });
    let op = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(p) = events.lock().iter().find(|p| p.done > 0) {
            break p.operation.clone();
        }
    };
    assert_eq!(s.remove("hf:org/tiny").await.unwrap_err().code(), ErrorCode::Conflict);
    assert!(s.cancel(&op));
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.code(), ErrorCode::Cancelled, "{err}");
    assert!(!s.cancel(&op));
    assert!(s.list().unwrap().is_empty());
}

#[tokio::test]
async fn modelscope_pull_uses_its_layout() {
    let hub = FakeHub::start().await;
    let repo = tiny_repo(14);
    hub.add_ms("qwen/Tiny2.5-0.5B", repo.clone());
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let m = s.pull(&params("ms:qwen/Tiny2.5-0.5B"), |_| {}).await.unwrap();
    let folder = dir.path().join("models/qwen/Tiny2___5-0___5B");
    assert_eq!(m.path, folder);
    assert_eq!(m.revision, repo.commit);
    assert_eq!(std::fs::read(folder.join("model.safetensors")).unwrap(), pseudo_random(2 << 20, 14));
    assert!(!folder.join("pytorch_model.bin").exists());
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].id.as_str(), list[0].source.as_str()), ("ms:qwen/Tiny2.5-0.5B", "ms"));
    assert_eq!(list[0].size_bytes, m.size_bytes);
    // Again: verified files are not fetched again, even after the record is lost.
    std::fs::remove_file(folder.join(".llmd.json")).unwrap();
    hub.clear_log();
    s.pull(&params("ms:qwen/Tiny2.5-0.5B"), |_| {}).await.unwrap();
    assert!(hub.log().iter().all(|l| l.file.is_none()), "{:?}", hub.log());
    // A drop on ModelScope resumes too.
    std::fs::remove_file(folder.join("model.safetensors")).unwrap();
    hub.state.faults.lock().drop_after.insert("model.safetensors".into(), 1 << 20);
    s.pull(&params("ms:qwen/Tiny2.5-0.5B"), |_| {}).await.unwrap();
    let gets = hub.body_gets("model.safetensors");
    assert_eq!(gets.iter().map(|g| g.range_start).collect::<Vec<_>>(), [None, Some(1 << 20)]);
    assert!(s.remove("ms:qwen/Tiny2.5-0.5B").await.unwrap() >= 2 << 20);
    assert!(!folder.exists() && s.list().unwrap().is_empty());
    assert_eq!(s.pull(&params("ms:qwen/missing"), |_| {}).await.unwrap_err().code(), ErrorCode::NotFound);
}

#[tokio::test]
async fn files_without_oids_are_identified_by_head() {
    let hub = FakeHub::start().await;
    let mut repo = tiny_repo(15);
    repo.no_oids = true;
    hub.add_hf("org/tiny", repo.clone());
    let dir = tempfile::tempdir().unwrap();
    let m = store(dir.path(), &hub).pull(&params("hf:org/tiny"), |_| {}).await.unwrap();
    assert!(hub.log().iter().any(|l| l.method == "HEAD"));
    assert_eq!(
        std::fs::read_link(m.path.join("model.safetensors")).unwrap(),
        PathBuf::from(format!("../../blobs/{}", repo.files[4].sha256()))
    );
}

/// Every file whose body the hub (or its CDN) was asked for.
fn fetched_files(hub: &FakeHub) -> Vec<String> {
    let mut v: Vec<String> = hub.log().into_iter().filter(|l| l.method == "GET").filter_map(|l| l.file).collect();
    v.sort();
    v.dedup();
    v
}

fn refuse(message: &str) -> StoreError {
    StoreError::Refused { code: ErrorCode::InvalidArgument, message: message.into() }
}

#[tokio::test]
async fn a_checked_pull_shows_the_metadata_first_and_a_refusal_fetches_no_weights() {
    let hub = FakeHub::start().await;
    let repo = tiny_repo(16);
    hub.add_hf("org/tiny", repo.clone());
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);

    let seen = Arc::new(Mutex::new(None));
    let err = s
        .pull_checked(
            &params("hf:org/tiny"),
            |m| {
                *seen.lock() = Some(m.clone());
                // The metadata is on disk when the check runs.
                assert_eq!(std::fs::read_to_string(m.dir.join("config.json")).unwrap(), CONFIG);
                Err(refuse("architectures[0] = Qwen2ForCausalLM is not wanted here"))
            },
            |_| {},
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(err.to_string().contains("architectures[0] = Qwen2ForCausalLM"), "{err}");

    let m = seen.lock().clone().expect("the check was not called");
    assert_eq!(m.id, "hf:org/tiny");
    assert_eq!(m.revision, repo.commit);
    assert_eq!(m.dir, dir.path().join("models--org--tiny/snapshots").join(&repo.commit));
    assert_eq!(m.files.len(), repo.files.len());
    assert_eq!(m.weights, [llmd_store::RepoFile { path: "model.safetensors".into(), size: Some(2 << 20) }]);
    assert_eq!(m.weight_bytes(), Some(2 << 20));
    // Only the metadata was asked for; no weight file, not even partly, is on disk.
    assert_eq!(fetched_files(&hub), ["config.json", "tokenizer.json", "tokenizer_config.json"]);
    let mut on_disk: Vec<String> =
        std::fs::read_dir(&m.dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    on_disk.sort();
    assert_eq!(on_disk, ["config.json", "tokenizer.json", "tokenizer_config.json"]);
    let blobs = dir.path().join("models--org--tiny/blobs");
    let blob_bytes: u64 = std::fs::read_dir(&blobs).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    assert!(blob_bytes < 1024, "{blob_bytes} bytes of blobs");
    // The partial snapshot is neither listed nor taken for a load, and no ref names it.
    assert!(s.list().unwrap().is_empty());
    assert!(!dir.path().join("models--org--tiny/refs/main").exists());

    // Accepted: the weights follow, the metadata is not fetched again.
    hub.clear_log();
    let path = s.resolve_for_load_checked("hf:org/tiny", None, |_| Ok(()), |_| {}).await.unwrap();
    assert_eq!(path, m.dir);
    assert_eq!(fetched_files(&hub), ["model.safetensors"]);
    assert_eq!(s.list().unwrap().len(), 1);
    // Complete in the cache: a load takes it without asking the hub or the check.
    hub.clear_log();
    let again = s
        .resolve_for_load_checked("hf:org/tiny", None, |_| Err(refuse("must not be called for a cached model")), |_| {})
        .await
        .unwrap();
    assert_eq!(again, path);
    assert!(hub.log().is_empty(), "{:?}", hub.log());
}

/// A new commit whose metadata blobs are already in the cache (only the weights changed) is
/// still marked incomplete when the check refuses it: its snapshot holds nothing but links
/// that resolve, which without a record would read as a complete huggingface-cli download.
#[tokio::test]
async fn a_refused_commit_that_shares_metadata_blobs_stays_unlisted() {
    let hub = FakeHub::start().await;
    let old = tiny_repo(17);
    hub.add_hf("org/tiny", old.clone());
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    s.pull(&params("hf:org/tiny"), |_| {}).await.unwrap();
    let mut new = tiny_repo(18);
    new.files[4] = FakeFile::mem("model.safetensors", pseudo_random(1 << 20, 99), true);
    hub.add_hf("org/tiny", new.clone());
    hub.clear_log();
    let err = s.pull_checked(&params("hf:org/tiny"), |_| Err(refuse("no")), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert!(fetched_files(&hub).is_empty(), "{:?}", fetched_files(&hub));
    assert!(dir.path().join("models--org--tiny/snapshots").join(&new.commit).join("config.json").exists());
    let listed: Vec<_> = s.list().unwrap().into_iter().map(|m| m.path).collect();
    assert_eq!(listed, [dir.path().join("models--org--tiny/snapshots").join(&old.commit).display().to_string()]);
}

#[tokio::test]
async fn a_checked_modelscope_pull_keeps_a_refused_folder_unlisted() {
    let hub = FakeHub::start().await;
    hub.add_ms("qwen/Tiny", tiny_repo(19));
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path(), &hub);
    let err = s.pull_checked(&params("ms:qwen/Tiny"), |_| Err(refuse("no")), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    let folder = dir.path().join("models/qwen/Tiny");
    assert!(folder.join("config.json").is_file());
    assert!(!folder.join("model.safetensors").exists());
    assert_eq!(fetched_files(&hub), ["config.json", "tokenizer.json", "tokenizer_config.json"]);
    // config.json alone would make a record-less folder look complete; the record says not.
    assert!(s.list().unwrap().is_empty());
    hub.clear_log();
    let m = s.pull_checked(&params("ms:qwen/Tiny"), |_| Ok(()), |_| {}).await.unwrap();
    assert_eq!(m.path, folder);
    assert_eq!(fetched_files(&hub), ["model.safetensors"]);
    assert_eq!(s.list().unwrap().len(), 1);
}
