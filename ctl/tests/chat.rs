//! `llmctl chat` against a small OpenAI-shaped server that streams reasoning and answer chunks.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use common::*;
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Seen {
    bodies: Arc<Mutex<Vec<Value>>>,
    auth: Arc<Mutex<Vec<Option<String>>>>,
}

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let v = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "r1",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    });
    format!("data: {v}\n\n")
}

async fn completions(State(seen): State<Seen>, headers: HeaderMap, body: String) -> Response {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    seen.auth.lock().unwrap().push(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(String::from));
    seen.bodies.lock().unwrap().push(body.clone());
    if body["model"] != "r1" {
        let error = json!({"error": {"message": format!("The model `{}` does not exist.", body["model"].as_str().unwrap_or("")),
            "type": "NotFoundError", "param": "model", "code": 404}});
        return (StatusCode::NOT_FOUND, axum::Json(error)).into_response();
    }
    // Split the way a real server's token stream is: the first chunk carries only the role.
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    for piece in ["The user asks", " about the sky."] {
        events.push(chunk(json!({"reasoning_content": piece}), None));
    }
    for piece in ["\n\nThe sky", " is blue", " because of Rayleigh scattering."] {
        events.push(chunk(json!({"content": piece}), None));
    }
    events.push(chunk(json!({}), Some("stop")));
    events.push(": keep-alive\n\n".to_string());
    events.push("data: [DONE]\n\n".to_string());
    let stream = futures::stream::iter(events.into_iter().map(Ok::<_, std::io::Error>));
    Response::builder().header(header::CONTENT_TYPE, "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

async fn models() -> axum::Json<Value> {
    axum::Json(json!({"object": "list", "data": [{"id": "r1", "object": "model", "owned_by": "llmd"}]}))
}

fn start_api() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .with_state(seen.clone());
    spawn_on_thread(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

fn chat(args: &[&str], stdin: &str, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(LLMCTL);
    cmd.arg("chat").args(args).env_remove("LLMD_API_KEY").env_remove("OPENAI_API_KEY").env_remove("LLMD_SOCKET");
    cmd.envs(envs.iter().copied()).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn piped_stdin_prints_only_the_answer() {
    let (addr, seen) = start_api();
    let url = format!("http://{addr}");
    let out =
        chat(&["r1", "--url", &url, "--system", "Be brief.", "--api-key", "sk-test"], "Why is the sky\nblue?\n", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "The sky is blue because of Rayleigh scattering.\n", "no reasoning, no prompts");
    let body = seen.bodies.lock().unwrap()[0].clone();
    assert_eq!(body["model"], "r1");
    assert_eq!(body["stream"], true);
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky\nblue?"}])
    );
    assert_eq!(seen.auth.lock().unwrap()[0].as_deref(), Some("Bearer sk-test"));
}

#[test]
fn api_key_comes_from_the_environment() {
    let (addr, seen) = start_api();
    let url = format!("http://{addr}/v1");
    let out = chat(&["r1", "--url", &url], "hi", &[("OPENAI_API_KEY", "sk-openai")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = chat(&["r1", "--url", &url], "hi", &[("OPENAI_API_KEY", "sk-openai"), ("LLMD_API_KEY", "sk-llmd")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let auth = seen.auth.lock().unwrap().clone();
    assert_eq!(auth, vec![Some("Bearer sk-openai".to_string()), Some("Bearer sk-llmd".to_string())]);
}

#[test]
fn url_defaults_to_the_daemons_http_listen() {
    let (addr, seen) = start_api();
    let daemon = FakeDaemon::start_with_http(addr.to_string());
    let socket = daemon.socket.to_str().unwrap().to_string();
    let out = chat(&["r1", "--socket", &socket], "hello", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).ends_with("Rayleigh scattering.\n"));
    assert_eq!(seen.bodies.lock().unwrap().len(), 1);
    assert!(daemon.requests().contains(&llmd_proto::Request::Status));
}

#[test]
fn http_errors_are_reported() {
    let (addr, _) = start_api();
    let url = format!("http://{addr}");
    let out = chat(&["nope", "--url", &url], "hi", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: HTTP 404 Not Found: The model `nope` does not exist.\n");
    assert_eq!(stdout(&out), "");

    let out = chat(&["r1", "--url", &url], "  \n", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nothing to send"), "{}", stderr(&out));

    // Nothing listens on a port we just released: unreachable, exit 3.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = chat(&["r1", "--url", &format!("127.0.0.1:{port}")], "hi", &[]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("is llmd running? systemctl status llmd"), "{}", stderr(&out));
}
