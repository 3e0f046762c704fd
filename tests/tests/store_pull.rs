//! The model store through the real daemon and llmctl, against llmd-store's fake Hugging Face
//! hub: `llmctl pull`, `list`, `load` of a hub id (from the cache, and pulled on demand with
//! progress frames), `rm` refused while loaded, then removed.

#[path = "../../daemon/store/tests/common/mod.rs"]
mod fakehub;

use fakehub::{FakeFile, FakeHub, FakeRepo};
use llmd_e2e::{Daemon, DaemonOptions, fixture_model};
use llmd_proto::{ErrorCode, LoadParams, ProgressUnit, Reply, Request};
use serde_json::Value;

/// The qwen2 fixture as a hub repository (weights as an LFS file on the CDN host).
fn qwen2_repo(seed: u8) -> FakeRepo {
    let dir = fixture_model("qwen2");
    let files =
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
            .into_iter()
            .map(|f| FakeFile::mem(f, std::fs::read(dir.join(f)).unwrap(), f.ends_with(".safetensors")))
            .collect();
    FakeRepo::new(seed, files)
}

async fn llmctl(daemon: &Daemon, args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let socket = daemon.socket.clone();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(llmd_e2e::bin("llmctl"))
            .arg("--socket")
            .arg(&socket)
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run llmctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

async fn list(daemon: &Daemon) -> Vec<Value> {
    let (code, out, err) = llmctl(daemon, &["list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["models"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_list_load_rm_through_llmctl() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", qwen2_repo(1));
    hub.add_hf("org/other", qwen2_repo(2));
    let daemon =
        Daemon::start_with(DaemonOptions { env: vec![("HF_ENDPOINT".into(), hub.url.clone())], ..Default::default() });

    // Pull: files land in the Hugging Face cache layout under storage.models_dir.
    let (code, out, err) = llmctl(&daemon, &["pull", "hf:org/tiny", "--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}\nlog:\n{}", daemon.log_text());
    let models = list(&daemon).await;
    assert_eq!(models.len(), 1, "{models:?}");
    let m = &models[0];
    assert_eq!(m["id"], "hf:org/tiny");
    assert_eq!(m["source"], "hf");
    assert_eq!(m["architecture"], "Qwen2ForCausalLM");
    assert_eq!(m["loaded"], false);
    let path = m["path"].as_str().unwrap();
    assert!(path.starts_with(&daemon.dir.path().join("models/models--org--tiny/snapshots").display().to_string()));
    assert!(std::path::Path::new(path).join("model.safetensors").exists());

    // Load by bare hub id: served from the cache, nothing downloaded again.
    hub.clear_log();
    let (code, out, err) = llmctl(&daemon, &["load", "org/tiny", "--name", "tiny", "--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(hub.body_gets("model.safetensors").is_empty(), "cached weights fetched again");
    assert_eq!(list(&daemon).await[0]["loaded"], true);

    // Removing a loaded model is refused; the files stay.
    let (code, _, err) = llmctl(&daemon, &["rm", "hf:org/tiny"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("loaded as `tiny`") && err.contains("unload"), "{err}");
    assert!(std::path::Path::new(path).exists());

    // Load of a hub id that is not cached pulls it first, reporting download progress.
    let mut client = daemon.client().await;
    let mut progress = Vec::new();
    let reply = client
        .call(
            Request::Load(LoadParams {
                source: "hf:org/other".into(),
                name: Some("other".into()),
                ..Default::default()
            }),
            |p| progress.push(p.clone()),
        )
        .await;
    assert!(matches!(reply, Ok(Reply::Loaded(ref m)) if m.name == "other"), "{reply:?}");
    let bytes: Vec<_> = progress.iter().filter(|p| p.unit == ProgressUnit::Bytes).collect();
    assert!(!bytes.is_empty(), "no download progress: {progress:?}");
    assert!(bytes.iter().all(|p| p.operation.starts_with("pull-") && p.model.contains("org/other")), "{bytes:?}");
    assert!(progress.iter().any(|p| p.operation.starts_with("load-")), "no load progress: {progress:?}");
    assert_eq!(hub.body_gets("model.safetensors").len(), 1);

    // Unload, then remove: gone from disk and from the list.
    let (code, _, err) = llmctl(&daemon, &["unload", "tiny"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = llmctl(&daemon, &["rm", "hf:org/tiny", "--json"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let removed: Value = serde_json::from_str(&out).unwrap();
    assert!(removed["freed_bytes"].as_u64().unwrap() > 400_000, "{out}");
    assert!(!daemon.dir.path().join("models/models--org--tiny").exists());
    let ids: Vec<String> = list(&daemon).await.iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, ["hf:org/other"]);

    // A repository the hub does not know: a typed not-found error, the daemon keeps serving.
    let reply = client
        .call(Request::Pull(llmd_proto::PullParams { source: "hf:org/ghost".into(), ..Default::default() }), |_| {})
        .await;
    match reply {
        Err(llmd_proto::ClientError::Remote(e)) => assert_eq!(e.code, ErrorCode::NotFound, "{e:?}"),
        other => panic!("expected not found, got {other:?}"),
    }
    let (code, _, err) = llmctl(&daemon, &["rm", "hf:org/ghost"]).await;
    assert_ne!(code, 0, "{err}");
    assert_eq!(list(&daemon).await.len(), 1);
}

/// A pull over D-Bus: the reply names the stored model and download progress arrives as
/// `Progress` signals on the bus.
#[tokio::test(flavor = "multi_thread")]
async fn pull_over_dbus_emits_progress_signals() {
    use futures::StreamExt;

    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", qwen2_repo(3));
    let bus = llmd_e2e::TestBus::start();
    let daemon = Daemon::start_with(DaemonOptions {
        dbus: "session".into(),
        env: vec![("DBUS_SESSION_BUS_ADDRESS".into(), bus.address.clone()), ("HF_ENDPOINT".into(), hub.url.clone())],
        ..Default::default()
    });
    let conn = bus.connect().await;
    let proxy = llmd_proto::dbus::ManagerProxy::new(&conn).await.unwrap();
    let mut signals = proxy.receive_progress().await.unwrap();

    let reply = proxy.pull("hf:org/tiny", "{}").await.unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log_text()));
    let stored: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(stored["id"], "hf:org/tiny");
    assert_eq!(stored["architecture"], "Qwen2ForCausalLM");

    let first = tokio::time::timeout(std::time::Duration::from_secs(5), signals.next())
        .await
        .expect("no Progress signal within 5 s")
        .expect("signal stream ended");
    let args = first.args().unwrap();
    assert!(args.operation().starts_with("pull-"), "{}", args.operation());
    let p: llmd_proto::Progress = serde_json::from_str(args.progress_json()).unwrap();
    assert_eq!(&p.operation, args.operation());
    assert!(p.model.contains("org/tiny"), "{p:?}");
}

/// The qwen2 fixture repository with its config.json changed by `edit`.
fn with_config(mut repo: FakeRepo, edit: impl FnOnce(&mut Value)) -> FakeRepo {
    let f = repo.files.iter_mut().find(|f| f.path == "config.json").unwrap();
    let mut cfg: Value =
        serde_json::from_slice(&std::fs::read(fixture_model("qwen2").join("config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    *f = FakeFile::mem("config.json", serde_json::to_vec(&cfg).unwrap(), false);
    repo
}

/// The files whose bodies the hub (or its CDN) was asked for, sorted.
fn fetched(hub: &FakeHub) -> Vec<String> {
    let mut files: Vec<String> = hub.log().into_iter().filter(|l| l.method == "GET").filter_map(|l| l.file).collect();
    files.sort();
    files.dedup();
    files
}

/// Bytes of the blobs of a repository in the Hugging Face cache, and whether any is partial.
fn blobs(daemon: &Daemon, folder: &str) -> (u64, bool) {
    let dir = daemon.dir.path().join("models").join(folder).join("blobs");
    let mut bytes = 0;
    let mut partial = false;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let e = e.unwrap();
        partial |= e.file_name().to_string_lossy().ends_with(".incomplete");
        bytes += e.metadata().unwrap().len();
    }
    (bytes, partial)
}

const METADATA: [&str; 4] = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"];

/// A model llmd cannot serve is refused by `llmctl pull` and `llmctl load` once its config and
/// tokenizer files are in: no weight file is asked of the hub, the cache holds only those
/// files and does not list the model. An explicit `--include` still downloads it.
#[tokio::test(flavor = "multi_thread")]
async fn unservable_models_are_refused_before_their_weights() {
    let hub = FakeHub::start().await;
    let deepseek = with_config(qwen2_repo(4), |c| c["architectures"] = serde_json::json!(["DeepseekV3ForCausalLM"]));
    hub.add_hf("deepseek-ai/DeepSeek-R1", deepseek.clone());
    hub.add_hf(
        "org/tiny-fp8",
        with_config(qwen2_repo(5), |c| {
            c["quantization_config"] = serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]})
        }),
    );
    let daemon =
        Daemon::start_with(DaemonOptions { env: vec![("HF_ENDPOINT".into(), hub.url.clone())], ..Default::default() });

    let (code, out, err) = llmctl(&daemon, &["pull", "hf:deepseek-ai/DeepSeek-R1"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains(
            "config.json: architectures[0] = DeepseekV3ForCausalLM is not supported (llmd serves LlamaForCausalLM, "
        ) && err.contains("(invalid_argument)"),
        "{err}"
    );
    assert_eq!(fetched(&hub), METADATA, "the hub was asked for more than the metadata");
    let metadata_bytes: u64 =
        deepseek.files.iter().filter(|f| METADATA.contains(&f.path.as_str())).map(|f| f.content.len()).sum();
    assert_eq!(blobs(&daemon, "models--deepseek-ai--DeepSeek-R1"), (metadata_bytes, false));
    assert!(list(&daemon).await.is_empty());

    // A load of it is refused the same way, over the socket with the typed code; the metadata
    // already in the cache is not fetched again.
    hub.clear_log();
    let mut client = daemon.client().await;
    let reply = client
        .call(Request::Load(LoadParams { source: "hf:deepseek-ai/DeepSeek-R1".into(), ..Default::default() }), |_| {})
        .await;
    match reply {
        Err(llmd_proto::ClientError::Remote(e)) => {
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
            assert!(e.message.contains("architectures[0] = DeepseekV3ForCausalLM"), "{e:?}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(fetched(&hub).is_empty(), "{:?}", fetched(&hub));
    let (code, out, _) = llmctl(&daemon, &["ps", "--json"]).await;
    assert_eq!(code, 0);
    assert!(!out.contains("DeepSeek"), "{out}");

    // Quantized weights are refused by their method.
    let (code, _, err) = llmctl(&daemon, &["load", "hf:org/tiny-fp8", "--name", "fp8"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("quantization_config.quant_method = fp8 is not supported"), "{err}");
    assert!(hub.body_gets("model.safetensors").is_empty());

    // Naming the files downloads them anyway (unchecked), and the model is listed.
    let (code, out, err) = llmctl(&daemon, &["pull", "hf:deepseek-ai/DeepSeek-R1", "--include", "*"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(hub.body_gets("model.safetensors").len(), 1);
    let listed = list(&daemon).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["architecture"], "DeepseekV3ForCausalLM");
}

/// A load that cannot fit where it would run is refused before the weights too (here a CPU KV
/// cache budget larger than any host's memory); a plain pull of the same model still works.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_that_cannot_fit_is_refused_before_its_weights() {
    let hub = FakeHub::start().await;
    hub.add_hf("org/tiny", qwen2_repo(6));
    let daemon = Daemon::start_with(DaemonOptions {
        env: vec![("HF_ENDPOINT".into(), hub.url.clone())],
        extra_toml: format!("[engine]\ncpu_kv_cache_bytes = {}\n", 1u64 << 49),
        ..Default::default()
    });
    let (code, out, err) = llmctl(&daemon, &["load", "hf:org/tiny", "--name", "tiny"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("cannot load `tiny` on the CPU: it needs")
            && err.contains("engine.cpu_kv_cache_bytes 524288.0 GiB")
            && err.contains("(insufficient_resources)"),
        "{err}"
    );
    assert_eq!(fetched(&hub), METADATA);

    let (code, out, err) = llmctl(&daemon, &["pull", "hf:org/tiny"]).await;
    assert_eq!(code, 0, "{out}\n{err}\nlog:\n{}", daemon.log_text());
    assert_eq!(hub.body_gets("model.safetensors").len(), 1);
    assert_eq!(list(&daemon).await.len(), 1);
}
