//! GPU telemetry and host checks through the real daemon and llmctl: `llmctl gpus` and
//! `llmctl doctor` answer on any host (with or without the NVIDIA driver), with the daemon's
//! own config and the caller's identity.

use llmd_e2e::Daemon;
use serde_json::Value;

#[test]
fn gpus_and_doctor_through_llmctl() {
    let daemon = Daemon::start();

    let (code, out, err) = daemon.llmctl(&["gpus", "--json"]);
    assert_eq!(code, 0, "{err}");
    let gpus: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let listed = gpus["gpus"].as_array().unwrap();
    // Without a driver the report says why; with one it lists the GPUs.
    assert!(gpus["unavailable"].is_string() || !listed.is_empty(), "{out}");
    let (code, out, err) = daemon.llmctl(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["gpus"].as_u64().unwrap() as usize, listed.len(), "{out}");

    // Doctor exits 1 when a check fails (a host without GPUs fails the driver check), 0 otherwise.
    let (code, out, err) = daemon.llmctl(&["doctor", "--quick", "--json"]);
    assert!(code == 0 || code == 1, "{code}: {err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let check = |name: &str| -> Value {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no `{name}` check in {out}"))
    };
    // The daemon itself holds the HTTP port and ran with a valid config.
    let http = check("http_port");
    assert_eq!(http["status"], "pass", "{http}");
    assert!(http["observed"].as_str().unwrap().contains("held by llmd"), "{http}");
    assert_eq!(check("config_valid")["status"], "pass");
    // The caller (this test's uid, root or the daemon's own user) is identified from the socket.
    let group = check("control_group");
    assert_ne!(group["status"], "skip", "caller not passed to the checks: {group}");
    assert_ne!(check("driver_loaded")["status"], Value::Null);
}
