//! Tiny client the tests run under another uid (`setpriv ... llmd-e2e-client ...`):
//!
//! `llmd-e2e-client socket <path> <request-json>` sends one request after the handshake;
//! `llmd-e2e-client dbus <address> <method> [args...]` calls a Manager method on D-Bus.
//! Prints `ok <json>` or `err <code-or-dbus-error-name> <message>` and exits 0 either way;
//! exit 2 means the call could not be made at all.

use llmd_proto::dbus::ManagerProxy;
use llmd_proto::{Client, ClientError, Request};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("socket") if args.len() == 3 => socket(&args[1], &args[2]).await,
        Some("dbus") if args.len() >= 3 => dbus(&args[1], &args[2], &args[3..]).await,
        _ => {
            eprintln!("usage: llmd-e2e-client socket <path> <request-json> | dbus <address> <method> [args...]");
            2
        }
    };
    std::process::exit(code);
}

async fn socket(path: &str, request: &str) -> i32 {
    let request: Request = match serde_json::from_str(request) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bad request json: {e}");
            return 2;
        }
    };
    let mut client = match Client::connect(std::path::Path::new(path), "llmd", "llmd-e2e-client").await {
        Ok(c) => c,
        Err(e) => {
            println!("err connect {e}");
            return 0;
        }
    };
    match client.call(request, |_| {}).await {
        Ok(reply) => println!("ok {}", serde_json::to_string(&reply).unwrap_or_default()),
        Err(ClientError::Remote(e)) => println!("err {} {}", e.code.as_str(), e.message),
        Err(e) => println!("err other {e}"),
    }
    0
}

async fn dbus(address: &str, method: &str, args: &[String]) -> i32 {
    let conn = match zbus::connection::Builder::address(address) {
        Ok(b) => match b.build().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot connect to {address}: {e}");
                return 2;
            }
        },
        Err(e) => {
            eprintln!("bad address {address}: {e}");
            return 2;
        }
    };
    let proxy = match ManagerProxy::new(&conn).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("proxy: {e}");
            return 2;
        }
    };
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let result: zbus::Result<String> = match method {
        "Status" => proxy.status().await,
        "Ps" => proxy.ps().await,
        "List" => proxy.list().await,
        "Load" => proxy.load(arg(0), if arg(1).is_empty() { "{}" } else { arg(1) }).await,
        "Unload" => proxy.unload(arg(0)).await.map(|()| "null".to_string()),
        "Pull" => proxy.pull(arg(0), "{}").await,
        other => {
            eprintln!("unknown method {other}");
            return 2;
        }
    };
    match result {
        Ok(json) => println!("ok {json}"),
        Err(zbus::Error::MethodError(name, msg, _)) => println!("err {} {}", name.as_str(), msg.unwrap_or_default()),
        Err(e) => println!("err other {e}"),
    }
    0
}
