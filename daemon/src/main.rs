//! `llmd`: the LLM inference server daemon. See `llmd --help` and docs/config.md.

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use cli::Cli;
use llmd_daemon::config::{ConfigSource, Settings};
use llmd_daemon::engine::EngineLoader;
use llmd_daemon::env::Env;
use llmd_daemon::{EX_CONFIG, daemon, logging};
use llmd_telemetry::Telemetry;

fn main() -> ExitCode {
    llmd_daemon::env::set_process_defaults();
    let cli = Cli::parse();
    let env = Env::from_process();
    let source = ConfigSource::resolve(cli.config.clone(), &env, cli.dev);
    let settings = match Settings::load(&source, cli.dev, &env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llmd: configuration error: {e}");
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    if cli.print_config {
        print!("{}", settings.to_toml());
        return ExitCode::SUCCESS;
    }
    match run(settings, source, env) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmd: {e:#}");
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: Settings, source: ConfigSource, env: Env) -> anyhow::Result<()> {
    let log = logging::init(&settings.config.log, env.journal_stream).context("cannot set up logging")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("llmd")
        .build()
        .context("cannot start the async runtime")?;
    // NVML is loaded (and the XID watch thread started) once, for the whole process.
    let telemetry = Arc::new(Telemetry::start());
    let loader = EngineLoader::new(telemetry.clone());
    let mut opts = daemon::Options::new(settings, source, env, log);
    opts.loader = Arc::new(loader);
    opts.telemetry = telemetry;
    runtime.block_on(daemon::run(opts))?;
    Ok(())
}
