//! End-to-end test harness: starts the real `llmd` binary with a temp config (free port, temp
//! socket), waits until it is ready, talks to it over its real socket, HTTP port and D-Bus, and
//! kills it on drop.
//!
//! Binaries are found next to the test executable (`target/debug/llmd`, `target/debug/llmctl`);
//! `cargo test --workspace` builds them because this and the daemon's packages have
//! integration tests.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use llmd_testenv::Tool;

/// Path of a binary built by this workspace (`llmd`, `llmctl`, `llmd-e2e-client`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> → target/debug/<name>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind :0").local_addr().expect("local_addr").port()
}

/// A temp folder every user can traverse (tests run clients as `nobody`).
pub fn open_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("llmd-e2e-").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod tempdir");
    dir
}

/// How to start a daemon.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Extra TOML appended to the generated config (may add tables such as `[[models]]`).
    pub extra_toml: String,
    /// Extra keys inside the generated `[control]` table (e.g. `max_connections = 2`).
    pub control_extra: String,
    /// Extra keys inside the generated `[server]` table (e.g. `api_keys = ["sk-test"]`).
    pub server_extra: String,
    /// `control.dbus`; "off" unless a test starts a bus.
    pub dbus: String,
    pub env: Vec<(String, String)>,
    /// Socket path; defaults to `<dir>/llmd.sock`.
    pub socket: Option<PathBuf>,
    /// Wait for /health to answer 200 before returning.
    pub wait_ready: bool,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            extra_toml: String::new(),
            control_extra: String::new(),
            server_extra: String::new(),
            dbus: "off".into(),
            env: Vec::new(),
            socket: None,
            wait_ready: true,
        }
    }
}

/// A running `llmd`; killed (SIGKILL) on drop unless it already exited.
#[derive(Debug)]
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonOptions::default())
    }

    pub fn start_with(opts: DaemonOptions) -> Daemon {
        let dir = open_tempdir();
        let socket = opts.socket.clone().unwrap_or_else(|| dir.path().join("llmd.sock"));
        let port = free_port();
        let config = dir.path().join("llmd.toml");
        std::fs::write(
            &config,
            Daemon::config_text(
                port,
                &socket,
                dir.path(),
                &opts.dbus,
                &format!("{}\n", opts.server_extra),
                &format!("{}\n", opts.control_extra),
                &opts.extra_toml,
            ),
        )
        .expect("write config");
        let log = dir.path().join("llmd.log");
        let child = spawn_llmd(&config, dir.path(), &log, &opts.env);
        let mut daemon = Daemon { dir, config, socket, port, log, child: Some(child) };
        if opts.wait_ready {
            daemon.wait_ready(Duration::from_secs(60));
        }
        daemon
    }

    /// The config the harness writes: free port, temp socket, group root (tests run as root),
    /// temp models dir, debug logs on stderr.
    pub fn config_text(
        port: u16,
        socket: &Path,
        dir: &Path,
        dbus: &str,
        server_extra: &str,
        control_extra: &str,
        extra: &str,
    ) -> String {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_timeout_secs = 5\n{server_extra}\n\
             [control]\nsocket = {socket:?}\ngroup = {group:?}\ndbus = {dbus:?}\n{control_extra}\n\
             [storage]\nmodels_dir = {models:?}\n\n\
             [log]\nlevel = \"debug\"\ntarget = \"stderr\"\n\n{extra}",
            socket = socket.display().to_string(),
            group = own_group_name(),
            models = dir.join("models").display().to_string(),
        )
    }

    /// Runs the real `llmctl --socket <socket> args...` to completion: (exit code, stdout, stderr).
    pub fn llmctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("llmctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .output()
            .expect("run llmctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Everything llmd wrote to stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls GET /health until it reports the phase `ready` (200 with models, 503 `no_model`
    /// without); panics with the log if the daemon exits first.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                panic!("llmd exited ({status}) before becoming ready; log:\n{}", self.log_text());
            }
            if health_phase(self.port).as_deref() == Some("ready") {
                return;
            }
            assert!(Instant::now() < deadline, "llmd not ready after {timeout:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            assert!(Instant::now() < deadline, "llmd did not exit within {timeout:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// A handshaken protocol client on the daemon's socket.
    pub async fn client(&self) -> llmd_proto::Client {
        llmd_proto::Client::connect(&self.socket, "llmd", "llmd-e2e").await.expect("connect to llmd")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Absolute path of a tiny test model under `tests/fixtures/models/` (`qwen2`, `qwen3`, ...).
pub fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models").join(name).canonicalize().expect("fixture model")
}

/// Name of the group of the user running the tests (root in CI).
pub fn own_group_name() -> String {
    nix::unistd::Group::from_gid(nix::unistd::getgid()).ok().flatten().map(|g| g.name).unwrap_or_else(|| "root".into())
}

/// Starts `llmd --config <config>` with a clean environment plus `env`; stdout and stderr go to `log`.
pub fn spawn_llmd(config: &Path, home: &Path, log: &Path, env: &[(String, String)]) -> Child {
    let out = std::fs::File::create(log).expect("create log");
    let err = out.try_clone().expect("clone log");
    let mut cmd = Command::new(bin("llmd"));
    cmd.arg("--config")
        .arg(config)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).spawn().expect("spawn llmd")
}

/// Runs `llmd` with `args` to completion: (exit code, stdout, stderr).
pub fn run_llmd(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin("llmd"));
    cmd.args(args).env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run llmd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Status code of a plain HTTP/1.1 GET, or None if nothing answers.
pub fn http_get_status(port: u16, path: &str) -> Option<u16> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A plain HTTP/1.1 GET: (status, body), or None if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

/// The `phase` of GET /health (`starting`, `ready`, `stopping`), whatever its status code:
/// a ready daemon without models answers 503 `no_model` with phase `ready`.
pub fn health_phase(port: u16) -> Option<String> {
    let (_, body) = http_get(port, "/health")?;
    let json: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    json.get("phase")?.as_str().map(str::to_string)
}

/// True when the tests run as root, so they can switch to `nobody` with `setpriv` (installed
/// first if missing).
pub fn can_switch_uid() -> bool {
    if !llmd_testenv::is_root() {
        return false;
    }
    llmd_testenv::require(Tool::Setpriv);
    true
}

/// Runs `program args` as uid/gid 65534 (nobody) with no supplementary groups:
/// (exit code, stdout, stderr).
pub fn run_as_nobody(program: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(llmd_testenv::require(Tool::Setpriv));
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(program).args(args);
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run setpriv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A private `dbus-daemon` for one test, open to every uid (so a test can call as `nobody`
/// and see the daemon's own authorization, not the bus policy, refuse it).
#[derive(Debug)]
pub struct TestBus {
    pub address: String,
    _dir: tempfile::TempDir,
    child: Child,
}

impl TestBus {
    pub fn start() -> TestBus {
        TestBus::start_with(
            "session",
            r#"<policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>"#,
        )
    }

    /// A bus shaped like the system bus (default deny, as in Debian's system.conf) that
    /// includes the shipped policy file `etc/dbus-1/system.d/org.llmd.Daemon1.conf`.
    pub fn start_system_like() -> TestBus {
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/dbus-1/system.d/org.llmd.Daemon1.conf");
        let policy = policy.canonicalize().expect("shipped D-Bus policy file");
        TestBus::start_with(
            "system",
            &format!(
                r#"<policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{}</include>"#,
                policy.display()
            ),
        )
    }

    fn start_with(bus_type: &str, policy: &str) -> TestBus {
        let dbus_daemon = llmd_testenv::require(Tool::DbusDaemon);
        let dir = open_tempdir();
        let conf = dir.path().join("bus.conf");
        let sock = dir.path().join("bus.sock");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>{bus_type}</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  {policy}
</busconfig>
"#,
                sock.display()
            ),
        )
        .expect("write bus config");
        let mut child = Command::new(dbus_daemon)
            .arg(format!("--config-file={}", conf.display()))
            .args(["--print-address", "--nofork", "--nopidfile"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start dbus-daemon");
        let mut stdout = child.stdout.take().expect("dbus-daemon stdout");
        let mut address = String::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).map(|n| n == 1).unwrap_or(false) && byte[0] != b'\n' {
            address.push(byte[0] as char);
        }
        assert!(!address.is_empty(), "dbus-daemon printed no address");
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).expect("chmod bus socket");
        TestBus { address, _dir: dir, child }
    }

    pub async fn connect(&self) -> zbus::Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .expect("bus address")
            .build()
            .await
            .expect("connect to test bus")
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
