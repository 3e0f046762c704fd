//! llmd's one way into NVIDIA's libraries. llmd never links against CUDA: every NVIDIA library
//! is opened at run time, so one binary runs on hosts with and without GPUs. This crate owns
//! which file names each library is looked up by ([`NvLib::candidates`]), where it is looked
//! for ([`Search`]), and the `dlopen` itself ([`Search::open`]); [`nccl`] holds the NCCL
//! bindings. A library once opened stays loaded for the life of the process (unloading libcuda
//! after `cuInit` is unsupported, and NCCL keeps threads), so a [`Library`] never closes its
//! handle and the function pointers taken from it stay valid.
//!
//! Who opens what, and why:
//!
//! | library | names, in order | opened by |
//! |---|---|---|
//! | CUDA driver | cudarc's: `libcuda.so`, …, `libcuda.so.13`, `libcuda.so.12`, …, `libcuda.so.1`, then the same for `nvcuda` | cudarc; checked here first |
//! | cuBLAS | cudarc's for `cublas` | cudarc; checked here first |
//! | cuBLASLt | cudarc's for `cublasLt` | the dynamic linker, as a dependency of libcublas |
//! | NVRTC | cudarc's for `nvrtc` | nobody at run time (see below) |
//! | NCCL | `libnccl.so.2`, `libnccl.so` | this crate ([`nccl`]) |
//! | NVML | `libnvidia-ml.so.1` | nvml-wrapper, given the file this crate resolved |
//!
//! cudarc (`dynamic-loading`) keeps one process-wide handle per library in its own static and
//! offers no way to hand it one, so the driver and cuBLAS stay loaded by cudarc. To keep the two
//! loaders from disagreeing, the names here for the libraries cudarc opens are cudarc's names in
//! cudarc's order (its `get_lib_name_candidates` for CUDA 13.0; a test in llmd-cuda compares them
//! with the linked cudarc), and llmd asks this crate before the first cudarc call: cudarc panics
//! when none of its names loads, this crate returns a [`LoadError`] naming every name tried. Since
//! the order is the same, the first name that opens here is the file cudarc opens, and the
//! doctor's `cuInit` probe tests that file. NVRTC is not opened at run time: the kernels are
//! compiled by nvcc at build time and loaded from a fatbin through the driver; cudarc's `nvrtc`
//! module is compiled only for its `Ptx` type. cuBLASLt is a `DT_NEEDED` entry of libcublas: when
//! it is missing, opening cuBLAS fails with the dynamic linker's message naming it.
//!
//! NCCL is opened here and not by cudarc because cudarc's names for it (`libnccl.so`,
//! `libnccl.so.13`, `.12`, `.11`, `.10`, `.9`, `.1`) miss `libnccl.so.2`, the name NCCL 2.x
//! installs and the only one the runtime package (`libnccl2`) ships.

pub mod nccl;

#[cfg(feature = "test-support")]
pub mod fake;

use std::fmt;
use std::mem::ManuallyDrop;
use std::path::PathBuf;

/// An NVIDIA library llmd may open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NvLib {
    /// The CUDA driver API, `libcuda`.
    Driver,
    Cublas,
    CublasLt,
    Nvrtc,
    Nccl,
    Nvml,
}

/// The CUDA version cudarc is built for (its `cuda-13000` feature), which its names use.
const CUDA_MAJOR: u32 = 13;
const CUDA_MINOR: u32 = 0;

/// The names cudarc 0.19 tries for library `stem` (its `get_lib_name_candidates`), in its order.
fn cudarc_names(stem: &str) -> Vec<String> {
    let (major, minor) = (CUDA_MAJOR, CUDA_MINOR);
    let lib = |suffix: String| format!("lib{stem}{suffix}");
    vec![
        lib(".so".into()),
        lib("64.so".into()),
        lib(format!("64_{major}.so")),
        lib(format!("64_{major}{minor}.so")),
        lib(format!("64_{major}{minor}_0.so")),
        lib(format!("64_{major}0_{minor}.so")),
        lib("64_10.so".into()),
        lib("64_11.so".into()),
        lib("64_12.so".into()),
        lib(format!("64_{major}0_0.so")),
        lib("64_9.so".into()),
        lib(format!(".so.{major}")),
        lib(".so.12".into()),
        lib(".so.11".into()),
        lib(".so.10".into()),
        lib(".so.9".into()),
        lib(".so.1".into()),
    ]
}

impl NvLib {
    pub const ALL: [NvLib; 6] = [NvLib::Driver, NvLib::Cublas, NvLib::CublasLt, NvLib::Nvrtc, NvLib::Nccl, NvLib::Nvml];

    /// File names tried, in order (see the crate doc for where each list comes from).
    pub fn candidates(self) -> Vec<String> {
        match self {
            NvLib::Driver => {
                let mut names = cudarc_names("cuda");
                names.extend(cudarc_names("nvcuda"));
                names
            }
            NvLib::Cublas => cudarc_names("cublas"),
            NvLib::CublasLt => cudarc_names("cublasLt"),
            NvLib::Nvrtc => cudarc_names("nvrtc"),
            NvLib::Nccl => vec!["libnccl.so.2".into(), "libnccl.so".into()],
            NvLib::Nvml => vec!["libnvidia-ml.so.1".into()],
        }
    }

    /// What to install when the library is missing.
    pub fn install_hint(self) -> &'static str {
        match self {
            NvLib::Driver => "install the NVIDIA driver (it ships libcuda.so.1)",
            NvLib::Cublas | NvLib::CublasLt => "install CUDA 13 cuBLAS (package libcublas-13-0, or pip nvidia-cublas)",
            NvLib::Nvrtc => "install CUDA 13 NVRTC (package cuda-nvrtc-13-0, or pip nvidia-cuda-nvrtc)",
            NvLib::Nccl => "install NCCL 2 (package libnccl2, or pip nvidia-nccl-cu13)",
            NvLib::Nvml => "install the NVIDIA driver (it ships libnvidia-ml.so.1)",
        }
    }
}

impl fmt::Display for NvLib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NvLib::Driver => "the CUDA driver library",
            NvLib::Cublas => "cuBLAS",
            NvLib::CublasLt => "cuBLASLt",
            NvLib::Nvrtc => "NVRTC",
            NvLib::Nccl => "NCCL",
            NvLib::Nvml => "NVML",
        })
    }
}

/// Why a library or one of its entry points could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// No candidate name opened. `last` is the dynamic linker's message for the last name tried
    /// (for a missing file, "cannot open shared object file"; for a broken one, the reason).
    /// Shown with every name tried, or for long lists (the driver's 34) the first three and
    /// the last.
    #[error("{lib} could not be loaded (tried {}): {last}", short_list(tried))]
    NotFound { lib: NvLib, tried: Vec<String>, last: String },
    /// The library opened but lacks an entry point: an old version or a stub.
    #[error("{file} has no `{symbol}`")]
    MissingSymbol { file: String, symbol: String },
}

fn short_list(names: &[String]) -> String {
    match names {
        [a, b, c, .., last] if names.len() > 4 => format!("{a}, {b}, {c}, …, {last}: {} names", names.len()),
        _ => names.join(", "),
    }
}

impl LoadError {
    /// The library that failed to load (`None` for a missing symbol).
    pub fn lib(&self) -> Option<NvLib> {
        match self {
            LoadError::NotFound { lib, .. } => Some(*lib),
            LoadError::MissingSymbol { .. } => None,
        }
    }
}

/// Where libraries are looked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Search {
    /// The dynamic linker's own search (`dlopen` of the bare name: `LD_LIBRARY_PATH`, the
    /// `ld.so` cache, the default directories), as cudarc and nvml-wrapper search. What llmd
    /// uses when serving.
    #[default]
    System,
    /// Only these directories (`dlopen` of full paths), each name tried in every directory
    /// before the next name. For tests and for probing a given install.
    Dirs(Vec<PathBuf>),
}

impl Search {
    /// Opens `lib`: the first of its [`NvLib::candidates`] that loads, with symbols resolved at
    /// once (`RTLD_NOW`) and kept out of the global namespace (`RTLD_LOCAL`). Opening a library
    /// that is already loaded returns the same handle (the dynamic linker counts references).
    pub fn open(&self, lib: NvLib) -> Result<Library, LoadError> {
        let names = lib.candidates();
        let paths: Vec<String> = match self {
            Search::System => names,
            Search::Dirs(dirs) => names
                .iter()
                .flat_map(|name| dirs.iter().map(move |d| d.join(name).to_string_lossy().into_owned()))
                .collect(),
        };
        let mut last = String::from("no directory to search");
        for path in &paths {
            use libloading::os::unix::{Library as Raw, RTLD_LOCAL, RTLD_NOW};
            // SAFETY: opening a system-installed NVIDIA library runs its initialisers, which make
            // no demands on the caller; the handle is never closed (see `Library`), so its
            // termination routines never run while llmd uses it.
            match unsafe { Raw::open(Some(path.as_str()), RTLD_NOW | RTLD_LOCAL) } {
                Ok(handle) => {
                    tracing::debug!(%lib, file = %path, "NVIDIA library loaded");
                    return Ok(Library { lib, file: path.clone(), handle: ManuallyDrop::new(handle) });
                }
                Err(e) => last = dl_message(&e),
            }
        }
        Err(LoadError::NotFound { lib, tried: paths, last })
    }
}

/// The dynamic linker's own text for a failed `dlopen` (libloading puts it in the source).
fn dl_message(e: &libloading::Error) -> String {
    std::error::Error::source(e).map_or_else(|| e.to_string(), |s| s.to_string())
}

/// An opened NVIDIA library. Its handle is never closed: dropping a `Library` leaves the
/// library loaded, so function pointers taken from it stay valid for the life of the process.
pub struct Library {
    lib: NvLib,
    file: String,
    handle: ManuallyDrop<libloading::os::unix::Library>,
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library").field("lib", &self.lib).field("file", &self.file).finish()
    }
}

impl Library {
    pub fn lib(&self) -> NvLib {
        self.lib
    }

    /// The name (system search) or path (directory search) that opened.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The entry point `name`, as a value of `T`.
    ///
    /// # Safety
    /// `T` must be the exact `unsafe extern "C" fn` type the library's header declares for
    /// `name`. The pointer stays valid for the life of the process (the library is never
    /// unloaded).
    pub unsafe fn symbol<T: Copy>(&self, name: &str) -> Result<T, LoadError> {
        // SAFETY: the caller guarantees `T` is the symbol's type.
        match unsafe { self.handle.get::<T>(name) } {
            Ok(symbol) => Ok(*symbol),
            Err(_) => Err(LoadError::MissingSymbol { file: self.file.clone(), symbol: name.to_string() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_tries_the_name_nccl_2_installs_first() {
        assert_eq!(NvLib::Nccl.candidates(), ["libnccl.so.2", "libnccl.so"]);
    }

    #[test]
    fn driver_names_follow_cudarcs_order() {
        let names = NvLib::Driver.candidates();
        assert_eq!(names.len(), 34);
        assert_eq!(names[0], "libcuda.so");
        assert_eq!(names[11], "libcuda.so.13");
        assert_eq!(names[16], "libcuda.so.1");
        assert_eq!(names[17], "libnvcuda.so");
        assert!(NvLib::Cublas.candidates().contains(&"libcublas.so.13".to_string()));
    }

    #[test]
    fn a_missing_library_names_every_file_tried() {
        let dir = tempfile::tempdir().unwrap();
        let err = Search::Dirs(vec![dir.path().to_path_buf()]).open(NvLib::Nccl).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.lib(), Some(NvLib::Nccl));
        assert!(msg.starts_with("NCCL could not be loaded (tried "), "{msg}");
        assert!(msg.contains(&format!("{}/libnccl.so.2, ", dir.path().display())), "{msg}");
        assert!(msg.contains("No such file"), "{msg}");
        let none = Search::Dirs(Vec::new()).open(NvLib::Nvml).unwrap_err().to_string();
        assert_eq!(none, "NVML could not be loaded (tried ): no directory to search");
        let driver = Search::Dirs(vec![dir.path().to_path_buf()]).open(NvLib::Driver).unwrap_err().to_string();
        let d = dir.path().display();
        assert!(
            driver.starts_with(&format!(
                "the CUDA driver library could not be loaded (tried {d}/libcuda.so, {d}/libcuda64.so, {d}/libcuda64_13.so, …, {d}/libnvcuda.so.1: 34 names): "
            )),
            "{driver}"
        );
    }

    #[test]
    fn symbols_resolve_and_a_missing_one_is_named() {
        // libc stands in for an NVIDIA library: the same open and lookup paths.
        let libc =
            unsafe { libloading::os::unix::Library::open(Some("libc.so.6"), libloading::os::unix::RTLD_NOW) }.unwrap();
        let lib = Library { lib: NvLib::Nvml, file: "libc.so.6".into(), handle: ManuallyDrop::new(libc) };
        // SAFETY: `pid_t getpid(void)`.
        let getpid = unsafe { lib.symbol::<unsafe extern "C" fn() -> i32>("getpid") }.unwrap();
        assert_eq!(unsafe { getpid() } as u32, std::process::id());
        let err = unsafe { lib.symbol::<unsafe extern "C" fn()>("no_such_symbol_xyz") }.unwrap_err();
        assert_eq!(err.to_string(), "libc.so.6 has no `no_such_symbol_xyz`");
    }
}
