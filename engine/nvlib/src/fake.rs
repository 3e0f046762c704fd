//! A stand-in NCCL for tests without a GPU (feature `test-support`): a shared object exporting
//! every entry point [`crate::nccl::Nccl::load`] resolves, compiled with the system C compiler.
//! `ncclGetVersion` reports the version asked for; every other call fails with
//! `ncclSystemError` and the text [`FAKE_ERROR`], so a caller that gets past loading is told so.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::nccl::Version;

/// What the stand-in's `ncclGetErrorString` returns.
pub const FAKE_ERROR: &str = "fake NCCL: no devices";

/// Compiles the stand-in as `dir/file_name` (e.g. `libnccl.so.2`) reporting `version`, with
/// `cc` (or `$CC`). Returns the path written.
pub fn build_fake_nccl(dir: &Path, file_name: &str, version: Version) -> io::Result<PathBuf> {
    let code = version.major * 10_000 + version.minor * 100 + version.patch;
    let source = format!(
        r#"typedef struct {{ char internal[128]; }} ncclUniqueId;
typedef void *ncclComm_t;
int ncclGetVersion(int *v) {{ *v = {code}; return 0; }}
const char *ncclGetErrorString(int r) {{ (void)r; return "{FAKE_ERROR}"; }}
int ncclGetUniqueId(ncclUniqueId *id) {{ (void)id; return 2; }}
int ncclCommInitRank(ncclComm_t *c, int n, ncclUniqueId id, int r) {{ (void)c; (void)n; (void)id; (void)r; return 2; }}
int ncclCommInitAll(ncclComm_t *c, int n, const int *d) {{ (void)c; (void)n; (void)d; return 2; }}
int ncclCommDestroy(ncclComm_t c) {{ (void)c; return 0; }}
int ncclAllReduce(const void *s, void *r, unsigned long n, int t, int o, ncclComm_t c, void *st) {{
  (void)s; (void)r; (void)n; (void)t; (void)o; (void)c; (void)st; return 2; }}
int ncclAllGather(const void *s, void *r, unsigned long n, int t, ncclComm_t c, void *st) {{
  (void)s; (void)r; (void)n; (void)t; (void)c; (void)st; return 2; }}
int ncclGroupStart(void) {{ return 0; }}
int ncclGroupEnd(void) {{ return 0; }}
"#
    );
    let src = dir.join(format!("{file_name}.c"));
    std::fs::write(&src, source)?;
    let out = dir.join(file_name);
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let status = Command::new(&cc).args(["-shared", "-fPIC", "-o"]).arg(&out).arg(&src).status()?;
    std::fs::remove_file(&src)?;
    if !status.success() {
        return Err(io::Error::other(format!("{} failed building {}: {status}", cc.to_string_lossy(), out.display())));
    }
    Ok(out)
}
