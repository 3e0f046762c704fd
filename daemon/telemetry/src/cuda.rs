//! The `cuInit` smoke test: opens the CUDA driver library through llmd-nvlib at run time (llmd
//! does not link against CUDA), under the names and in the order the engine's cudarc uses, so it
//! tests the file serving will use, and calls `cuDriverGetVersion`, `cuInit` and
//! `cuDeviceGetCount`.

use std::ffi::{CStr, c_char, c_int, c_uint};

use llmd_nvlib::{NvLib, Search};

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
    /// No name of the driver library opened; llmd-nvlib's message (names tried, `dlerror` text).
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
    probe_cuda_in(&Search::System)
}

/// [`probe_cuda`] with the driver library looked up through `search`.
pub fn probe_cuda_in(search: &Search) -> CudaProbe {
    let lib = match search.open(NvLib::Driver) {
        Ok(lib) => lib,
        Err(e) => return CudaProbe { driver_version: None, init: CudaInit::LibraryMissing(e.to_string()) },
    };
    // SAFETY: the signatures match cuda.h: `CUresult cuDriverGetVersion(int*)`,
    // `CUresult cuInit(unsigned int)`, `CUresult cuDeviceGetCount(int*)`,
    // `CUresult cuGetErrorName(CUresult, const char**)`; CUresult is a C enum (int).
    let (get_version, init, get_count, error_name) = unsafe {
        (
            lib.symbol::<CuIntOut>("cuDriverGetVersion").ok(),
            lib.symbol::<CuInit>("cuInit").ok(),
            lib.symbol::<CuIntOut>("cuDeviceGetCount").ok(),
            lib.symbol::<CuGetErrorName>("cuGetErrorName").ok(),
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
    fn a_missing_driver_library_is_reported_with_the_names_tried() {
        let dir = tempfile::tempdir().unwrap();
        let probe = probe_cuda_in(&Search::Dirs(vec![dir.path().to_path_buf()]));
        assert_eq!(probe.driver_version, None);
        let CudaInit::LibraryMissing(msg) = probe.init else { panic!("{probe:?}") };
        assert!(msg.contains(&format!("{}/libcuda.so, ", dir.path().display())) && msg.contains("34 names"), "{msg}");
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
}
