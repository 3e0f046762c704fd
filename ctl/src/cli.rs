//! Command-line definition (clap derive). Each command's help carries an example.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use llmd_options::DtypeChoice;

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 the operation failed (the daemon's message and error code are printed),
2 usage error, 3 the daemon could not be reached (not running, or no permission on its socket).

Socket: --socket, else $LLMD_SOCKET, else /run/llmd/llmd.sock; when that does not exist but
$XDG_RUNTIME_DIR/llmd/llmd.sock does (a daemon started with `llmd --dev`), that one is used.

Examples:
  llmctl status
  llmctl load hf:Qwen/Qwen3-8B --tp 2
  llmctl ps --json | jq '.models[].name'
  llmctl chat qwen3-8b";

/// Control the llmd inference daemon: load and serve models, pull them from Hugging Face or
/// ModelScope, watch GPUs and check the host.
#[derive(Debug, Parser)]
#[command(name = "llmctl", version, about, after_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    /// Control socket of the daemon [env: LLMD_SOCKET] [default: /run/llmd/llmd.sock, or
    /// $XDG_RUNTIME_DIR/llmd/llmd.sock when only that exists]
    #[arg(long, global = true, value_name = "PATH", env = "LLMD_SOCKET", hide_env = true)]
    pub socket: Option<PathBuf>,

    /// Print the daemon's reply as JSON (the protocol's `reply` object) instead of a table
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the daemon's state, version, addresses and what it serves
    #[command(after_help = "Example:\n  llmctl status\n  llmctl status --json | jq -r .http_listen")]
    Status,

    /// List loaded models with their memory, KV-cache use and request queues
    #[command(after_help = "Example:\n  llmctl ps")]
    Ps,

    /// List models found on disk (pulled, or local folders), and whether each is loaded
    #[command(after_help = "Example:\n  llmctl list")]
    List,

    /// Serve a model: pull it first when it is a hub id, place it on GPUs, load the weights
    #[command(
        long_about = "Serve a model. SOURCE is a local folder, hf:org/name[@rev], ms:org/name[@rev] \
                      (ModelScope) or a bare org/name (the configured default hub). The daemon pulls \
                      the model if needed, places it on the GPUs with the most free memory (or --gpus), \
                      and loads the weights; progress bars follow each step. Ctrl-C detaches and leaves \
                      the load running in the daemon, unless --cancel-on-interrupt is given.",
        after_help = "Examples:\n  llmctl load hf:Qwen/Qwen3-8B\n  llmctl load deepseek-ai/DeepSeek-R1-Distill-Qwen-32B --tp 2 --name r1-32b\n  llmctl load /srv/models/llama-3.1-8b --gpus 1 --max-model-len 16384 --dtype bfloat16"
    )]
    Load(LoadArgs),

    /// Stop serving a model; requests in flight finish first
    #[command(after_help = "Example:\n  llmctl unload qwen3-8b")]
    Unload {
        /// Served name, as shown by `llmctl ps`
        name: String,
    },

    /// Download a model into the daemon's store without loading it
    #[command(
        long_about = "Download a model into the daemon's store (the Hugging Face cache layout) without \
                      loading it. By default configs, tokenizer files, chat templates and safetensors \
                      are fetched. Interrupted pulls resume. Ctrl-C detaches and leaves the pull running \
                      in the daemon, unless --cancel-on-interrupt is given.",
        after_help = "Examples:\n  llmctl pull hf:Qwen/Qwen3-8B\n  llmctl pull ms:Qwen/Qwen2.5-7B-Instruct --revision master\n  llmctl pull meta-llama/Llama-3.1-8B-Instruct --exclude 'original/*'"
    )]
    Pull(PullArgs),

    /// Delete a model from disk (refused while it is loaded)
    #[command(after_help = "Example:\n  llmctl rm hf:Qwen/Qwen3-8B")]
    Rm {
        /// Model id as shown by `llmctl list`
        model: String,
    },

    /// Cancel a running pull or load by its operation id (shown when you detach with Ctrl-C)
    #[command(after_help = "Example:\n  llmctl cancel pull-3")]
    Cancel {
        /// Operation id
        operation: String,
    },

    /// Show GPUs like `nvitop -1`: utilization, memory, temperature, power, clocks, processes
    #[command(
        after_help = "Examples:\n  llmctl gpus\n  llmctl gpus --watch      # refresh every 2 s, Ctrl-C to quit\n  llmctl gpus --watch 5 --json   # one JSON document per line"
    )]
    Gpus {
        /// Refresh in place every SECS seconds (default 2) until Ctrl-C
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },

    /// Check the host: driver, CUDA, kernel modules, devices, NCCL, disk, permissions, config
    #[command(
        long_about = "Check the host and print each check as PASS, WARN, FAIL or SKIP with what was \
                      seen and how to fix it. The checks run inside the daemon, so they see the host \
                      as the service does. Exits 1 when any check fails.",
        after_help = "Examples:\n  llmctl doctor\n  llmctl doctor --quick    # skip the NCCL all-reduce and the hub reachability check"
    )]
    Doctor {
        /// Skip the checks that take seconds (NCCL all-reduce, hub reachability)
        #[arg(long)]
        quick: bool,
    },

    /// Chat with a served model in the terminal, streaming over the OpenAI HTTP API
    #[command(
        long_about = "Chat with a served model over the daemon's OpenAI-compatible HTTP API, like \
                      `ollama run`. Answers stream as they are generated; a reasoning model's thinking \
                      is shown dimmed before the answer. End a line with \\ to continue on the next line, \
                      or wrap several lines in \"\"\" ... \"\"\". Commands: /clear forgets the conversation, \
                      /exit (or Ctrl-D) leaves, /help. Ctrl-C stops the current answer and keeps the chat \
                      open. When stdin is not a terminal, all of it is sent as one message and only the \
                      answer is printed. The API address defaults to the daemon's http_listen (from \
                      `llmctl status`), else http://127.0.0.1:8000.",
        after_help = "Examples:\n  llmctl chat qwen3-8b\n  llmctl chat r1 --system 'Answer in French.'\n  echo 'Why is the sky blue?' | llmctl chat qwen3-8b > answer.txt\n  llmctl chat m --url http://gpu-box:8000 --api-key sk-..."
    )]
    Chat(ChatArgs),
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Local folder, hf:org/name[@rev], ms:org/name[@rev] or org/name
    pub source: String,
    /// Served model name (the `model` field of API requests); defaults to the repo or folder name
    #[arg(long)]
    pub name: Option<String>,
    /// Tensor-parallel size: how many GPUs to split the model over
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub tp: Option<u32>,
    /// GPU indices to use, e.g. 0,1 (default: the ones with the most free memory)
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub gpus: Option<Vec<u32>>,
    /// Cap on the context length (default: the model's max_position_embeddings)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_model_len: Option<u32>,
    /// Dtype to compute in: auto (the backend's own), float32 on the CPU, bfloat16 on CUDA;
    /// one the backend does not serve is refused
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<DtypeChoice>,
    /// Hub revision (branch, tag or commit) when SOURCE has no @rev
    #[arg(long)]
    pub revision: Option<String>,
    /// On Ctrl-C, cancel the load in the daemon instead of detaching from it
    #[arg(long)]
    pub cancel_on_interrupt: bool,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// hf:org/name[@rev], ms:org/name[@rev] or org/name
    pub source: String,
    /// Hub revision (branch, tag or commit) when SOURCE has no @rev
    #[arg(long)]
    pub revision: Option<String>,
    /// Only fetch files matching this glob (repeatable)
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Skip files matching this glob (repeatable)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// On Ctrl-C, cancel the pull in the daemon instead of detaching from it
    #[arg(long)]
    pub cancel_on_interrupt: bool,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Served model name, as shown by `llmctl ps`
    pub model: String,
    /// System prompt sent first in every request
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    /// Base URL of the OpenAI API (default: the daemon's http_listen, else http://127.0.0.1:8000)
    #[arg(long)]
    pub url: Option<String>,
    /// Bearer key for the API [env: LLMD_API_KEY, else OPENAI_API_KEY]
    #[arg(long, value_name = "KEY", env = "LLMD_API_KEY", hide_env_values = true, hide_env = true)]
    pub api_key: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_load_and_watch() {
        let cli = Cli::try_parse_from(["llmctl", "load", "hf:a/b", "--tp", "2", "--gpus", "0,1", "--json"]).unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Load(a) => {
                assert_eq!(a.tp, Some(2));
                assert_eq!(a.gpus, Some(vec![0, 1]));
            }
            other => panic!("parsed as {other:?}"),
        }
        match Cli::try_parse_from(["llmctl", "gpus", "--watch"]).unwrap().command {
            Command::Gpus { watch } => assert_eq!(watch, Some(2.0)),
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["llmctl", "load", "x", "--tp", "0"]).is_err());
    }
}
