//! Test prerequisites, provisioned on first use so that `cargo test --workspace` alone passes on
//! a fresh Debian machine with Rust: the system tools the tests exec ([`require`]: installed with
//! `apt-get` when the tests run as root; otherwise the test fails with one line naming the apt
//! packages) and a cached Python venv holding the packages the tests drive ([`python`]).
//!
//! Installs serialise on lock files, so parallel tests and concurrent `cargo test` runs do each
//! one once and never see a half-made venv.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nix::fcntl::{Flock, FlockArg};

/// A program that some test execs, with the Debian package that ships it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// A private bus for the D-Bus tests.
    DbusDaemon,
    /// Runs clients as another uid in the authorization tests (only when the tests are root).
    Setpriv,
}

impl Tool {
    pub const ALL: [Tool; 2] = [Tool::DbusDaemon, Tool::Setpriv];

    pub fn program(self) -> &'static str {
        match self {
            Tool::DbusDaemon => "dbus-daemon",
            Tool::Setpriv => "setpriv",
        }
    }

    pub fn package(self) -> &'static str {
        match self {
            Tool::DbusDaemon => "dbus",
            Tool::Setpriv => "util-linux",
        }
    }
}

/// Makes `python3 -m venv` work on Debian (it ships `ensurepip`; python3 comes with it).
const VENV_PACKAGE: &str = "python3-venv";

/// What the venv holds: the SDK real clients use, one major version so a new major release is a
/// deliberate change here, not a surprise in CI.
const VENV_REQUIREMENTS: &[&str] = &["openai>=3,<4"];

/// Names the venv folder; bump it with [`VENV_REQUIREMENTS`] so checkouts of different versions
/// keep separate venvs instead of rebuilding one in turn.
const VENV_KEY: &str = "py-1";

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Path of `tool`, installed first with apt-get when it is missing and the tests run as root.
/// Panics with one line naming the apt packages when it is missing and the user is not root.
pub fn require(tool: Tool) -> PathBuf {
    let path = std::env::var_os("PATH");
    provision(tool, path.as_deref(), is_root()).unwrap_or_else(|line| panic!("{line}"))
}

/// [`require`] against the search path `path`; `Err` is the line the user sees.
fn provision(tool: Tool, path: Option<&OsStr>, root: bool) -> Result<PathBuf, String> {
    if let Some(found) = locate(tool.program(), path) {
        return Ok(found);
    }
    if !root {
        return Err(cannot_install(&format!("`{}`", tool.program()), tool.package()));
    }
    apt_install(tool.package(), || locate(tool.program(), path).is_some());
    locate(tool.program(), path).ok_or_else(|| {
        format!("apt-get installed {} but `{}` is still not on PATH ({path:?})", tool.package(), tool.program())
    })
}

/// The one-line failure for a user who cannot install: the missing piece, its package, and the
/// single command that installs every system package the tests need.
fn cannot_install(what: &str, package: &str) -> String {
    let mut all: Vec<&str> = Tool::ALL.iter().map(|t| t.package()).collect();
    all.push(VENV_PACKAGE);
    format!(
        "llmd tests: {what} is missing (apt package {package}) and only root can install it; \
         as root, run once: apt-get install -y {}",
        all.join(" ")
    )
}

/// An executable file named `program` in a folder of `path` (PATH syntax).
fn locate(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    std::env::split_paths(path?).map(|dir| dir.join(program)).find(|candidate| {
        std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Installs `package` with apt-get under a lock shared by every test process, unless `present`
/// holds once the lock is ours (another test installed it meanwhile).
fn apt_install(package: &str, present: impl Fn() -> bool) {
    let _lock = lock(&std::env::temp_dir().join("llmd-tests-apt.lock"));
    if present() {
        return;
    }
    eprintln!("llmd tests: installing {package} with apt-get");
    run_checked(apt().arg("update"), "apt-get update");
    run_checked(
        apt().args(["install", "-y", "--no-install-recommends", package]),
        &format!("apt-get install {package}"),
    );
}

fn apt() -> Command {
    let mut cmd = Command::new("apt-get");
    // Wait for another apt run (ours in a parallel test, or the host's) instead of failing.
    cmd.env("DEBIAN_FRONTEND", "noninteractive").args(["-q", "-o", "DPkg::Lock::Timeout=300"]);
    cmd
}

/// The interpreter of the tests' venv, `<cache_dir>/venv-<key>/bin/python3`: made on first use
/// with `python3 -m venv` and `pip install` of the pinned requirements (`openai`), reused
/// afterwards. Installs `python3-venv` with apt-get first when `python3 -m venv` cannot work and
/// the tests are root; panics with one line naming it when they are not, and with pip's output
/// when pip fails.
pub fn python() -> PathBuf {
    let cache = cache_dir();
    let dir = cache.join(format!("venv-{VENV_KEY}"));
    let python = dir.join("bin/python3");
    let ready = dir.join("llmd-ready");
    let requirements = VENV_REQUIREMENTS.join("\n");
    let is_ready = || {
        std::fs::read_to_string(&ready).is_ok_and(|r| r == requirements)
            && Command::new(&python).args(["-c", ""]).output().is_ok_and(|o| o.status.success())
    };
    if is_ready() {
        return python;
    }
    std::fs::create_dir_all(&cache).unwrap_or_else(|e| panic!("create {}: {e}", cache.display()));
    let _lock = lock(&cache.join(format!("venv-{VENV_KEY}.lock")));
    if is_ready() {
        return python;
    }
    // Without the marker the folder is what an interrupted run (or a vanished base
    // interpreter) left behind: start over.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove stale venv {}: {e}", dir.display()));
    }
    ensure_venv_module("python3", is_root()).unwrap_or_else(|line| panic!("{line}"));
    eprintln!("llmd tests: creating {} with {}", dir.display(), VENV_REQUIREMENTS.join(" "));
    run_checked(Command::new("python3").args(["-m", "venv"]).arg(&dir), "python3 -m venv");
    run_checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(VENV_REQUIREMENTS),
        &format!("pip install {}", VENV_REQUIREMENTS.join(" ")),
    );
    std::fs::write(&ready, &requirements).unwrap_or_else(|e| panic!("write {}: {e}", ready.display()));
    python
}

/// Checks that `python -m venv` can make a venv with pip (Debian splits `ensurepip` into
/// python3-venv), installing the package when `root`; `Err` is the line the user sees.
fn ensure_venv_module(python: &str, root: bool) -> Result<(), String> {
    let works =
        || Command::new(python).args(["-c", "import venv, ensurepip"]).output().is_ok_and(|o| o.status.success());
    if works() {
        return Ok(());
    }
    if !root {
        return Err(cannot_install(&format!("`{python} -m venv`"), VENV_PACKAGE));
    }
    apt_install(VENV_PACKAGE, works);
    if works() {
        Ok(())
    } else {
        Err(format!(
            "apt-get installed {VENV_PACKAGE} but `{python} -c 'import venv, ensurepip'` still fails: \
             is the `{python}` on PATH the system one?"
        ))
    }
}

/// Where the venv lives: `$XDG_CACHE_HOME/llmd-tests`, else `$HOME/.cache/llmd-tests`, else a
/// per-uid folder in the temp dir. Outside the clone, so every checkout shares one venv.
pub fn cache_dir() -> PathBuf {
    let nonempty = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        return xdg.join("llmd-tests");
    }
    if let Some(home) = nonempty("HOME") {
        return home.join(".cache/llmd-tests");
    }
    std::env::temp_dir().join(format!("llmd-tests-{}", nix::unistd::geteuid()))
}

/// An exclusive `flock` on `path` (created if needed), held until the guard drops. Each call
/// opens its own file, so threads of one test binary exclude each other too.
fn lock(path: &Path) -> Flock<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open lock file {}: {e}", path.display()));
    Flock::lock(file, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("lock {}: {e}", path.display()))
}

fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HINT: &str = "as root, run once: apt-get install -y dbus util-linux python3-venv";

    #[test]
    fn a_missing_tool_without_root_is_one_line_naming_the_packages() {
        let empty = tempfile::tempdir().unwrap();
        for tool in Tool::ALL {
            let line = provision(tool, Some(empty.path().as_os_str()), false).unwrap_err();
            assert_eq!(
                line,
                format!(
                    "llmd tests: `{}` is missing (apt package {}) and only root can install it; {HINT}",
                    tool.program(),
                    tool.package()
                )
            );
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn a_missing_venv_module_without_root_names_python3_venv() {
        let line = ensure_venv_module("python3-absent-from-every-path", false).unwrap_err();
        assert_eq!(
            line,
            format!(
                "llmd tests: `python3-absent-from-every-path -m venv` is missing (apt package python3-venv) \
                 and only root can install it; {HINT}"
            )
        );
    }

    #[test]
    fn a_present_tool_is_found_without_installing() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("dbus-daemon");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        // Not executable yet: a plain file of that name does not count.
        let search = std::env::join_paths([Path::new("/nonexistent"), dir.path()]).unwrap();
        assert!(provision(Tool::DbusDaemon, Some(&search), false).is_err());
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(provision(Tool::DbusDaemon, Some(&search), false).unwrap(), fake);
    }
}
