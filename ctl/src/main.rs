//! `llmctl`: the command-line client of the llmd daemon.
//!
//! It reaches the daemon only through `llmd-proto` over the control socket (and, for `chat`,
//! through the OpenAI HTTP API the daemon serves); it never links the engine. Every command
//! prints a human table by default and the protocol's reply object with `--json`.
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 usage (clap), 3 the daemon is unreachable.

mod chat;
mod cli;
mod daemon;
mod fmt;
mod progress;
mod render;

use std::cell::RefCell;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use llmd_proto::{ControlError, DoctorParams, ErrorCode, LoadParams, PullParams, Reply, Request};

use crate::cli::{Cli, Command};
use crate::daemon::Failure;
use crate::progress::ProgressView;

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(failure) => {
            if json {
                let doc = serde_json::json!({"error": {"code": failure.code(), "message": failure.message()}});
                println!("{doc}");
            } else {
                eprintln!("error: {}", failure.message());
            }
            failure.exit_code()
        }
    };
    // Dropping the runtime could wait on the blocking stdin reader of `chat`; exit directly.
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    let socket = daemon::resolve_socket(cli.socket);
    let json = cli.json;
    match cli.command {
        Command::Status => simple(&socket, Request::Status, json).await,
        Command::Ps => simple(&socket, Request::Ps, json).await,
        Command::List => simple(&socket, Request::List, json).await,
        Command::Unload { name } => simple(&socket, Request::Unload { name }, json).await,
        Command::Rm { model } => simple(&socket, Request::Rm { model }, json).await,
        Command::Cancel { operation } => simple(&socket, Request::Cancel { operation }, json).await,
        Command::Doctor { quick } => {
            simple(&socket, Request::Doctor(DoctorParams { quick, caller_uid: None }), json).await
        }
        Command::Gpus { watch: None } => simple(&socket, Request::Gpus, json).await,
        Command::Gpus { watch: Some(secs) } => watch_gpus(&socket, secs, json).await,
        Command::Load(a) => {
            let what = format!("load of {}", a.source);
            let params = LoadParams {
                source: a.source,
                name: a.name,
                tp: a.tp,
                gpus: a.gpus,
                max_model_len: a.max_model_len,
                dtype: a.dtype,
                revision: a.revision,
            };
            long_operation(&socket, Request::Load(params), &what, a.cancel_on_interrupt, json).await
        }
        Command::Pull(a) => {
            let what = format!("pull of {}", a.source);
            let params = PullParams { source: a.source, revision: a.revision, include: a.include, exclude: a.exclude };
            long_operation(&socket, Request::Pull(params), &what, a.cancel_on_interrupt, json).await
        }
        Command::Chat(args) => chat::run(args, &socket).await,
    }
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn stdout_color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// Prints a reply and returns the exit code it implies (doctor exits 1 when a check failed).
fn print_reply(reply: &Reply, json: bool) -> i32 {
    let failed_check =
        matches!(reply, Reply::Doctor(r) if r.checks.iter().any(|c| c.status == llmd_proto::CheckStatus::Fail));
    if json {
        match serde_json::to_string_pretty(reply) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: cannot encode the reply as JSON: {e}");
                return 1;
            }
        }
        return i32::from(failed_check);
    }
    let text = match reply {
        Reply::Hello(w) => format!("llmd {} (protocol {})\n", w.daemon_version, w.protocol),
        Reply::Status(s) => render::status(s),
        Reply::Ps { models } => render::ps(models, now_unix()),
        Reply::List { models } => render::list(models),
        Reply::Loaded(m) => render::loaded(m),
        Reply::Unloaded { name } => format!("unloaded {name}\n"),
        Reply::Pulled(m) => render::pulled(m),
        Reply::Removed { model, freed_bytes } => format!("removed {model}, freed {}\n", fmt::bytes(*freed_bytes)),
        Reply::Cancelled { operation } => format!("cancelled operation {operation}\n"),
        Reply::Gpus(r) => render::gpus(r, stdout_color()),
        Reply::Doctor(r) => render::doctor(r, stdout_color()),
    };
    print!("{text}");
    i32::from(failed_check)
}

/// One request, one reply, printed.
async fn simple(socket: &Path, request: Request, json: bool) -> Result<i32, Failure> {
    let mut client = daemon::connect(socket).await?;
    let reply = client.call(request, |_| {}).await?;
    Ok(print_reply(&reply, json))
}

/// Pull or load: progress bars follow the daemon's frames; Ctrl-C detaches, or cancels the
/// operation over a second connection with `--cancel-on-interrupt` (the first one is busy
/// waiting for the reply).
async fn long_operation(
    socket: &Path,
    request: Request,
    what: &str,
    cancel_on_interrupt: bool,
    json: bool,
) -> Result<i32, Failure> {
    let is_pull = matches!(request, Request::Pull(_));
    let mut client = daemon::connect(socket).await?;
    let view = RefCell::new(ProgressView::new(json));
    let outcome = tokio::select! {
        reply = client.call(request, |p| view.borrow_mut().update(p)) => Some(reply),
        _ = tokio::signal::ctrl_c() => None,
    };
    let mut view = view.into_inner();
    let reply = match outcome {
        Some(Ok(reply)) => {
            view.finish(true);
            reply
        }
        Some(Err(e)) => {
            view.finish(false);
            return Err(e.into());
        }
        None => {
            view.freeze();
            return interrupted(socket, what, view.operation(), is_pull, cancel_on_interrupt, json).await;
        }
    };
    Ok(print_reply(&reply, json))
}

async fn interrupted(
    socket: &Path,
    what: &str,
    operation: Option<&str>,
    is_pull: bool,
    cancel: bool,
    json: bool,
) -> Result<i32, Failure> {
    let Some(operation) = operation else {
        let how = if is_pull { "`llmctl list`" } else { "`llmctl ps`" };
        let message = if cancel {
            format!(
                "interrupted before the daemon reported an operation id, so the {what} could not be cancelled; check with {how}"
            )
        } else {
            format!("detached before the daemon reported progress; the {what} may still run, check with {how}")
        };
        return Err(Failure::Failed(message));
    };
    if cancel {
        let mut client = daemon::connect(socket).await?;
        client.call(Request::Cancel { operation: operation.to_string() }, |_| {}).await?;
        return Err(Failure::Remote(ControlError::new(
            ErrorCode::Cancelled,
            format!("interrupted: cancelled the {what} (operation {operation})"),
        )));
    }
    let follow = if is_pull {
        "run the same `llmctl pull` again to follow it (it joins the running download); `llmctl list` shows the model once it is complete"
    } else {
        "`llmctl ps` shows the model once it is loaded"
    };
    if json {
        println!("{}", serde_json::json!({"detached": {"operation": operation}}));
    }
    eprintln!("detached: the {what} keeps running in the daemon (operation {operation}).");
    eprintln!("{follow}; cancel it with `llmctl cancel {operation}`.");
    Ok(0)
}

/// `gpus --watch`: redraws in place like `nvidia-smi -l` until Ctrl-C (exit 0). With `--json`
/// it prints one JSON document per line instead, for piping into other tools.
async fn watch_gpus(socket: &Path, secs: f64, json: bool) -> Result<i32, Failure> {
    if !secs.is_finite() || secs < 0.1 {
        return Err(Failure::Failed(format!("--watch interval must be at least 0.1 seconds, got {secs}")));
    }
    let mut client = daemon::connect(socket).await?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    let interactive = std::io::stdout().is_terminal();
    let color = stdout_color();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(secs));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = interval.tick() => {}
        }
        let reply = tokio::select! {
            _ = &mut ctrl_c => break,
            reply = client.call(Request::Gpus, |_| {}) => reply?,
        };
        let Reply::Gpus(report) = &reply else {
            return Err(Failure::Failed(format!("unexpected answer to gpus: {reply:?}")));
        };
        let mut out = std::io::stdout().lock();
        let written = if json {
            serde_json::to_string(&reply).map_err(std::io::Error::other).and_then(|line| writeln!(out, "{line}"))
        } else {
            let now = chrono::Local::now().format("%a %b %e %H:%M:%S %Y");
            let header = format!("Every {secs}s: llmctl gpus    {host}: {now}\n\n");
            let body = render::gpus(report, color);
            if interactive {
                // Home the cursor and overwrite line by line, clearing leftovers, so the
                // screen does not flicker the way a full clear would.
                let frame: String = format!("{header}{body}").lines().map(|l| format!("{l}\x1b[K\n")).collect();
                write!(out, "\x1b[H{frame}\x1b[J")
            } else {
                writeln!(out, "{header}{body}")
            }
        };
        if written.and_then(|()| out.flush()).is_err() {
            // Reader went away (e.g. `| head`): nothing more to show.
            return Ok(0);
        }
    }
    if interactive && !json {
        // Ctrl-C was echoed at the end of the last frame; give the shell prompt its own line.
        println!();
    }
    Ok(0)
}
