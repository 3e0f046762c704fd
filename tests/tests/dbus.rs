//! D-Bus against a real `dbus-daemon` started by the test: read-only methods, the State
//! property, authorization by the caller's uid, and the introspection drift guard.

use llmd_e2e::{Daemon, DaemonOptions, TestBus, bin, can_switch_uid, run_as_nobody};
use llmd_proto::dbus::ManagerProxy;

fn start(bus: &TestBus) -> Daemon {
    Daemon::start_with(DaemonOptions {
        dbus: "session".into(),
        env: vec![("DBUS_SESSION_BUS_ADDRESS".into(), bus.address.clone())],
        ..Default::default()
    })
}

/// The `org.llmd.Daemon1.Manager` interface element, without comments and layout.
fn manager_interface(xml: &str) -> String {
    let start = xml.find("<interface name=\"org.llmd.Daemon1.Manager\">").expect("Manager interface present");
    let end = start + xml[start..].find("</interface>").expect("interface end") + "</interface>".len();
    let mut body = xml[start..end].to_string();
    while let Some(a) = body.find("<!--") {
        let b = a + body[a..].find("-->").expect("comment end") + 3;
        body.replace_range(a..b, "");
    }
    body.split_whitespace().collect::<Vec<_>>().join(" ").replace("> <", "><")
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_methods_state_and_introspection() {
    let bus = TestBus::start();
    let daemon = start(&bus);
    let conn = bus.connect().await;
    let proxy = ManagerProxy::new(&conn).await.unwrap();

    let status: serde_json::Value = serde_json::from_str(&proxy.status().await.unwrap()).unwrap();
    assert_eq!(status["state"], "ready");
    assert_eq!(status["dbus"], "session");
    assert_eq!(status["socket"], daemon.socket.display().to_string());
    assert_eq!(proxy.state().await.unwrap(), "ready");
    let ps: serde_json::Value = serde_json::from_str(&proxy.ps().await.unwrap()).unwrap();
    assert_eq!(ps, serde_json::json!([]));
    // The store answers over the bus: an empty models dir lists nothing.
    let list: serde_json::Value = serde_json::from_str(&proxy.list().await.unwrap()).unwrap();
    assert_eq!(list, serde_json::json!([]));
    // Root is authorized; the call reaches the model manager.
    match proxy.unload("nope").await {
        Err(zbus::Error::MethodError(name, _, _)) => assert_eq!(name.as_str(), "org.llmd.Daemon1.Error.NotFound"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    match proxy.load("/srv/x", "not json").await {
        Err(zbus::Error::MethodError(name, _, _)) => {
            assert_eq!(name.as_str(), "org.llmd.Daemon1.Error.InvalidArgument")
        }
        other => panic!("expected InvalidArgument, got {other:?}"),
    }

    let introspect = zbus::fdo::IntrospectableProxy::builder(&conn)
        .destination(llmd_proto::dbus::BUS_NAME)
        .unwrap()
        .path(llmd_proto::dbus::OBJECT_PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    let live = introspect.introspect().await.unwrap();
    let doc_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dbus/org.llmd.Daemon1.xml");
    let doc = std::fs::read_to_string(doc_path).unwrap();
    assert_eq!(
        manager_interface(&doc),
        manager_interface(&live),
        "docs/dbus/org.llmd.Daemon1.xml is out of date; the live introspection is:\n{live}"
    );
}

#[test]
fn another_uid_is_refused_mutating_methods_on_dbus() {
    if !can_switch_uid() {
        eprintln!("SKIPPED another_uid_is_refused_mutating_methods_on_dbus: needs root and setpriv (CI runs as root)");
        return;
    }
    let bus = TestBus::start();
    let daemon = start(&bus);
    let client = bin("llmd-e2e-client");
    let (code, out, err) = run_as_nobody(&client, &["dbus", &bus.address, "Status"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ok {"), "{out} {err}");
    for args in [vec!["Unload", "x"], vec!["Load", "/tmp"], vec!["Pull", "hf:a/b"]] {
        let mut full = vec!["dbus", bus.address.as_str()];
        full.extend(args.iter().copied());
        let (_, out, err) = run_as_nobody(&client, &full, &[]);
        assert!(
            out.starts_with("err org.llmd.Daemon1.Error.PermissionDenied") && out.contains("uid 65534"),
            "{args:?}: {out} {err}"
        );
    }
    let log = daemon.log_text();
    assert!(log.contains("refused mutating call") && log.contains("transport=\"dbus\""), "{log}");
}

#[test]
fn bus_name_is_released_on_stop() {
    let bus = TestBus::start();
    let mut daemon = start(&bus);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(std::time::Duration::from_secs(15)).code(), Some(0));
    // A second daemon can own the name right away.
    let _again = start(&bus);
}

/// The shipped system-bus policy, loaded by a real dbus-daemon: root may own the name and call
/// everything; another user may call the read-only methods and read State, and the bus itself
/// stops it from calling the mutating ones.
#[test]
fn shipped_system_policy() {
    if !can_switch_uid() {
        eprintln!("SKIPPED shipped_system_policy: needs root and setpriv (CI runs as root)");
        return;
    }
    let bus = TestBus::start_system_like();
    let _daemon = Daemon::start_with(DaemonOptions {
        dbus: "system".into(),
        env: vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), bus.address.clone())],
        ..Default::default()
    });
    let client = bin("llmd-e2e-client");
    let (_, out, err) = run_as_nobody(&client, &["dbus", &bus.address, "Status"], &[]);
    assert!(out.starts_with("ok {"), "{out} {err}");
    let (_, out, err) = run_as_nobody(&client, &["dbus", &bus.address, "Ps"], &[]);
    assert!(out.starts_with("ok ["), "{out} {err}");
    let (_, out, err) = run_as_nobody(&client, &["dbus", &bus.address, "Unload", "x"], &[]);
    assert!(out.starts_with("err org.freedesktop.DBus.Error.AccessDenied"), "{out} {err}");
    // Root passes the bus policy and reaches the daemon.
    let out = std::process::Command::new(&client).args(["dbus", &bus.address, "Unload", "x"]).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.starts_with("err org.llmd.Daemon1.Error.NotFound"), "{out}");
}
