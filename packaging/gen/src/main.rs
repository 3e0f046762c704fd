//! `llmd-packaging-gen OUT_DIR`: writes the man pages and shell completions of `llmd` and
//! `llmctl` from their clap definitions, so that what `--help` says and what `man` says cannot
//! drift apart.
//!
//! The definitions are compiled in from the binaries' own source files by `#[path]` (not
//! copied), which is why those files may depend only on clap and std.
//!
//! Layout written under OUT_DIR (packaging/build-deb.sh installs it): `man/llmd.8`,
//! `man/llmctl.1` plus one page per llmctl subcommand (`llmctl-load.1`, ...), and
//! `completions/{bash,zsh,fish}/...` under the names each shell's loader looks for.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::CommandFactory;
use clap_complete::Shell;

#[path = "../../../daemon/src/cli.rs"]
#[allow(dead_code)] // the generator reads the definition only; the parsed fields are llmd's business
mod llmd_cli;

#[path = "../../../ctl/src/cli.rs"]
#[allow(dead_code)] // the generator reads the definition only; the parsed fields are llmctl's business
mod llmctl_cli;

/// Where each shell finds a completion for `bin`, relative to OUT_DIR/completions.
fn completion_file(shell: Shell, bin: &str) -> PathBuf {
    match shell {
        Shell::Bash => PathBuf::from("bash").join(bin),
        Shell::Zsh => PathBuf::from("zsh").join(format!("_{bin}")),
        Shell::Fish => PathBuf::from("fish").join(format!("{bin}.fish")),
        other => PathBuf::from(other.to_string()).join(bin),
    }
}

const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// `llmd`'s description, which its bare `#[command(about)]` takes from llmd's Cargo.toml.
fn llmd_description() -> &'static str {
    include_str!("../../../daemon/Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("description = \"")?.strip_suffix('"'))
        .expect("daemon/Cargo.toml has a one-line description")
}

/// `llmd`'s command. Its definition takes name, description and version from the crate that
/// compiles it (`llmd`); here that crate is this one, so name and description are set
/// explicitly (the version is the same workspace version).
fn llmd_command() -> clap::Command {
    let mut cmd = llmd_cli::Cli::command().name("llmd").bin_name("llmd").about(llmd_description());
    cmd.build();
    cmd.clone().debug_assert();
    cmd
}

/// `llmctl`'s command, checked by clap's own consistency assertions.
fn llmctl_command() -> clap::Command {
    let mut cmd = llmctl_cli::Cli::command();
    cmd.build();
    cmd.clone().debug_assert();
    cmd
}

/// Writes the man page of `cmd` (and of its visible subcommands, as `bin-sub.SECTION`).
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    clap_mangen::generate_to(cmd.clone(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(cmd.get_name())) {
            written.push(path);
        }
    }
    written.sort();
    Ok(written)
}

fn write_completions(cmd: &clap::Command, bin: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for shell in SHELLS {
        let path = dir.join(completion_file(shell, bin));
        let parent = path.parent().expect("completion paths have a shell folder");
        fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let mut buf = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), bin, &mut buf);
        fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Generates everything under `out`; returns the files written.
fn generate(out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let llmd = llmd_command();
    let man = out.join("man");
    fs::create_dir_all(&man).with_context(|| format!("cannot create {}", man.display()))?;
    // llmd is a system daemon: section 8.
    let page = man.join("llmd.8");
    let mut buf = Vec::new();
    clap_mangen::Man::new(llmd.clone()).section("8").render(&mut buf)?;
    fs::write(&page, buf).with_context(|| format!("cannot write {}", page.display()))?;
    written.push(page);
    written.extend(write_completions(&llmd, "llmd", &out.join("completions"))?);

    let llmctl = llmctl_command();
    // Man pages leave out clap's `help` subcommand: `llmctl help load` is `man llmctl-load`.
    let mut llmctl_man = llmctl_cli::Cli::command().disable_help_subcommand(true);
    llmctl_man.build();
    written.extend(write_man_pages(&llmctl_man, &out.join("man"))?);
    written.extend(write_completions(&llmctl, "llmctl", &out.join("completions"))?);
    Ok(written)
}

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        bail!("usage: llmd-packaging-gen OUT_DIR   (writes OUT_DIR/man and OUT_DIR/completions)");
    };
    let out = PathBuf::from(out);
    for path in generate(&out)? {
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn writes_pages_and_completions_that_carry_the_definitions() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path()).unwrap();
        let man = dir.path().join("man");

        let llmd = read(&man.join("llmd.8"));
        assert!(llmd.contains(".TH llmd 8"), "llmd is section 8: {:.200}", llmd);
        assert!(llmd.contains("\\-\\-print\\-config") && llmd.contains("\\-\\-dev"));
        assert!(!man.join("llmd.1").exists(), "no section-1 page for the daemon");
        assert!(llmd.contains("inference server daemon"), "llmd's own description: {:.300}", llmd);
        assert!(read(&dir.path().join("completions/bash/llmd")).contains("--print-config"));
        assert!(read(&dir.path().join("completions/zsh/_llmd")).starts_with("#compdef llmd"));
        assert!(read(&dir.path().join("completions/fish/llmd.fish")).contains("-l config"));

        let main_page = read(&man.join("llmctl.1"));
        assert!(main_page.starts_with(".ie"), "roff page expected, got {:.40}", main_page);
        assert!(main_page.contains(".TH llmctl 1"), "llmctl is section 1");
        assert!(main_page.contains("\\-\\-socket"), "global --socket documented");
        // One page per visible subcommand, with its own options.
        let load = read(&man.join("llmctl-load.1"));
        assert!(load.contains("\\-\\-cancel\\-on\\-interrupt"));
        assert!(man.join("llmctl-pull.1").exists() && man.join("llmctl-doctor.1").exists());
        assert!(!man.join("llmctl-help.1").exists(), "no page for clap's help subcommand");

        let bash = read(&dir.path().join("completions/bash/llmctl"));
        assert!(bash.contains("complete -F _llmctl"), "bash completion registers itself");
        assert!(bash.contains("--max-model-len"));
        assert!(read(&dir.path().join("completions/zsh/_llmctl")).starts_with("#compdef llmctl"));
        assert!(read(&dir.path().join("completions/fish/llmctl.fish")).contains("-l cancel-on-interrupt"));
        assert!(
            files.contains(&man.join("llmd.8")) && files.contains(&man.join("llmctl.1")),
            "reported files: {files:?}"
        );
    }
}
