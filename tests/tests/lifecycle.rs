//! Daemon life cycle against the real binary: systemd notifications, watchdog, signals,
//! reload, stale and live sockets, config errors, --print-config.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use llmd_e2e::{Daemon, DaemonOptions, run_llmd};
use nix::sys::signal::Signal;

/// Collects sd_notify datagrams.
struct NotifyListener {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl NotifyListener {
    fn bind(path: &std::path::Path) -> NotifyListener {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        NotifyListener { sock, seen: Vec::new() }
    }

    /// Reads messages until one line equals `line`; returns the lines seen before it (this call).
    fn wait_for(&mut self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                for l in String::from_utf8_lossy(&buf[..n]).lines() {
                    self.seen.push(l.to_string());
                    if l == line {
                        return before;
                    }
                    before.push(l.to_string());
                }
            }
        }
        panic!("no `{line}` within {timeout:?}; got {:?}", self.seen);
    }
}

#[test]
fn notify_ready_watchdog_stopping_and_clean_exit() {
    let dir = llmd_e2e::open_tempdir();
    let notify_path = dir.path().join("notify.sock");
    let mut notify = NotifyListener::bind(&notify_path);
    let mut daemon = Daemon::start_with(DaemonOptions {
        env: vec![
            ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
            // 400 ms period: pings every 200 ms.
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        wait_ready: false,
        ..Default::default()
    });
    let before_ready = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(before_ready.iter().any(|l| l.starts_with("STATUS=binding")), "{before_ready:?}");
    // READY only after the socket is bound: the socket must exist now and answer.
    assert!(daemon.socket.exists(), "socket missing at READY=1");
    assert_eq!(llmd_e2e::health_phase(daemon.port).as_deref(), Some("ready"));
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));

    daemon.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    let status = daemon.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log_text());
    assert!(!daemon.socket.exists(), "socket not removed on exit");
}

#[test]
fn sigint_also_stops_cleanly() {
    let mut daemon = Daemon::start();
    daemon.signal(Signal::SIGINT);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_and_keeps_old_config_on_error() {
    let dir = llmd_e2e::open_tempdir();
    let notify_path = dir.path().join("notify.sock");
    let mut notify = NotifyListener::bind(&notify_path);
    let daemon = Daemon::start_with(DaemonOptions {
        env: vec![("NOTIFY_SOCKET".into(), notify_path.display().to_string())],
        ..Default::default()
    });
    notify.wait_for("READY=1", Duration::from_secs(30));

    let good =
        std::fs::read_to_string(&daemon.config).unwrap().replace("level = \"debug\"", "level = \"info,llmd=debug\"");
    std::fs::write(&daemon.config, &good).unwrap();
    daemon.signal(Signal::SIGHUP);
    notify.wait_for("RELOADING=1", Duration::from_secs(10));
    notify.wait_for("READY=1", Duration::from_secs(10));
    wait_log(&daemon, "configuration reloaded");

    std::fs::write(&daemon.config, format!("{good}\n[engine]\nblock_size = 7\n")).unwrap();
    daemon.signal(Signal::SIGHUP);
    notify.wait_for("RELOADING=1", Duration::from_secs(10));
    notify.wait_for("READY=1", Duration::from_secs(10));
    wait_log(&daemon, "reload failed, keeping the previous configuration");
    assert!(daemon.log_text().contains("engine.block_size"), "{}", daemon.log_text());

    // Still serving on both planes.
    let mut client = daemon.client().await;
    match client.call(llmd_proto::Request::Status, |_| {}).await.unwrap() {
        llmd_proto::Reply::Status(s) => assert_eq!(s.state, llmd_proto::DaemonState::Ready),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(llmd_e2e::health_phase(daemon.port).as_deref(), Some("ready"));
}

fn wait_log(daemon: &Daemon, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains(needle) {
        assert!(Instant::now() < deadline, "log never said {needle:?}:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced() {
    let dir = llmd_e2e::open_tempdir();
    let socket = dir.path().join("stale.sock");
    // A socket file nobody listens on, as a crashed run leaves behind.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let daemon = Daemon::start_with(DaemonOptions { socket: Some(socket.clone()), ..Default::default() });
    let mut client = daemon.client().await;
    assert!(matches!(client.call(llmd_proto::Request::Status, |_| {}).await, Ok(llmd_proto::Reply::Status(_))));
    assert!(daemon.log_text().contains("stale control socket"), "{}", daemon.log_text());
}

#[test]
fn live_daemon_on_the_socket_is_not_replaced() {
    let first = Daemon::start();
    let mut second = Daemon::start_with(DaemonOptions {
        socket: Some(first.socket.clone()),
        wait_ready: false,
        ..Default::default()
    });
    let status = second.wait_exit(Duration::from_secs(15));
    assert_ne!(status.code(), Some(0));
    assert!(second.log_text().contains("another llmd is already running"), "{}", second.log_text());
    // The first one is untouched.
    assert!(first.socket.exists());
    assert_eq!(llmd_e2e::health_phase(first.port).as_deref(), Some("ready"));
}

#[test]
fn bad_config_exits_78_naming_key_and_line() {
    let dir = llmd_e2e::open_tempdir();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[server]\nlisten = \"127.0.0.1:1\"\n\n[engine]\ngpu_memory_utilization = 3.0\n").unwrap();
    let (code, _, err) = run_llmd(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("engine.gpu_memory_utilization") && err.contains("line 5"), "{err}");

    std::fs::write(&cfg, "[control]\nsockett = \"/tmp/x\"\n").unwrap();
    let (code, _, err) = run_llmd(&["--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("sockett") && err.contains("line 2"), "{err}");

    let (code, _, err) = run_llmd(&["--config", "/nonexistent/llmd.toml"], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("/nonexistent/llmd.toml"), "{err}");

    // LLMD_CONFIG is honoured the same way.
    let (code, _, err) = run_llmd(&[], &[("LLMD_CONFIG", cfg.to_str().unwrap())]);
    assert_eq!(code, 78, "{err}");
}

#[test]
fn print_config_round_trips() {
    let dir = llmd_e2e::open_tempdir();
    let cfg = dir.path().join("in.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = \"0.0.0.0:9000\"\napi_keys = [\"sk-a\"]\n\n[engine]\nmax_num_seqs = 8\n\n\
         [[models]]\nsource = \"/srv/models/tiny\"\nname = \"tiny\"\ntp = 2\ngpus = [0, 1]\nreasoning_parser = \"qwen3\"\n",
    )
    .unwrap();
    let (code, first, err) = run_llmd(&["--config", cfg.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(first.contains("listen = \"0.0.0.0:9000\"") && first.contains("[[models]]"), "{first}");
    let out = dir.path().join("out.toml");
    std::fs::write(&out, &first).unwrap();
    let (code, second, err) = run_llmd(&["--config", out.to_str().unwrap(), "--print-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(first, second);
}

#[test]
fn dev_mode_defaults_and_env_precedence() {
    let home = llmd_e2e::open_tempdir();
    let home_s = home.path().to_str().unwrap();
    let (code, out, err) = run_llmd(
        &["--dev", "--print-config"],
        &[("HOME", home_s), ("XDG_RUNTIME_DIR", "/run/user/4242"), ("HF_ENDPOINT", "https://hf-mirror.com")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("socket = \"/run/user/4242/llmd/llmd.sock\""), "{out}");
    assert!(out.contains(&format!("models_dir = \"{home_s}/.local/share/llmd/models\"")), "{out}");
    assert!(out.contains("dbus = \"session\""), "{out}");
    assert!(out.contains("listen = \"127.0.0.1:8000\""), "{out}");
    assert!(out.contains("hf_endpoint = \"https://hf-mirror.com\""), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_models_load_before_ready() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/qwen2").canonicalize().unwrap();
    let dir = llmd_e2e::open_tempdir();
    let notify_path = dir.path().join("notify.sock");
    let mut notify = NotifyListener::bind(&notify_path);
    let mut daemon = Daemon::start_with(DaemonOptions {
        extra_toml: format!("[[models]]\nsource = {:?}\nname = \"tiny\"\n", model.display().to_string()),
        env: vec![("NOTIFY_SOCKET".into(), notify_path.display().to_string())],
        // Read the notifications while it starts, as systemd does.
        wait_ready: false,
        ..Default::default()
    });
    let before = notify.wait_for("READY=1", Duration::from_secs(60));
    assert!(before.iter().any(|l| l == "STATUS=loading model tiny (1/1)"), "{before:?}");
    assert!(before.iter().any(|l| l.starts_with("EXTEND_TIMEOUT_USEC=")), "{before:?}");
    daemon.wait_ready(Duration::from_secs(10));
    let mut client = daemon.client().await;
    match client.call(llmd_proto::Request::Ps, |_| {}).await.unwrap() {
        llmd_proto::Reply::Ps { models } => {
            assert_eq!(models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["tiny"])
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_configured_model_that_cannot_load_fails_the_start() {
    let mut daemon = Daemon::start_with(DaemonOptions {
        extra_toml: "[[models]]\nsource = \"/nonexistent/model\"\nname = \"ghost\"\n".into(),
        wait_ready: false,
        ..Default::default()
    });
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    assert!(daemon.log_text().contains("cannot load model `ghost`"), "{}", daemon.log_text());
    assert!(!daemon.socket.exists(), "socket left behind");
}
