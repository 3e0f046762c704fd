//! NCCL found and refused by name, against a stand-in `libnccl.so.2` built in a temporary
//! directory (no GPU or NCCL install needed).

use llmd_nvlib::fake::{FAKE_ERROR, build_fake_nccl};
use llmd_nvlib::nccl::{Nccl, NcclError, Version};
use llmd_nvlib::{NvLib, Search};

const VERSION: Version = Version { major: 2, minor: 19, patch: 3 };

#[test]
fn loads_libnccl_so_2_from_a_directory_and_reports_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = build_fake_nccl(dir.path(), "libnccl.so.2", VERSION).unwrap();
    let nccl = Nccl::load(&Search::Dirs(vec![dir.path().to_path_buf()])).unwrap();
    assert_eq!(nccl.version(), VERSION);
    assert_eq!(nccl.file(), path.to_str().unwrap());
    // Calls past loading reach the library and its failures come back named.
    match nccl.unique_id() {
        Err(NcclError::Call { call, code, message }) => {
            assert_eq!((call, code, message.as_str()), ("ncclGetUniqueId", 2, FAKE_ERROR));
        }
        other => panic!("expected the stand-in's error, got {other:?}"),
    }
    let err = nccl.comm_init_all(&[0, 1]).unwrap_err().to_string();
    assert_eq!(err, format!("ncclCommInitAll failed: {FAKE_ERROR} (code 2)"));
    let id = nccl.group(|| Ok::<_, NcclError>(3)).unwrap();
    assert_eq!(id, 3);
}

#[test]
fn an_empty_directory_reports_nccl_missing_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let err = Nccl::load(&Search::Dirs(vec![dir.path().to_path_buf()])).unwrap_err();
    assert!(matches!(&err, NcclError::Load(e) if e.lib() == Some(NvLib::Nccl)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("NCCL could not be loaded (tried "), "{msg}");
    assert!(msg.contains("/libnccl.so.2, "), "{msg}");
}

#[test]
fn only_libnccl_so_is_found_too() {
    let dir = tempfile::tempdir().unwrap();
    build_fake_nccl(dir.path(), "libnccl.so", VERSION).unwrap();
    let nccl = Nccl::load(&Search::Dirs(vec![dir.path().to_path_buf()])).unwrap();
    assert!(nccl.file().ends_with("/libnccl.so"), "{}", nccl.file());
}

/// The system search (a bare `dlopen("libnccl.so.2")`, as serving uses) finds a library that
/// only `LD_LIBRARY_PATH` points at; the dynamic linker reads that variable at process start,
/// so the check runs in a child process.
#[test]
fn system_search_finds_libnccl_so_2_on_ld_library_path() {
    let dir = tempfile::tempdir().unwrap();
    build_fake_nccl(dir.path(), "libnccl.so.2", VERSION).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_system_search", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("1 passed"), "{stdout}");
}

#[test]
#[ignore = "run by system_search_finds_libnccl_so_2_on_ld_library_path with LD_LIBRARY_PATH set"]
fn child_system_search() {
    let nccl = Nccl::system().unwrap();
    assert_eq!((nccl.file(), nccl.version()), ("libnccl.so.2", VERSION));
}
