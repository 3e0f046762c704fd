//! One GPU: its context, the stream everything runs on, the cuBLAS handle, the loaded kernel
//! module, and device buffers addressed by raw pointers (so the decode step can be captured
//! as a CUDA graph with static addresses).

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use crate::error::CudaError;
use crate::kernels::Kernels;

/// Whether the CUDA driver library can be loaded on this host. Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded on this host. Never panics.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen libcublas.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Number of CUDA devices, or why none can be used (no driver, no GPU, init error).
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
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

/// A device allocation with a shape. Buffers are allocated once and addressed by pointer;
/// `TensorRef`s handed to kernels borrow them for the duration of one launch sequence.
#[derive(Debug)]
pub struct DeviceTensor {
    buf: CudaSlice<u8>,
    ptr: u64,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl DeviceTensor {
    pub fn zeros(gpu: &Gpu, shape: &[usize], dtype: DType) -> Result<Self, CudaError> {
        let bytes = shape.iter().product::<usize>().max(1) * dtype.size();
        let buf = gpu.stream.alloc_zeros::<u8>(bytes)?;
        let ptr = {
            let (ptr, _sync) = buf.device_ptr(&gpu.stream);
            ptr
        };
        Ok(DeviceTensor { ptr, buf, shape: shape.to_vec(), dtype })
    }

    /// Copies host bytes (already in `dtype`'s layout) into a new device tensor.
    pub fn from_bytes(gpu: &Gpu, bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self, CudaError> {
        let expected = shape.iter().product::<usize>() * dtype.size();
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
        Ok(DeviceTensor { ptr, buf, shape: shape.to_vec(), dtype })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn r(&self) -> TensorRef {
        TensorRef { ptr: self.ptr, shape: self.shape.clone(), dtype: self.dtype }
    }

    /// Rows `start..start+len` of a tensor whose first dimension is rows.
    pub fn rows(&self, start: usize, len: usize) -> TensorRef {
        self.r().rows(start, len)
    }

    /// Copies `host` into the start of this tensor (must fit; same element type size).
    pub fn upload<T: cudarc::driver::DeviceRepr>(&mut self, gpu: &Gpu, host: &[T]) -> Result<(), CudaError> {
        let bytes = std::mem::size_of_val(host);
        if bytes > self.buf.len() {
            return Err(CudaError::Shape(format!("upload of {bytes} bytes into a buffer of {}", self.buf.len())));
        }
        // SAFETY: reinterpreting plain-old-data host values as bytes for the copy.
        let raw = unsafe { std::slice::from_raw_parts(host.as_ptr() as *const u8, bytes) };
        let mut view = self.buf.slice_mut(0..bytes);
        gpu.stream.memcpy_htod(raw, &mut view)?;
        Ok(())
    }

    /// Copies host bytes into this tensor starting at byte `offset`.
    pub fn upload_at(&mut self, gpu: &Gpu, offset: usize, bytes: &[u8]) -> Result<(), CudaError> {
        let end = offset.checked_add(bytes.len()).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            CudaError::Shape(format!("upload of {} bytes at {offset} into a buffer of {}", bytes.len(), self.buf.len()))
        })?;
        let mut view = self.buf.slice_mut(offset..end);
        gpu.stream.memcpy_htod(bytes, &mut view)?;
        Ok(())
    }

    /// Copies `len` bytes inside this buffer from byte `src` to byte `dst` (non-overlapping).
    pub fn copy_within(&self, gpu: &Gpu, src: usize, dst: usize, len: usize) -> Result<(), CudaError> {
        let fits = |o: usize| o.checked_add(len).is_some_and(|e| e <= self.buf.len());
        if !fits(src) || !fits(dst) || (src < dst + len && dst < src + len) {
            return Err(CudaError::Shape(format!(
                "copy of {len} bytes {src} -> {dst} in a buffer of {}",
                self.buf.len()
            )));
        }
        // SAFETY: both ranges lie inside this live allocation and do not overlap; the copy is
        // ordered on the GPU's only stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                self.ptr + dst as u64,
                self.ptr + src as u64,
                len,
                gpu.stream.cu_stream(),
            )?;
        }
        Ok(())
    }

    /// Copies the first `n` elements to the host.
    pub fn download_f32(&self, gpu: &Gpu, n: usize) -> Result<Vec<f32>, CudaError> {
        if self.dtype != DType::F32 || n > self.numel() {
            return Err(CudaError::Shape(format!("download of {n} f32 from {:?} {:?}", self.dtype, self.shape)));
        }
        let bytes = gpu.stream.clone_dtoh(&self.buf.slice(0..n * 4))?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn download_u32(&self, gpu: &Gpu, n: usize) -> Result<Vec<u32>, CudaError> {
        if self.dtype != DType::U32 || n > self.numel() {
            return Err(CudaError::Shape(format!("download of {n} u32 from {:?} {:?}", self.dtype, self.shape)));
        }
        let bytes = gpu.stream.clone_dtoh(&self.buf.slice(0..n * 4))?;
        Ok(bytes.chunks_exact(4).map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

/// A non-owning description of device memory: pointer, shape, element type. Created from a
/// live [`DeviceTensor`] and used within the forward pass that owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    pub ptr: u64,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl TensorRef {
    pub fn rows(&self, start: usize, len: usize) -> TensorRef {
        let row_elems: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = len;
        TensorRef { ptr: self.ptr + (start * row_elems * self.dtype.size()) as u64, shape, dtype: self.dtype }
    }

    /// Same memory seen with another shape of the same element count (or fewer elements).
    pub fn reshape(&self, shape: &[usize]) -> TensorRef {
        debug_assert!(shape.iter().product::<usize>() <= self.shape.iter().product::<usize>());
        TensorRef { ptr: self.ptr, shape: shape.to_vec(), dtype: self.dtype }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
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
        if !cublas_present() {
            return Err(CudaError::MissingLibrary("libcublas.so (CUDA 13 cuBLAS)"));
        }
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
