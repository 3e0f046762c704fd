//! `llmd`'s command line (clap derive). Kept in its own file, depending only on clap and std,
//! so that packaging/gen can compile it in to write the llmd(8) man page and completions.

use std::path::PathBuf;

use clap::Parser;

/// LLM inference server: serves models over the OpenAI HTTP API, managed with llmctl.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Config file (default /etc/llmd/llmd.toml; env LLMD_CONFIG). Unset keys keep their defaults.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Run as an ordinary user: no config file needed, socket under $XDG_RUNTIME_DIR/llmd/,
    /// models under ~/.local/share/llmd, HTTP on 127.0.0.1:8000, D-Bus on the session bus.
    #[arg(long)]
    pub dev: bool,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}
