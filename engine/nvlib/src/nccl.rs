//! NCCL 2, opened at run time: the entry points llmd uses (tensor-parallel all-reduce and
//! all-gather in llmd-cuda, the doctor's all-reduce check in llmd-telemetry), each behind a
//! method that checks the result code and names the failing call.
//!
//! Collectives take raw device addresses and a CUDA stream, as NCCL does; the typed callers
//! (llmd-cuda's `Communicator` over its device tensors) check sizes before calling the
//! `unsafe` methods here.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::fmt;
use std::sync::{Arc, OnceLock};

use crate::{LoadError, NvLib, Search};

/// Why an NCCL call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NcclError {
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A call returned `code` (an `ncclResult_t`); `message` is `ncclGetErrorString`'s text.
    #[error("{call} failed: {message} (code {code})")]
    Call { call: &'static str, code: i32, message: String },
    #[error("{0}")]
    Usage(String),
}

/// `ncclUniqueId`: 128 opaque bytes, created by one rank and handed to every rank.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct UniqueId {
    internal: [c_char; 128],
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UniqueId(..)")
    }
}

/// NCCL's version, from `ncclGetVersion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// Decodes `NCCL_VERSION_CODE`: major·10000 + minor·100 + patch since 2.9, major·1000 +
    /// minor·100 + patch before.
    pub fn from_code(code: i32) -> Version {
        let code = code.max(0) as u32;
        let (major, rest) = if code >= 10_000 { (code / 10_000, code % 10_000) } else { (code / 1000, code % 1000) };
        Version { major, minor: rest / 100, patch: rest % 100 }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Element types of a collective (`ncclDataType_t` values from nccl.h, stable across NCCL 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    F16 = 6,
    F32 = 7,
    BF16 = 9,
}

type Comm = *mut c_void;
type NcclResult = c_int;
const NCCL_SUM: c_int = 0;

/// The entry points, resolved once per load.
struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    comm_init_all: unsafe extern "C" fn(*mut Comm, c_int, *const c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> NcclResult,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, *mut c_void) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

impl Api {
    fn check(&self, call: &'static str, r: NcclResult) -> Result<(), NcclError> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns NULL or a static NUL-terminated string.
        let ptr = unsafe { (self.error_string)(r) };
        let message = if ptr.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
        };
        Err(NcclError::Call { call, code: r, message })
    }
}

/// NCCL, opened: its version, the file it came from, and its entry points. Cheap to clone.
#[derive(Clone)]
pub struct Nccl {
    api: Arc<Api>,
    version: Version,
    file: String,
}

impl fmt::Debug for Nccl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nccl").field("version", &self.version).field("file", &self.file).finish()
    }
}

impl Nccl {
    /// Opens NCCL through `search` (`libnccl.so.2` first) and resolves every entry point llmd
    /// uses; a library lacking one is refused with its name.
    pub fn load(search: &Search) -> Result<Nccl, NcclError> {
        let lib = search.open(NvLib::Nccl)?;
        // SAFETY: each type is the declaration in nccl.h (NCCL 2.x): ncclResult_t is a C enum
        // (int), ncclComm_t a pointer, cudaStream_t a pointer, ncclUniqueId passed by value.
        let api = unsafe {
            Api {
                get_version: lib.symbol("ncclGetVersion")?,
                get_unique_id: lib.symbol("ncclGetUniqueId")?,
                comm_init_rank: lib.symbol("ncclCommInitRank")?,
                comm_init_all: lib.symbol("ncclCommInitAll")?,
                comm_destroy: lib.symbol("ncclCommDestroy")?,
                all_reduce: lib.symbol("ncclAllReduce")?,
                all_gather: lib.symbol("ncclAllGather")?,
                group_start: lib.symbol("ncclGroupStart")?,
                group_end: lib.symbol("ncclGroupEnd")?,
                error_string: lib.symbol("ncclGetErrorString")?,
            }
        };
        let mut code: c_int = 0;
        // SAFETY: `code` is a valid out-pointer.
        api.check("ncclGetVersion", unsafe { (api.get_version)(&mut code) })?;
        Ok(Nccl { api: Arc::new(api), version: Version::from_code(code), file: lib.file().to_string() })
    }

    /// The process-wide NCCL of the system search, opened at the first call that finds it (a
    /// failed attempt is not remembered, so installing NCCL takes effect without a restart).
    pub fn system() -> Result<&'static Nccl, NcclError> {
        static NCCL: OnceLock<Nccl> = OnceLock::new();
        if let Some(nccl) = NCCL.get() {
            return Ok(nccl);
        }
        let nccl = Nccl::load(&Search::System)?;
        Ok(NCCL.get_or_init(|| nccl))
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The name or path it was opened from.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// A new unique id for one communicator (one rank makes it, every rank joins with it).
    pub fn unique_id(&self) -> Result<UniqueId, NcclError> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid out-pointer of the declared type.
        self.api.check("ncclGetUniqueId", unsafe { (self.api.get_unique_id)(&mut id) })?;
        Ok(id)
    }

    /// Runs `f` between `ncclGroupStart` and `ncclGroupEnd`, as one thread that drives several
    /// ranks must. The group is closed whatever `f` returns; `f`'s error comes first.
    pub fn group<T, E: From<NcclError>>(&self, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
        // SAFETY: group calls only bracket other NCCL calls of this thread.
        self.api.check("ncclGroupStart", unsafe { (self.api.group_start)() })?;
        let out = f();
        // SAFETY: as above; closes the group opened here.
        let end = self.api.check("ncclGroupEnd", unsafe { (self.api.group_end)() });
        let out = out?;
        end?;
        Ok(out)
    }

    /// Joins communicator `id` as `rank` of `world` on the calling thread's current CUDA
    /// context's device. Blocks until every rank joined (call it inside [`Nccl::group`] when one
    /// thread joins several ranks).
    pub fn comm_init_rank(&self, id: UniqueId, rank: usize, world: usize) -> Result<Communicator, NcclError> {
        if rank >= world {
            return Err(NcclError::Usage(format!("rank {rank} of a world of {world}")));
        }
        let (r, w) = (int(rank)?, int(world)?);
        let mut comm: Comm = std::ptr::null_mut();
        // SAFETY: valid out-pointer; rank < world checked above.
        self.api.check("ncclCommInitRank", unsafe { (self.api.comm_init_rank)(&mut comm, w, id, r) })?;
        Ok(Communicator { api: self.api.clone(), comm, rank, world })
    }

    /// One communicator per CUDA device in `devices` (ordinals), rank i on `devices[i]`, for a
    /// single thread that drives them all (`ncclCommInitAll`).
    pub fn comm_init_all(&self, devices: &[usize]) -> Result<Vec<Communicator>, NcclError> {
        let list: Vec<c_int> = devices.iter().map(|&d| int(d)).collect::<Result<_, _>>()?;
        let mut comms: Vec<Comm> = vec![std::ptr::null_mut(); list.len()];
        // SAFETY: `comms` has room for one communicator per device in `list`.
        self.api.check("ncclCommInitAll", unsafe {
            (self.api.comm_init_all)(comms.as_mut_ptr(), int(list.len())?, list.as_ptr())
        })?;
        let world = comms.len();
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| Communicator { api: self.api.clone(), comm, rank, world })
            .collect())
    }
}

fn int(v: usize) -> Result<c_int, NcclError> {
    c_int::try_from(v).map_err(|_| NcclError::Usage(format!("{v} exceeds a C int")))
}

/// One rank's communicator; destroyed on drop. Collectives are queued on the stream given to
/// each call.
pub struct Communicator {
    api: Arc<Api>,
    comm: Comm,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may move between threads; llmd uses each from one thread at a
// time (the rank thread that owns its GPU).
unsafe impl Send for Communicator {}

impl fmt::Debug for Communicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Communicator").field("rank", &self.rank).field("world", &self.world).finish()
    }
}

impl Communicator {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Queues recv[i] = Σ over ranks of send[i], for `count` elements of `dtype`, on `stream`.
    ///
    /// # Safety
    /// `send` and `recv` are device addresses of this rank's GPU holding at least `count`
    /// elements of `dtype` (they may be equal: in place), live until the stream has run the
    /// call; `stream` is a `CUstream` of the communicator's device (null: the legacy stream).
    pub unsafe fn all_reduce_sum(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DataType,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        // SAFETY: the caller's contract above is NCCL's for ncclAllReduce.
        self.api.check("ncclAllReduce", unsafe {
            (self.api.all_reduce)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                dtype as c_int,
                NCCL_SUM,
                self.comm,
                stream,
            )
        })
    }

    /// Queues recv[r·count .. (r+1)·count] = send of rank r, for every rank r, on `stream`.
    ///
    /// # Safety
    /// `send` holds `count` elements of `dtype` and `recv` `count × world` elements, both
    /// device addresses of this rank's GPU live until the stream has run the call; `stream` is
    /// a `CUstream` of that device.
    pub unsafe fn all_gather(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: DataType,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        // SAFETY: the caller's contract above is NCCL's for ncclAllGather.
        self.api.check("ncclAllGather", unsafe {
            (self.api.all_gather)(send as *const c_void, recv as *mut c_void, count, dtype as c_int, self.comm, stream)
        })
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // SAFETY: the communicator was created by ncclCommInitRank/All and is destroyed once.
        let r = unsafe { (self.api.comm_destroy)(self.comm) };
        if r != 0 {
            tracing::warn!(rank = self.rank, code = r, "ncclCommDestroy failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_decode_both_schemes() {
        assert_eq!(Version::from_code(21903), Version { major: 2, minor: 19, patch: 3 });
        assert_eq!(Version::from_code(22703).to_string(), "2.27.3");
        assert_eq!(Version::from_code(2804), Version { major: 2, minor: 8, patch: 4 });
    }
}
