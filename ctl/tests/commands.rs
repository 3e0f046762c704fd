//! The real llmctl binary against a fake daemon on a real socket: tables, `--json`, progress,
//! errors, exit codes, Ctrl-C handling and the permission-denied path.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use llmd_proto::{Dtype, DtypeChoice, LoadParams, PullParams, Request};

#[test]
fn status_table_and_json() {
    let d = FakeDaemon::start();
    let out = d.run(&["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("llmd 0.1.0 (protocol 1): ready\n"), "{text}");
    for line in
        ["  uptime      1d 02h", "  http        0.0.0.0:8000", "  device      cuda (2 GPUs)", "  models      2 loaded"]
    {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    let out = d.run(&["status", "--json"]);
    assert!(out.status.success());
    let v = json(&out);
    assert_eq!(v["kind"], "status");
    assert_eq!(v["state"], "ready");
    assert_eq!(v["http_listen"], "0.0.0.0:8000");
    // Every connection starts with the handshake.
    assert!(matches!(d.requests()[0], Request::Hello { protocol: 1, ref client } if client.starts_with("llmctl ")));
}

#[test]
fn ps_table_and_json() {
    let d = FakeDaemon::start();
    let out = d.run(&["ps"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("NAME      ARCH              PARAMS  DTYPE     DEVICE    TP  CONTEXT"), "{text}");
    assert_eq!(
        lines[1],
        "qwen3-8b  Qwen3ForCausalLM    8.2B  bfloat16  cuda:0,1   2    40960  15.3 GiB  48.0 GiB      25%    3     1  1h 02m"
    );
    assert_eq!(
        lines[2],
        "tiny      LlamaForCausalLM    1.1B  float32   cpu        1     2048   4.1 GiB   1.0 GiB       0%    0     0  1h 02m"
    );

    let v = json(&d.run(&["--json", "ps"]));
    assert_eq!(v["kind"], "ps");
    assert_eq!(v["models"][0]["name"], "qwen3-8b");
    assert_eq!(v["models"][0]["gpus"], serde_json::json!([0, 1]));
}

#[test]
fn list_table_and_json() {
    let d = FakeDaemon::start();
    let out = d.run(&["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("MODEL                                         SOURCE  REVISION          SIZE  ARCH              LOADED  PATH\n"), "{text}");
    assert!(
        text.contains(
            "hf:Qwen/Qwen3-8B                              hf      b968826d9c46  15.3 GiB  Qwen3ForCausalLM  yes"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "ms:deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B  ms      master         3.3 GiB  Qwen2ForCausalLM  no"
        ),
        "{text}"
    );

    let v = json(&d.run(&["list", "--json"]));
    assert_eq!(v["kind"], "list");
    assert_eq!(v["models"].as_array().unwrap().len(), 2);
    assert_eq!(v["models"][0]["revision"], "b968826d9c46dd6066d109eabc6255188de91218");
}

#[test]
fn gpus_table_and_json() {
    let d = FakeDaemon::start();
    let out = d.run(&["gpus"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("driver 570.86.15  CUDA 12.8  2 GPUs\n"), "{text}");
    assert!(text.contains("GPU  NAME                   UTIL  MEM UTIL  MEMORY"), "{text}");
    assert!(
        text.contains("  0  NVIDIA H100 80GB HBM3   87%       41%  [██████████████████░░]  88%  70.0 / 79.6 GiB  64°C    413 / 700 W  1980 / 2619 MHz"),
        "{text}"
    );
    assert!(text.contains("! GPU 0: throttled (sw_power_cap)"), "{text}");
    assert!(
        text.contains("GPU   PID  PROCESS  GPU MEMORY  LLMD MODEL\n  0  4242  llmd       69.0 GiB  qwen3-8b\n"),
        "{text}"
    );

    let v = json(&d.run(&["gpus", "--json"]));
    assert_eq!(v["kind"], "gpus");
    assert_eq!(v["gpus"][0]["processes"][0]["llmd_model"], "qwen3-8b");
    assert_eq!(v["driver_version"], "570.86.15");
}

#[test]
fn gpus_watch_refreshes_until_ctrl_c() {
    let d = FakeDaemon::start();
    let child = d.command(&["gpus", "--watch", "0.2", "--json"]).stdout(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(900));
    interrupt(child.id());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "Ctrl-C leaves watch mode with 0: {}", stderr(&out));
    let lines: Vec<serde_json::Value> =
        stdout(&out).lines().map(|l| serde_json::from_str(l).expect("one JSON document per line")).collect();
    assert!(lines.len() >= 2, "expected several refreshes, got {}", lines.len());
    assert!(lines.iter().all(|v| v["kind"] == "gpus"));
}

#[test]
fn doctor_reports_checks_and_fails_on_fail() {
    let d = FakeDaemon::start();
    let out = d.run(&["doctor", "--quick"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("PASS  driver_loaded     NVIDIA driver 570.86.15 loaded\n"), "{text}");
    assert!(text.contains("WARN  persistence_mode  persistence mode off on GPU 1\n                        fix: sudo nvidia-smi -pm 1\n"), "{text}");
    assert!(text.contains("SKIP  nccl_all_reduce   skipped by --quick\n"), "{text}");
    assert!(text.ends_with("1 passed, 1 warnings, 0 failed, 1 skipped\n"), "{text}");
    assert!(d.requests().iter().any(|r| matches!(r, Request::Doctor(p) if p.quick)));

    let out = d.run(&["doctor"]);
    assert_eq!(out.status.code(), Some(1), "a failed check exits 1");
    let text = stdout(&out);
    assert!(text.contains("FAIL  nvidia_uvm        kernel module nvidia_uvm is not loaded\n"), "{text}");
    assert!(text.contains("fix: sudo modprobe nvidia_uvm"), "{text}");

    let out = d.run(&["doctor", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["checks"][2]["status"], "fail");
    assert_eq!(v["checks"][2]["fix"], "sudo modprobe nvidia_uvm");
}

#[test]
fn load_follows_progress_and_sends_every_option() {
    let d = FakeDaemon::start();
    let out = d.run(&[
        "load",
        "hf:Qwen/Qwen3-8B",
        "--name",
        "q",
        "--tp",
        "2",
        "--gpus",
        "0,1",
        "--max-model-len",
        "8192",
        "--dtype",
        "bfloat16",
        "--revision",
        "main",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "loaded q (Qwen3ForCausalLM bfloat16, 8.2B params, hf:Qwen/Qwen3-8B) on cuda:0,1: weights 15.3 GiB, KV cache 48.0 GiB (4000 blocks), context 40960\n"
    );
    // Without a terminal the progress frames become one line per phase on stderr.
    assert_eq!(
        stderr(&out),
        "hf:Qwen/Qwen3-8B: resolving [operation load-1]\n\
         hf:Qwen/Qwen3-8B: downloading (3.0 GiB) [operation load-1]\n\
         hf:Qwen/Qwen3-8B: loading weights (291 tensors) [operation load-1]\n"
    );
    let expected = LoadParams {
        source: "hf:Qwen/Qwen3-8B".into(),
        name: Some("q".into()),
        tp: Some(2),
        gpus: Some(vec![0, 1]),
        max_model_len: Some(8192),
        dtype: Some(DtypeChoice::Fixed(Dtype::BFloat16)),
        revision: Some("main".into()),
    };
    assert!(d.requests().contains(&Request::Load(expected)), "{:?}", d.requests());

    let out = d.run(&["load", "/srv/models/x", "--json"]);
    assert!(out.status.success());
    assert_eq!(stderr(&out), "", "--json keeps progress off the terminal");
    let v = json(&out);
    assert_eq!(v["kind"], "loaded");
    assert_eq!(v["source"], "/srv/models/x");
}

#[test]
fn an_unknown_dtype_is_refused_before_the_daemon_is_asked() {
    let d = FakeDaemon::start();
    let out = d.run(&["load", "/srv/models/x", "--dtype", "fp8"]);
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("`fp8` is not a valid dtype (expected one of: auto, bfloat16, float16, float32)"), "{err}");
    assert!(!d.requests().iter().any(|r| matches!(r, Request::Load(_))), "{:?}", d.requests());
}

#[test]
fn pull_unload_rm_cancel() {
    let d = FakeDaemon::start();
    let out = d.run(&[
        "pull",
        "hf:org/m",
        "--revision",
        "v2",
        "--include",
        "*.json",
        "--include",
        "*.safetensors",
        "--exclude",
        "original/*",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("pulled hf:org/m (3.3 GiB) into /var/lib/llmd/models/"), "{}", stdout(&out));
    assert!(stderr(&out).contains("hf:org/m: downloading (3.0 GiB) [operation pull-1]"), "{}", stderr(&out));
    let expected = PullParams {
        source: "hf:org/m".into(),
        revision: Some("v2".into()),
        include: vec!["*.json".into(), "*.safetensors".into()],
        exclude: vec!["original/*".into()],
    };
    assert!(d.requests().contains(&Request::Pull(expected)));

    let out = d.run(&["unload", "qwen3-8b"]);
    assert_eq!((out.status.code(), stdout(&out).as_str()), (Some(0), "unloaded qwen3-8b\n"));
    let out = d.run(&["rm", "ms:deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"]);
    assert_eq!(stdout(&out), "removed ms:deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B, freed 3.3 GiB\n");
    let out = d.run(&["cancel", "pull-9", "--json"]);
    assert_eq!(json(&out), serde_json::json!({"kind": "cancelled", "operation": "pull-9"}));
}

#[test]
fn daemon_errors_exit_1_with_message_and_code() {
    let d = FakeDaemon::start();
    let out = d.run(&["load", "hf:missing/model"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: repository missing/model not found on https://huggingface.co (not_found)\n");

    let out = d.run(&["rm", "hf:Qwen/Qwen3-8B"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unload it first (conflict)"), "{}", stderr(&out));

    let out = d.run(&["unload", "ghost", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"]["code"], "not_found");
}

#[test]
fn unreachable_daemon_exits_3_with_hint() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    let out = Command::new(LLMCTL).arg("--socket").arg(&missing).arg("status").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.contains(&format!("cannot reach llmd at {}", missing.display())), "{err}");
    assert!(err.contains("is llmd running? systemctl status llmd"), "{err}");

    // A stale socket file left by a crashed daemon: connection refused, same answer.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let out = Command::new(LLMCTL).arg("ps").env("LLMD_SOCKET", &stale).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));

    let out = Command::new(LLMCTL).args(["--socket", missing.to_str().unwrap(), "ps", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json(&out)["error"]["code"], "unreachable");
}

#[test]
fn bad_usage_exits_2() {
    for args in [&["frobnicate"][..], &["load"], &["load", "x", "--tp", "zero"], &["gpus", "--watch", "soon"], &[]] {
        let out = Command::new(LLMCTL).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "llmctl {args:?}: {}", stderr(&out));
    }
}

#[test]
fn help_explains_commands_with_examples() {
    let out = Command::new(LLMCTL).arg("--help").output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success());
    for needle in
        ["status", "pull", "doctor", "chat", "Exit codes", "XDG_RUNTIME_DIR", "llmctl load hf:Qwen/Qwen3-8B --tp 2"]
    {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
    let out = Command::new(LLMCTL).args(["load", "--help"]).output().unwrap();
    let text = stdout(&out);
    assert!(text.contains("--cancel-on-interrupt") && text.contains("Examples:"), "{text}");
}

#[test]
fn permission_denied_names_the_group() {
    let d = FakeDaemon::start();
    let is_root = llmd_testenv::is_root();
    let socket = d.socket.to_str().unwrap().to_string();
    let out = if is_root {
        // chmod does not stop root: run llmctl as `nobody` against a root-owned 0660 socket,
        // the way a user outside the control group meets the real one.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o660)).unwrap();
        Command::new(llmd_testenv::require(llmd_testenv::Tool::Setpriv))
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", LLMCTL, "--socket", &socket, "unload", "m"])
            .output()
            .unwrap()
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o000)).unwrap();
        d.run(&["unload", "m"])
    };
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&format!("permission denied on {socket}: add yourself to group llmd")), "{err}");
}

/// Sends SIGINT the way a terminal's Ctrl-C does.
fn interrupt(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("send SIGINT");
}

#[test]
fn ctrl_c_detaches_from_a_load() {
    let d = FakeDaemon::start();
    let child = d.command(&["load", "slow"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    assert!(d.wait_for(|r| matches!(r, Request::Load(p) if p.source == "slow")));
    // Let the progress frame arrive so llmctl knows the operation id.
    std::thread::sleep(Duration::from_millis(400));
    interrupt(child.id());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("detached: the load of slow keeps running in the daemon (operation load-slow)"), "{err}");
    assert!(err.contains("`llmctl ps`") && err.contains("llmctl cancel load-slow"), "{err}");
    assert!(!d.requests().iter().any(|r| matches!(r, Request::Cancel { .. })), "detaching must not cancel");
}

#[test]
fn ctrl_c_cancels_with_cancel_on_interrupt() {
    let d = FakeDaemon::start();
    let child = d
        .command(&["load", "slow", "--cancel-on-interrupt"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(d.wait_for(|r| matches!(r, Request::Load(p) if p.source == "slow")));
    std::thread::sleep(Duration::from_millis(400));
    interrupt(child.id());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(d.wait_for(|r| *r == Request::Cancel { operation: "load-slow".into() }), "{:?}", d.requests());
    assert!(stderr(&out).contains("cancelled the load of slow (operation load-slow) (cancelled)"), "{}", stderr(&out));
}
