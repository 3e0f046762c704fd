//! One GPU ([`Gpu`]: its context, the stream everything runs on, the cuBLAS handle, the loaded
//! kernels) and its memory: [`DeviceTensor`], an owned allocation with a shape, and
//! [`TensorRef`], a view of one that launch wrappers take. Buffers are addressed by raw pointers
//! so the decode step can be captured as a CUDA graph with static addresses.
//!
//! A view cannot be forged: its fields are private, the only views are a whole tensor
//! ([`DeviceTensor::r`]) and sub-views of a view ([`TensorRef::rows`], [`TensorRef::slice`],
//! [`TensorRef::reshape`], [`TensorRef::view_bytes`]), each checked to lie inside the one it is
//! taken from — in release builds too, as errors. A view does not borrow its tensor (decode
//! graphs keep addresses across steps); the runner that owns both keeps the tensor alive.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, result};
use llmd_nvlib::{NvLib, Search};

use crate::error::CudaError;
use crate::module::Kernels;

/// Checks that the CUDA driver library opens under the names cudarc uses (llmd-nvlib's list is
/// cudarc's), before any cudarc driver call: cudarc panics when it cannot open it.
pub fn driver_library() -> Result<(), CudaError> {
    Search::System.open(NvLib::Driver)?;
    Ok(())
}

/// Whether the CUDA driver library can be loaded on this host. Never panics.
pub fn driver_present() -> bool {
    driver_library().is_ok()
}

/// Number of CUDA devices, or why none can be used (no driver, no GPU, init error).
pub fn device_count() -> Result<usize, CudaError> {
    driver_library()?;
    Ok(CudaContext::device_count()? as usize)
}

/// Element types of device tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F32,
    I32,
    I64,
    U32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::I64 => 8,
        }
    }
}

/// Where a tensor's bytes live.
#[derive(Debug)]
enum Storage {
    /// cudarc's stream-ordered pool (most buffers).
    Pool(CudaSlice<u8>),
    /// `cuMemAlloc` in `ctx`, freed on drop: reachable by other GPUs through peer access, which
    /// pool memory is not (the peer all-reduce's buffers).
    Unpooled { ctx: Arc<CudaContext>, bytes: usize },
}

/// A device allocation with a shape. Buffers are allocated once and addressed by pointer;
/// [`TensorRef`]s handed to kernels view them for the duration of one launch sequence.
#[derive(Debug)]
pub struct DeviceTensor {
    storage: Storage,
    ptr: u64,
    shape: Vec<usize>,
    dtype: DType,
}

fn bytes_of(shape: &[usize], dtype: DType) -> Result<usize, CudaError> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| CudaError::Shape(format!("{shape:?} of {dtype:?} overflows")))
}

impl DeviceTensor {
    /// A zero-filled tensor from the stream's pool (at least one element's bytes).
    pub fn zeros(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Self, CudaError> {
        let bytes = bytes_of(shape, dtype)?.max(dtype.size());
        let buf = gpu.stream.alloc_zeros::<u8>(bytes)?;
        let ptr = {
            let (ptr, _sync) = buf.device_ptr(&gpu.stream);
            ptr
        };
        Ok(DeviceTensor { ptr, storage: Storage::Pool(buf), shape: shape.to_vec(), dtype })
    }

    /// A zero-filled tensor allocated with `cuMemAlloc` outside the pool, so that other GPUs
    /// can read and write it through peer access. Allocation and clearing are synchronous.
    pub fn zeros_peer_visible(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Self, CudaError> {
        let bytes = bytes_of(shape, dtype)?.max(dtype.size());
        gpu.ctx.bind_to_thread()?;
        // SAFETY: plain allocation of `bytes` bytes in the current (this GPU's) context.
        let ptr = unsafe { result::malloc_sync(bytes)? };
        let tensor = DeviceTensor {
            ptr,
            storage: Storage::Unpooled { ctx: gpu.ctx.clone(), bytes },
            shape: shape.to_vec(),
            dtype,
        };
        // SAFETY: `ptr` is the allocation of `bytes` bytes just made.
        unsafe { result::memset_d8_sync(ptr, 0, bytes)? };
        Ok(tensor)
    }

    /// Copies host bytes (already in `dtype`'s layout) into a new device tensor.
    pub fn from_bytes(gpu: &Gpu, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self, CudaError> {
        let expected = bytes_of(shape, dtype)?;
        if bytes.len() != expected {
            return Err(CudaError::Shape(format!(
                "{} bytes for shape {shape:?} of {dtype:?}, expected {expected}",
                bytes.len()
            )));
        }
        let buf = gpu.stream.clone_htod(bytes)?;
        let ptr = {
            let (ptr, _sync) = buf.device_ptr(&gpu.stream);
            ptr
        };
        Ok(DeviceTensor { ptr, storage: Storage::Pool(buf), shape: shape.to_vec(), dtype })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes allocated (at least `numel × dtype size`).
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::Pool(buf) => buf.len(),
            Storage::Unpooled { bytes, .. } => *bytes,
        }
    }

    /// The device address of the first byte, for calls outside the kernel wrappers (NCCL,
    /// copies). Reading it grants nothing: views are made only through [`DeviceTensor::r`].
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// A view of the whole tensor.
    pub fn r(&self) -> TensorRef {
        TensorRef { ptr: self.ptr, shape: self.shape.clone(), dtype: self.dtype }
    }

    /// Rows `start..start+len` of a tensor whose first dimension is rows.
    pub fn rows(&self, start: usize, len: usize) -> Result<TensorRef, CudaError> {
        self.r().rows(start, len)
    }

    /// Copies `host` into the start of this tensor (must fit).
    pub fn upload<T: cudarc::driver::DeviceRepr>(&mut self, gpu: &Gpu, host: &[T]) -> Result<(), CudaError> {
        // SAFETY: reinterpreting plain-old-data host values as bytes for the copy.
        let raw = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, std::mem::size_of_val(host)) };
        self.upload_at(gpu, 0, raw)
    }

    /// Copies host bytes into this tensor starting at byte `offset`.
    pub fn upload_at(&mut self, gpu: &Gpu, offset: usize, bytes: &[u8]) -> Result<(), CudaError> {
        let end = offset.checked_add(bytes.len()).filter(|&e| e <= self.bytes()).ok_or_else(|| {
            CudaError::Shape(format!("upload of {} bytes at {offset} into a buffer of {}", bytes.len(), self.bytes()))
        })?;
        match &mut self.storage {
            Storage::Pool(buf) => {
                let mut view = buf.slice_mut(offset..end);
                gpu.stream.memcpy_htod(bytes, &mut view)?;
            }
            Storage::Unpooled { ctx, .. } => {
                // Ordered after the stream's work, then a synchronous copy in this context.
                gpu.stream.synchronize()?;
                ctx.bind_to_thread()?;
                // SAFETY: `offset..end` lies inside this live allocation (checked above).
                unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, bytes)? };
            }
        }
        Ok(())
    }

    /// Copies `len` bytes inside this buffer from byte `src` to byte `dst` (non-overlapping).
    pub fn copy_within(&self, gpu: &Gpu, src: usize, dst: usize, len: usize) -> Result<(), CudaError> {
        let fits = |o: usize| o.checked_add(len).is_some_and(|e| e <= self.bytes());
        if !fits(src) || !fits(dst) || (src < dst + len && dst < src + len) {
            return Err(CudaError::Shape(format!(
                "copy of {len} bytes {src} -> {dst} in a buffer of {}",
                self.bytes()
            )));
        }
        // SAFETY: both ranges lie inside this live allocation and do not overlap; the copy is
        // ordered on the GPU's only stream.
        unsafe {
            result::memcpy_dtod_async(self.ptr + dst as u64, self.ptr + src as u64, len, gpu.stream.cu_stream())?;
        }
        Ok(())
    }

    /// The first `n` elements' bytes, after the stream's work.
    fn download_bytes(&self, gpu: &Gpu, dtype: DType, n: usize) -> Result<Vec<u8>, CudaError> {
        if self.dtype != dtype || n > self.numel() {
            return Err(CudaError::Shape(format!("download of {n} {dtype:?} from {:?} {:?}", self.dtype, self.shape)));
        }
        let len = n * dtype.size();
        match &self.storage {
            Storage::Pool(buf) => Ok(gpu.stream.clone_dtoh(&buf.slice(0..len))?),
            Storage::Unpooled { ctx, .. } => {
                gpu.stream.synchronize()?;
                ctx.bind_to_thread()?;
                let mut host = vec![0u8; len];
                // SAFETY: `len` bytes lie inside this live allocation (n <= numel).
                unsafe { result::memcpy_dtoh_sync(&mut host, self.ptr)? };
                Ok(host)
            }
        }
    }

    /// Copies the first `n` elements to the host.
    pub fn download_f32(&self, gpu: &Gpu, n: usize) -> Result<Vec<f32>, CudaError> {
        let bytes = self.download_bytes(gpu, DType::F32, n)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn download_u32(&self, gpu: &Gpu, n: usize) -> Result<Vec<u32>, CudaError> {
        let bytes = self.download_bytes(gpu, DType::U32, n)?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn download_i32(&self, gpu: &Gpu, n: usize) -> Result<Vec<i32>, CudaError> {
        let bytes = self.download_bytes(gpu, DType::I32, n)?;
        Ok(bytes.chunks_exact(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// The first `n` bf16 elements, widened to f32.
    pub fn download_bf16(&self, gpu: &Gpu, n: usize) -> Result<Vec<f32>, CudaError> {
        let bytes = self.download_bytes(gpu, DType::BF16, n)?;
        Ok(bytes.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]])).to_f32()).collect())
    }
}

impl Drop for DeviceTensor {
    fn drop(&mut self) {
        if let Storage::Unpooled { ctx, .. } = &self.storage {
            // SAFETY: allocated by cuMemAlloc in `ctx` and freed once; its owners synchronise
            // (and drop graphs that use it) before dropping their buffers.
            let freed = ctx
                .bind_to_thread()
                .map_err(CudaError::from)
                .and_then(|_| unsafe { result::free_sync(self.ptr).map_err(CudaError::from) });
            if let Err(e) = freed {
                tracing::warn!(error = %e, "freeing peer-visible device memory failed");
            }
        }
    }
}

/// A view of device memory: address, shape, element type, made only from a [`DeviceTensor`]
/// and its checked sub-views, so its extent always lies inside the tensor it came from. Used
/// within the forward pass of the runner that owns the tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    ptr: u64,
    shape: Vec<usize>,
    dtype: DType,
}

impl TensorRef {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `numel × dtype size`.
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// The device address, for calls outside the kernel wrappers (cuBLAS, NCCL, copies).
    pub fn addr(&self) -> u64 {
        self.ptr
    }

    /// The address as a kernel argument (the launch builder keeps a reference until launch).
    pub(crate) fn arg(&self) -> &u64 {
        &self.ptr
    }

    /// Rows `start..start+len` of a view whose first dimension is rows.
    pub fn rows(&self, start: usize, len: usize) -> Result<TensorRef, CudaError> {
        let Some(&rows) = self.shape.first() else {
            return Err(CudaError::Shape("rows of a scalar view".into()));
        };
        if start.checked_add(len).is_none_or(|end| end > rows) {
            return Err(CudaError::Shape(format!("rows {start}..{} of {:?}", start.saturating_add(len), self.shape)));
        }
        let row_bytes: usize = self.shape[1..].iter().product::<usize>() * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[0] = len;
        Ok(TensorRef { ptr: self.ptr + (start * row_bytes) as u64, shape, dtype: self.dtype })
    }

    /// Elements `start..start+len` of the view, flattened, as a vector.
    pub fn slice(&self, start: usize, len: usize) -> Result<TensorRef, CudaError> {
        if start.checked_add(len).is_none_or(|end| end > self.numel()) {
            return Err(CudaError::Shape(format!(
                "elements {start}..{} of {:?}",
                start.saturating_add(len),
                self.shape
            )));
        }
        Ok(TensorRef { ptr: self.ptr + (start * self.dtype.size()) as u64, shape: vec![len], dtype: self.dtype })
    }

    /// The same memory seen with another shape of at most as many elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<TensorRef, CudaError> {
        if shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).is_none_or(|n| n > self.numel()) {
            return Err(CudaError::Shape(format!("reshape of {:?} to {shape:?}", self.shape)));
        }
        Ok(TensorRef { ptr: self.ptr, shape: shape.to_vec(), dtype: self.dtype })
    }

    /// Bytes `offset..` of the view seen as `shape` of `dtype` (packed buffers of mixed
    /// types); `offset` must be a multiple of `dtype`'s size.
    pub fn view_bytes(&self, offset: usize, shape: &[usize], dtype: DType) -> Result<TensorRef, CudaError> {
        let fits =
            bytes_of(shape, dtype).ok().and_then(|b| offset.checked_add(b)).is_some_and(|end| end <= self.bytes());
        if !fits || !offset.is_multiple_of(dtype.size()) {
            return Err(CudaError::Shape(format!(
                "{shape:?} of {dtype:?} at byte {offset} of {:?} {:?}",
                self.shape, self.dtype
            )));
        }
        Ok(TensorRef { ptr: self.ptr + offset as u64, shape: shape.to_vec(), dtype })
    }
}

/// A GPU ready for work: context, one stream, cuBLAS and the kernels.
pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub kernels: Kernels,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors (sizes grids that must fit the GPU at once).
    pub sm_count: usize,
    _blas_workspace: CudaSlice<u8>,
}

/// cuBLAS workspace (as PyTorch sizes it for Hopper).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("ordinal", &self.ordinal).field("name", &self.name).finish()
    }
}

impl Gpu {
    /// Opens GPU `ordinal`: loads the driver, cuBLAS and the embedded kernels.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        // cudarc panics when it cannot open cuBLAS: ask under its names first.
        Search::System.open(NvLib::Cublas)?;
        let ctx = CudaContext::new(ordinal)?;
        // One stream, pointers managed by us: event tracking would insert waits that break
        // graph capture and cost time on every launch.
        // SAFETY: all work of this context goes to one stream, so no cross-stream hazards exist.
        unsafe { ctx.disable_event_tracking() };
        // A real stream, not the legacy default one: only real streams can be captured into graphs.
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let kernels = Kernels::load(&ctx)?;
        let name = ctx.name()?;
        let compute_capability = ctx.compute_capability()?;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            .max(1) as usize;
        // cuBLAS must not allocate while a graph is being captured: give it a fixed workspace.
        let blas_workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)?;
        {
            let (ptr, _sync) = blas_workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both owned by this Gpu).
            let status = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE_BYTES,
                )
            };
            status.result()?;
        }
        Ok(Gpu {
            ordinal,
            ctx,
            stream,
            blas,
            kernels,
            name,
            compute_capability,
            sm_count,
            _blas_workspace: blas_workspace,
        })
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.ctx.mem_get_info()?)
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of a tensor that was never allocated: the checks are host arithmetic.
    fn view(shape: &[usize], dtype: DType) -> TensorRef {
        TensorRef { ptr: 0x1000, shape: shape.to_vec(), dtype }
    }

    /// llmd-nvlib answers "can cudarc open it" only while its names are the linked cudarc's,
    /// in the same order (see llmd-nvlib's crate doc).
    #[test]
    fn nvlib_tries_the_names_cudarc_tries() {
        let mut driver = cudarc::get_lib_name_candidates("cuda");
        driver.extend(cudarc::get_lib_name_candidates("nvcuda"));
        assert_eq!(NvLib::Driver.candidates(), driver);
        assert_eq!(NvLib::Cublas.candidates(), cudarc::get_lib_name_candidates("cublas"));
        assert_eq!(NvLib::CublasLt.candidates(), cudarc::get_lib_name_candidates("cublasLt"));
        assert_eq!(NvLib::Nvrtc.candidates(), cudarc::get_lib_name_candidates("nvrtc"));
    }

    #[test]
    fn rows_stay_inside_the_view() {
        let t = view(&[8, 4], DType::BF16);
        let r = t.rows(2, 3).unwrap();
        assert_eq!((r.addr(), r.shape(), r.dtype()), (0x1000 + 2 * 8, &[3, 4][..], DType::BF16));
        assert_eq!(t.rows(8, 0).unwrap().numel(), 0);
        assert!(t.rows(6, 3).unwrap_err().to_string().contains("rows 6..9 of [8, 4]"));
        assert!(t.rows(usize::MAX, 2).is_err());
        assert!(view(&[], DType::F32).rows(0, 1).is_err());
    }

    #[test]
    fn reshape_slice_and_byte_views_are_checked() {
        let t = view(&[4, 6], DType::F32);
        assert_eq!(t.reshape(&[2, 12]).unwrap().shape(), [2, 12]);
        assert_eq!(t.reshape(&[5]).unwrap().numel(), 5);
        assert!(t.reshape(&[5, 5]).is_err());
        assert!(t.reshape(&[usize::MAX, 2]).is_err());
        let s = t.slice(20, 4).unwrap();
        assert_eq!((s.addr(), s.shape()), (0x1000 + 80, &[4][..]));
        assert!(t.slice(21, 4).is_err());
        let b = t.view_bytes(16, &[2], DType::I64).unwrap();
        assert_eq!((b.addr(), b.dtype(), b.bytes()), (0x1000 + 16, DType::I64, 16));
        assert!(t.view_bytes(12, &[1], DType::I64).is_err(), "misaligned");
        assert!(t.view_bytes(88, &[2], DType::I64).is_err(), "past the end");
    }
}
