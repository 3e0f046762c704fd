//! The `cuInit` smoke test: loads `libcuda.so.1` with `dlopen` at run time (llmd does not
//! link against CUDA) and calls `cuDriverGetVersion`, `cuInit` and `cuDeviceGetCount`.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};

/// `CUDA_ERROR_NO_DEVICE`.
pub const CUDA_ERROR_NO_DEVICE: i32 = 100;
/// `CUDA_ERROR_SYSTEM_NOT_READY`: on NVSwitch systems, the fabric manager is not running.
pub const CUDA_ERROR_SYSTEM_NOT_READY: i32 = 802;
/// `CUDA_ERROR_SYSTEM_DRIVER_MISMATCH`: kernel module and user-space driver differ.
pub const CUDA_ERROR_SYSTEM_DRIVER_MISMATCH: i32 = 803;
/// `CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE`: forward-compat libcuda on an unsupported GPU.
pub const CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE: i32 = 804;
/// `CUDA_ERROR_INSUFFICIENT_DRIVER`: libcuda is older than the kernel module expects.
pub const CUDA_ERROR_INSUFFICIENT_DRIVER: i32 = 35;
/// `CUDA_ERROR_UNKNOWN`.
pub const CUDA_ERROR_UNKNOWN: i32 = 999;

/// What the CUDA driver API said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaProbe {
    /// `cuDriverGetVersion`, e.g. 12040 for CUDA 12.4; `None` when it could not be called.
    pub driver_version: Option<i32>,
    /// The outcome of `cuInit(0)`.
    pub init: CudaInit,
}

/// Outcome of `cuInit(0)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaInit {
    /// `dlopen("libcuda.so.1")` failed; the `dlerror` text.
    LibraryMissing(String),
    /// libcuda loaded but lacks a needed entry point.
    SymbolMissing(String),
    /// `cuInit` returned an error `code` (its `cuGetErrorName`, e.g. "CUDA_ERROR_SYSTEM_NOT_READY").
    Failed { code: i32, name: String },
    /// `cuInit` succeeded; `devices` from `cuDeviceGetCount`.
    Ok { devices: i32 },
}

type CuInit = unsafe extern "C" fn(c_uint) -> c_int;
type CuIntOut = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuGetErrorName = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;

/// Loads libcuda and runs the smoke test. Safe to call repeatedly: the library stays loaded
/// (unloading libcuda after `cuInit` is not supported by the driver) and `cuInit` is idempotent.
pub fn probe_cuda() -> CudaProbe {
    let lib = match Library::open(c"libcuda.so.1") {
        Ok(lib) => lib,
        Err(e) => return CudaProbe { driver_version: None, init: CudaInit::LibraryMissing(e) },
    };
    // SAFETY: the signatures match cuda.h: `CUresult cuDriverGetVersion(int*)`,
    // `CUresult cuInit(unsigned int)`, `CUresult cuDeviceGetCount(int*)`,
    // `CUresult cuGetErrorName(CUresult, const char**)`; CUresult is a C enum (int).
    let (get_version, init, get_count, error_name) = unsafe {
        (
            lib.symbol::<CuIntOut>(c"cuDriverGetVersion"),
            lib.symbol::<CuInit>(c"cuInit"),
            lib.symbol::<CuIntOut>(c"cuDeviceGetCount"),
            lib.symbol::<CuGetErrorName>(c"cuGetErrorName"),
        )
    };
    let driver_version = get_version.and_then(|f| {
        let mut v: c_int = 0;
        // SAFETY: `v` is a valid out-pointer for the call's duration.
        (unsafe { f(&mut v) } == 0).then_some(v)
    });
    let Some(init) = init else {
        return CudaProbe { driver_version, init: CudaInit::SymbolMissing("cuInit".into()) };
    };
    // SAFETY: plain C call with flags 0, as cuda.h requires.
    let code = unsafe { init(0) };
    if code != 0 {
        let name = error_name
            .and_then(|f| {
                let mut s: *const c_char = std::ptr::null();
                // SAFETY: `s` is a valid out-pointer; on success it points to a static string.
                (unsafe { f(code, &mut s) } == 0 && !s.is_null())
                    .then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| format!("CUresult {code}"));
        return CudaProbe { driver_version, init: CudaInit::Failed { code, name } };
    }
    let Some(get_count) = get_count else {
        return CudaProbe { driver_version, init: CudaInit::SymbolMissing("cuDeviceGetCount".into()) };
    };
    let mut devices: c_int = 0;
    // SAFETY: `devices` is a valid out-pointer; cuInit succeeded.
    let code = unsafe { get_count(&mut devices) };
    if code != 0 {
        return CudaProbe {
            driver_version,
            init: CudaInit::Failed { code, name: format!("cuDeviceGetCount: CUresult {code}") },
        };
    }
    CudaProbe { driver_version, init: CudaInit::Ok { devices } }
}

/// A `dlopen` handle that is never closed (see [`probe_cuda`]).
struct Library(*mut c_void);

impl Library {
    fn open(name: &CStr) -> Result<Library, String> {
        // SAFETY: `name` is NUL-terminated; RTLD_LOCAL keeps libcuda's symbols out of the
        // global namespace.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() { Err(dlerror()) } else { Ok(Library(handle)) }
    }

    /// # Safety
    /// `T` must be the exact `extern "C" fn` type of the symbol `name`.
    unsafe fn symbol<T: Copy>(&self, name: &CStr) -> Option<T> {
        // SAFETY: valid handle from dlopen, NUL-terminated name.
        let ptr = unsafe { libc::dlsym(self.0, name.as_ptr()) };
        if ptr.is_null() {
            return None;
        }
        debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: the caller guarantees `T` is the function pointer type of this symbol.
        Some(unsafe { std::mem::transmute_copy::<*mut c_void, T>(&ptr) })
    }
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated thread-local string.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
    }
}

/// "12.4" from 12040.
pub fn format_driver_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_formatting() {
        assert_eq!(format_driver_version(12040), "12.4");
        assert_eq!(format_driver_version(13000), "13.0");
    }

    #[test]
    fn missing_library_is_reported_not_fatal() {
        let err = Library::open(c"libllmd-does-not-exist.so.9").err().unwrap();
        assert!(err.contains("libllmd-does-not-exist.so.9"), "{err}");
    }

    #[test]
    fn probe_never_panics() {
        // Without a driver this returns LibraryMissing; on a GPU host, a real answer.
        let probe = probe_cuda();
        if let CudaInit::LibraryMissing(msg) = &probe.init {
            assert!(!msg.is_empty());
            assert_eq!(probe.driver_version, None);
        }
    }

    #[test]
    fn symbols_resolve_in_libc() {
        // Exercises the dlsym path against a library every Linux host has.
        let lib = Library::open(c"libc.so.6").unwrap();
        // SAFETY: getpid has the signature `pid_t getpid(void)`.
        let getpid = unsafe { lib.symbol::<unsafe extern "C" fn() -> c_int>(c"getpid") }.unwrap();
        assert_eq!(unsafe { getpid() } as u32, std::process::id());
        assert!(unsafe { lib.symbol::<unsafe extern "C" fn()>(c"no_such_symbol_xyz") }.is_none());
    }
}
