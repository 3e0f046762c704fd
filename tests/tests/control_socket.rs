//! The control socket against the real daemon: permissions, handshake, typed errors for bad
//! frames, frame size cap, and refusal of mutating methods for an unauthorized uid.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use llmd_e2e::{Daemon, bin, can_switch_uid, run_as_nobody};
use llmd_proto::framing::{read_message, write_frame};
use llmd_proto::{ClientError, ErrorCode, PROTOCOL_VERSION, Reply, Request, ServerFrame};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

async fn raw(daemon: &Daemon) -> UnixStream {
    UnixStream::connect(&daemon.socket).await.expect("connect")
}

async fn send_json(s: &mut UnixStream, json: &str) {
    write_frame(s, json.as_bytes()).await.expect("write frame");
}

async fn recv(s: &mut UnixStream) -> Option<ServerFrame> {
    tokio::time::timeout(Duration::from_secs(10), read_message::<_, ServerFrame>(s))
        .await
        .expect("answer in time")
        .expect("frame")
}

async fn hello(s: &mut UnixStream) {
    send_json(s, &format!(r#"{{"id":0,"request":{{"method":"hello","protocol":{PROTOCOL_VERSION},"client":"e2e"}}}}"#))
        .await;
    match recv(s).await {
        Some(ServerFrame::Reply { id: 0, reply: Reply::Hello(w) }) => assert_eq!(w.protocol, PROTOCOL_VERSION),
        other => panic!("bad hello answer {other:?}"),
    }
}

fn error_code(frame: Option<ServerFrame>) -> (u64, ErrorCode) {
    match frame {
        Some(ServerFrame::Error { id, error }) => (id, error.code),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[test]
fn socket_is_0660_with_the_control_group() {
    let daemon = Daemon::start();
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), nix::unistd::getgid().as_raw());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_get_typed_errors_and_the_daemon_keeps_serving() {
    let daemon = Daemon::start();
    let mut s = raw(&daemon).await;
    hello(&mut s).await;

    send_json(&mut s, "this is not json").await;
    assert_eq!(error_code(recv(&mut s).await), (0, ErrorCode::BadFrame));
    send_json(&mut s, r#"{"id":4}"#).await;
    assert_eq!(error_code(recv(&mut s).await), (4, ErrorCode::BadFrame));
    send_json(&mut s, r#"{"id":5,"request":{"method":"explode"}}"#).await;
    assert_eq!(error_code(recv(&mut s).await), (5, ErrorCode::UnknownMethod));
    send_json(&mut s, r#"{"id":6,"request":{"method":"unload"}}"#).await;
    assert_eq!(error_code(recv(&mut s).await), (6, ErrorCode::InvalidArgument));
    send_json(&mut s, r#"{"id":7,"request":{"method":"unload","name":"nope"}}"#).await;
    assert_eq!(error_code(recv(&mut s).await), (7, ErrorCode::NotFound));
    // GPU telemetry answers on any host: GPUs, or why there are none (no driver).
    send_json(&mut s, r#"{"id":8,"request":{"method":"gpus"}}"#).await;
    match recv(&mut s).await {
        Some(ServerFrame::Reply { id: 8, reply: Reply::Gpus(r) }) => {
            assert!(r.unavailable.is_some() || !r.gpus.is_empty(), "{r:?}")
        }
        other => panic!("bad gpus answer {other:?}"),
    }
    // A store request with a bad reference is a typed error too.
    send_json(&mut s, r#"{"id":10,"request":{"method":"rm","model":"hf:../etc"}}"#).await;
    assert_eq!(error_code(recv(&mut s).await), (10, ErrorCode::InvalidArgument));

    // Same connection still works.
    send_json(&mut s, r#"{"id":9,"request":{"method":"status"}}"#).await;
    match recv(&mut s).await {
        Some(ServerFrame::Reply { id: 9, reply: Reply::Status(st) }) => {
            assert_eq!(st.socket, daemon.socket.display().to_string());
            assert_eq!(st.http_listen, format!("127.0.0.1:{}", daemon.port));
        }
        other => panic!("bad status answer {other:?}"),
    }
    send_json(&mut s, r#"{"id":10,"request":{"method":"ps"}}"#).await;
    assert!(matches!(recv(&mut s).await, Some(ServerFrame::Reply { id: 10, reply: Reply::Ps { .. } })));

    // Oversized: announced length over 1 MiB → frame_too_large, then the daemon closes.
    s.write_all(&((2u32 << 20).to_be_bytes())).await.unwrap();
    assert_eq!(error_code(recv(&mut s).await), (0, ErrorCode::FrameTooLarge));
    assert!(recv(&mut s).await.is_none(), "connection should be closed after an oversized frame");

    // The daemon still serves new connections and HTTP.
    let mut client = daemon.client().await;
    assert!(matches!(client.call(Request::Status, |_| {}).await, Ok(Reply::Status(_))));
    assert_eq!(llmd_e2e::health_phase(daemon.port).as_deref(), Some("ready"));
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_is_enforced() {
    let daemon = Daemon::start();
    let mut s = raw(&daemon).await;
    send_json(&mut s, r#"{"id":1,"request":{"method":"status"}}"#).await;
    assert_eq!(error_code(recv(&mut s).await), (1, ErrorCode::VersionMismatch));
    assert!(recv(&mut s).await.is_none());

    let mut s = raw(&daemon).await;
    send_json(&mut s, r#"{"id":0,"request":{"method":"hello","protocol":999,"client":"future"}}"#).await;
    assert_eq!(error_code(recv(&mut s).await), (0, ErrorCode::VersionMismatch));
}

#[tokio::test(flavor = "multi_thread")]
async fn load_errors_are_typed_and_harmless() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let err = client
        .call(Request::Load(llmd_proto::LoadParams { source: "/does/not/exist".into(), ..Default::default() }), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Remote(ref e) if e.code == ErrorCode::NotFound), "{err}");
    let models = daemon.dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let err = client
        .call(
            Request::Load(llmd_proto::LoadParams { source: models.display().to_string(), ..Default::default() }),
            |_| {},
        )
        .await
        .unwrap_err();
    // An empty folder is not a model: the engine refuses it with a typed error naming the file.
    assert!(matches!(err, ClientError::Remote(ref e) if e.code == ErrorCode::Failed), "{err}");
    assert!(err.to_string().contains("cannot load `models`"), "{err}");
    assert!(matches!(client.call(Request::Ps, |_| {}).await, Ok(Reply::Ps { models }) if models.is_empty()));
}

#[test]
fn another_uid_is_refused_mutating_methods() {
    if !can_switch_uid() {
        eprintln!("SKIPPED another_uid_is_refused_mutating_methods: needs root and setpriv (CI runs as root)");
        return;
    }
    let daemon = Daemon::start();
    let client = bin("llmd-e2e-client");
    let sock = daemon.socket.to_str().unwrap();

    // 0660 root:root: nobody cannot even connect.
    let (code, out, err) = run_as_nobody(&client, &["socket", sock, r#"{"method":"status"}"#], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("err connect") && out.contains("permission denied"), "{out}");

    // Open the file up (as if nobody were in the group by mistake): the daemon's own
    // peer-credential check must still refuse mutating calls but serve read-only ones.
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (_, out, err) = run_as_nobody(&client, &["socket", sock, r#"{"method":"status"}"#], &[]);
    assert!(out.starts_with("ok "), "{out} {err}");
    for req in
        [r#"{"method":"unload","name":"x"}"#, r#"{"method":"load","source":"/tmp"}"#, r#"{"method":"rm","model":"x"}"#]
    {
        let (_, out, err) = run_as_nobody(&client, &["socket", sock, req], &[]);
        assert!(out.starts_with("err permission_denied") && out.contains("uid 65534"), "{req}: {out} {err}");
    }
    let log = daemon.log_text();
    assert!(log.contains("refused mutating call") && log.contains("uid=65534"), "{log}");

    // Root (the daemon's uid) is allowed: the same call gets past authorization.
    let (_, out, _) = llmd_e2e_run(&client, &["socket", sock, r#"{"method":"unload","name":"x"}"#]);
    assert!(out.starts_with("err not_found"), "{out}");
    assert!(daemon.log_text().contains("mutating call"));
}

fn llmd_e2e_run(program: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(program).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_cap_and_idle_timeout() {
    let daemon = Daemon::start_with(llmd_e2e::DaemonOptions {
        control_extra: "max_connections = 3\nidle_timeout_secs = 1".into(),
        ..Default::default()
    });
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = raw(&daemon).await;
        hello(&mut s).await;
        held.push(s);
    }
    // The fourth is told why and closed.
    let mut extra = raw(&daemon).await;
    match recv(&mut extra).await {
        Some(ServerFrame::Error { error, .. }) => {
            assert_eq!(error.code, ErrorCode::Unavailable);
            assert!(error.message.contains("limit 3"), "{}", error.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Idle connections are closed after idle_timeout_secs, freeing the slots.
    for s in &mut held {
        assert!(recv(s).await.is_none(), "idle connection not closed");
    }
    let mut client = daemon.client().await;
    assert!(matches!(client.call(Request::Status, |_| {}).await, Ok(Reply::Status(_))));
}

/// The tiny Qwen2 checkpoint committed under tests/fixtures (random weights, real layout).
fn fixture_model() -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/qwen2");
    p.canonicalize().expect("tests/fixtures/models/qwen2").display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn load_ps_unload_a_real_model() {
    let daemon = Daemon::start();
    let mut client = daemon.client().await;
    let mut progress = Vec::new();
    let params = llmd_proto::LoadParams { source: fixture_model(), name: Some("tiny".into()), ..Default::default() };
    let loaded = match client.call(Request::Load(params.clone()), |p| progress.push(p.clone())).await {
        Ok(Reply::Loaded(m)) => m,
        other => panic!("load failed: {other:?}\n{}", daemon.log_text()),
    };
    assert_eq!(loaded.name, "tiny");
    assert_eq!(loaded.architecture, "Qwen2ForCausalLM");
    // The dtype shown is the one computed in (the fixture is stored in another).
    let served = match loaded.device {
        llmd_proto::Backend::Cpu => llmd_proto::Dtype::Float32,
        llmd_proto::Backend::Cuda => llmd_proto::Dtype::BFloat16,
    };
    assert_eq!(loaded.dtype, served);
    assert!(!progress.is_empty() && progress.iter().all(|p| p.operation.starts_with("load-") && p.model == "tiny"));

    // A dtype no backend computes in is refused, naming it, not accepted and ignored.
    let float16 = llmd_proto::LoadParams {
        name: Some("tiny-f16".into()),
        dtype: Some(llmd_proto::DtypeChoice::Fixed(llmd_proto::Dtype::Float16)),
        ..params.clone()
    };
    let err = client.call(Request::Load(float16), |_| {}).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Remote(ref e) if e.code == ErrorCode::InvalidArgument
            && e.message.contains("`dtype` = float16 is not served by the")),
        "{err}"
    );

    // Loading the same name again is a conflict, not a second copy.
    let err = client.call(Request::Load(params), |_| {}).await.unwrap_err();
    assert!(matches!(err, ClientError::Remote(ref e) if e.code == ErrorCode::Conflict), "{err}");

    match client.call(Request::Ps, |_| {}).await.unwrap() {
        Reply::Ps { models } => {
            assert_eq!(models.len(), 1);
            assert_eq!(models[0].name, "tiny");
            assert!(models[0].kv_blocks_total > 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    match client.call(Request::Status, |_| {}).await.unwrap() {
        Reply::Status(s) => assert_eq!(s.models_loaded, 1),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(client.call(Request::Unload { name: "tiny".into() }, |_| {}).await, Ok(Reply::Unloaded { .. })));
    assert!(matches!(client.call(Request::Ps, |_| {}).await, Ok(Reply::Ps { models }) if models.is_empty()));
}
