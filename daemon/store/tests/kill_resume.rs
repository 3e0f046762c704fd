//! `kill -9` during a pull, then the same pull again: finished files are not fetched again and
//! the interrupted one resumes from the bytes on disk.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{FakeFile, FakeHub, FakeRepo};
use llmd_proto::PullParams;
use llmd_store::{Store, StoreConfig};
use sha2::Digest;

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_download_then_pull_again_resumes() {
    const SIZE: usize = 16 << 20;
    let hub = FakeHub::start().await;
    let weights = data(SIZE);
    let sha = hex::encode(sha2::Sha256::digest(&weights));
    let repo = FakeRepo::new(
        0x42,
        vec![
            FakeFile::mem("config.json", r#"{"architectures": ["LlamaForCausalLM"]}"#, false),
            FakeFile::mem("model.safetensors", weights, true),
        ],
    );
    hub.add_hf("org/big", repo.clone());
    // About 6 MB/s, so the child is surely mid-file when killed.
    hub.state.faults.lock().throttle.insert("model.safetensors".into(), Duration::from_millis(10));
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmd-store-pull"))
        .args(["--models-dir", dir.path().to_str().unwrap(), "--hf-endpoint", &hub.url, "hf:org/big"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let incomplete = dir.path().join("models--org--big/blobs").join(format!("{sha}.incomplete"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let len = std::fs::metadata(&incomplete).map(|m| m.len()).unwrap_or(0);
        if len >= 3 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the child never got 3 MiB into the file");
        assert!(child.try_wait().unwrap().is_none(), "the child ended before it was killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = std::fs::metadata(&incomplete).unwrap().len();
    assert!(partial >= 3 << 20 && partial < SIZE as u64, "{partial}");
    let first_run_config_gets = hub.body_gets("config.json").len();
    assert_eq!(first_run_config_gets, 1);

    let mut cfg = StoreConfig::new(dir.path());
    cfg.hf_endpoint = hub.url.clone();
    cfg.disk_reserve_bytes = 0;
    let store = Store::new(cfg).unwrap();
    assert!(store.list().unwrap().is_empty(), "the killed pull must not look complete");

    hub.state.faults.lock().throttle.clear();
    hub.clear_log();
    let m = store.pull(&PullParams { source: "hf:org/big".into(), ..Default::default() }, |_| {}).await.unwrap();
    let gets = hub.body_gets("model.safetensors");
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].range_start, Some(partial), "resumed from the bytes on disk");
    assert_eq!(gets[0].sent(), SIZE as u64 - partial, "finished bytes were fetched again");
    assert!(hub.body_gets("config.json").is_empty(), "a finished file was fetched again");
    let on_disk = std::fs::read(m.path.join("model.safetensors")).unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&on_disk)), sha);
    assert!(!incomplete.exists());
    assert_eq!(store.list().unwrap().len(), 1);
}
