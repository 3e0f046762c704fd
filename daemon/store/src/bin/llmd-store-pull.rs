//! `llmd-store-pull`: pulls one model with llmd-store, outside the daemon.
//!
//! Used by the kill -9 resume test and by the pull benchmark (bench/pull). Prints one JSON
//! line per progress event on stderr with `--progress`, and the result as JSON on stdout.
//!
//! ```text
//! llmd-store-pull --models-dir DIR [--hf-endpoint URL] [--ms-endpoint URL] [--token T]
//!                 [--include GLOB]... [--exclude GLOB]... [--jobs N] [--offline] [--progress] SOURCE
//! ```

use std::process::ExitCode;

use llmd_proto::PullParams;
use llmd_store::{Store, StoreConfig};

fn usage() -> ExitCode {
    eprintln!(
        "usage: llmd-store-pull --models-dir DIR [--hf-endpoint URL] [--ms-endpoint URL] [--token T] \
         [--include GLOB]... [--exclude GLOB]... [--jobs N] [--offline] [--progress] SOURCE"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut models_dir = None;
    let mut hf_endpoint = None;
    let mut ms_endpoint = None;
    let mut token = None;
    let mut include = Vec::new();
    let mut exclude = Vec::new();
    let mut jobs = None;
    let mut offline = false;
    let mut show_progress = false;
    let mut source = None;
    while let Some(a) = args.next() {
        let mut value = || args.next();
        match a.as_str() {
            "--models-dir" => models_dir = value(),
            "--hf-endpoint" => hf_endpoint = value(),
            "--ms-endpoint" => ms_endpoint = value(),
            "--token" => token = value(),
            "--include" => include.extend(value()),
            "--exclude" => exclude.extend(value()),
            "--jobs" => jobs = value().and_then(|v| v.parse::<usize>().ok()),
            "--offline" => offline = true,
            "--progress" => show_progress = true,
            s if !s.starts_with("--") && source.is_none() => source = Some(a),
            _ => return usage(),
        }
    }
    let (Some(models_dir), Some(source)) = (models_dir, source) else { return usage() };
    let mut cfg = StoreConfig::new(models_dir);
    if let Some(e) = hf_endpoint {
        cfg.hf_endpoint = e;
    }
    if let Some(e) = ms_endpoint {
        cfg.modelscope_endpoint = e;
    }
    cfg.hf_token = token;
    cfg.offline = offline;
    if let Some(j) = jobs {
        cfg.max_concurrent_downloads = j;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let store = Store::new(cfg)?;
        let params = PullParams { source, revision: None, include, exclude };
        store
            .pull(&params, move |p| {
                if show_progress {
                    eprintln!("{}", serde_json::to_string(&p).unwrap_or_default());
                }
            })
            .await
    });
    match result {
        Ok(m) => {
            let out = serde_json::json!({
                "id": m.id,
                "path": m.path,
                "revision": m.revision,
                "size_bytes": m.size_bytes,
            });
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error ({}): {e}", e.code().as_str());
            ExitCode::FAILURE
        }
    }
}
