//! NCCL, loaded at run time, for tensor parallelism inside one host.
//!
//! cudarc's NCCL loader looks for `libnccl.so` and `libnccl.so.{13,12,11,10,9,1}` but not the
//! `libnccl.so.2` that NCCL 2.x installs, so the handful of entry points llmd needs are
//! resolved here with `libloading`. Every call is wrapped in a safe method that checks the
//! result code and names the failing call.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use crate::device::{DType, TensorRef};
use crate::error::CudaError;

/// `ncclUniqueId`: 128 opaque bytes, created by rank 0 and shared with every rank.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct UniqueId {
    internal: [c_char; 128],
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UniqueId(..)")
    }
}

type Comm = *mut c_void;
type Stream = *mut c_void;
type NcclResult = c_int;

// ncclDataType_t / ncclRedOp_t values from nccl.h (stable across NCCL 2.x).
const NCCL_FLOAT32: c_int = 7;
const NCCL_BFLOAT16: c_int = 9;
const NCCL_SUM: c_int = 0;

struct Api {
    _lib: libloading::Library,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> NcclResult,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

// SAFETY: the function pointers are plain C entry points valid for the library's lifetime,
// which is the process's (the library is never unloaded).
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// Library names tried in order: the versioned name NCCL 2.x installs first.
const LIB_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];

fn api() -> Result<&'static Api, CudaError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(|| {
        let mut last = String::new();
        for name in LIB_NAMES {
            // SAFETY: loading NCCL runs its (trusted, system-installed) initialisers only.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => return load_symbols(lib).map_err(|e| format!("{name}: {e}")),
                Err(e) => last = e.to_string(),
            }
        }
        Err(format!("NCCL could not be loaded (tried {}): {last}", LIB_NAMES.join(", ")))
    })
    .as_ref()
    .map_err(|e| CudaError::Nccl(e.clone()))
}

fn load_symbols(lib: libloading::Library) -> Result<Api, libloading::Error> {
    // SAFETY: the symbol types match the declarations in nccl.h for NCCL 2.x.
    unsafe {
        Ok(Api {
            get_unique_id: *lib.get(b"ncclGetUniqueId\0")?,
            comm_init_rank: *lib.get(b"ncclCommInitRank\0")?,
            comm_destroy: *lib.get(b"ncclCommDestroy\0")?,
            all_reduce: *lib.get(b"ncclAllReduce\0")?,
            all_gather: *lib.get(b"ncclAllGather\0")?,
            group_start: *lib.get(b"ncclGroupStart\0")?,
            group_end: *lib.get(b"ncclGroupEnd\0")?,
            error_string: *lib.get(b"ncclGetErrorString\0")?,
            _lib: lib,
        })
    }
}

fn check(api: &Api, what: &str, r: NcclResult) -> Result<(), CudaError> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string.
    let msg = unsafe { std::ffi::CStr::from_ptr((api.error_string)(r)) }.to_string_lossy().into_owned();
    Err(CudaError::Nccl(format!("{what} failed: {msg} (code {r})")))
}

/// Whether NCCL can be loaded on this host.
pub fn available() -> bool {
    api().is_ok()
}

/// A new unique id for one communicator (rank 0 makes it, every rank uses it).
pub fn unique_id() -> Result<UniqueId, CudaError> {
    let api = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: `id` is a valid out-pointer of the declared type.
    check(api, "ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
    Ok(id)
}

/// Runs `f` inside ncclGroupStart/End, as needed when one thread initialises several ranks.
pub fn group<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    let api = api()?;
    // SAFETY: group calls only bracket other NCCL calls of this thread.
    check(api, "ncclGroupStart", unsafe { (api.group_start)() })?;
    let out = f();
    check(api, "ncclGroupEnd", unsafe { (api.group_end)() })?;
    out
}

/// One rank's communicator. Operations are enqueued on the stream given at each call.
#[derive(Debug)]
pub struct Communicator {
    comm: Comm,
    pub rank: usize,
    pub world: usize,
}

// SAFETY: a communicator is used by the one thread that owns its GPU at a time.
unsafe impl Send for Communicator {}

impl Communicator {
    /// Joins communicator `id` as `rank` of `world`. The calling thread's current CUDA
    /// context must be the rank's GPU. Blocks until all ranks joined.
    pub fn init(id: UniqueId, rank: usize, world: usize) -> Result<Communicator, CudaError> {
        let api = api()?;
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; rank < world checked by the caller's construction.
        check(api, "ncclCommInitRank", unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) })?;
        Ok(Communicator { comm, rank, world })
    }

    fn nccl_type(t: &TensorRef) -> Result<c_int, CudaError> {
        match t.dtype {
            DType::BF16 => Ok(NCCL_BFLOAT16),
            DType::F32 => Ok(NCCL_FLOAT32),
            other => Err(CudaError::Shape(format!("NCCL collective on {other:?}"))),
        }
    }

    /// In-place sum of `buf` across all ranks (bf16 or f32).
    pub fn all_reduce_sum(&self, buf: &TensorRef, stream: &cudarc::driver::CudaStream) -> Result<(), CudaError> {
        let api = api()?;
        let stream = stream.cu_stream() as Stream;
        let ty = Self::nccl_type(buf)?;
        // SAFETY: `buf` is a live device allocation of `numel` elements of `ty` on this rank's GPU.
        check(api, "ncclAllReduce", unsafe {
            (api.all_reduce)(
                buf.ptr as *const c_void,
                buf.ptr as *mut c_void,
                buf.numel(),
                ty,
                NCCL_SUM,
                self.comm,
                stream,
            )
        })
    }

    /// out[rank * n .. (rank + 1) * n] = input from each rank (n = input.numel()).
    pub fn all_gather(
        &self,
        input: &TensorRef,
        out: &TensorRef,
        stream: &cudarc::driver::CudaStream,
    ) -> Result<(), CudaError> {
        let api = api()?;
        let stream = stream.cu_stream() as Stream;
        let ty = Self::nccl_type(input)?;
        if out.dtype != input.dtype || out.numel() < input.numel() * self.world {
            return Err(CudaError::Shape(format!("all_gather of {:?} into {:?}", input.shape, out.shape)));
        }
        // SAFETY: sizes checked above; both buffers live on this rank's GPU.
        check(api, "ncclAllGather", unsafe {
            (api.all_gather)(input.ptr as *const c_void, out.ptr as *mut c_void, input.numel(), ty, self.comm, stream)
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            // SAFETY: the communicator was created by ncclCommInitRank and is destroyed once.
            let r = unsafe { (api.comm_destroy)(self.comm) };
            if r != 0 {
                tracing::warn!(rank = self.rank, code = r, "ncclCommDestroy failed");
            }
        }
    }
}
