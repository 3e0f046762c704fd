//! NCCL for tensor parallelism inside one host: llmd-nvlib's bindings (which open
//! `libnccl.so.2`, the name cudarc's NCCL loader never tries) with the collectives typed over
//! this crate's device views, so sizes and element types are checked before NCCL sees an
//! address.

use llmd_nvlib::nccl::{DataType, Nccl};

use crate::device::{DType, TensorRef};
use crate::error::CudaError;

pub use llmd_nvlib::nccl::UniqueId;

/// The system's NCCL, opened on first use.
fn nccl() -> Result<&'static Nccl, CudaError> {
    Ok(Nccl::system()?)
}

/// Whether NCCL can be loaded on this host.
pub fn available() -> bool {
    nccl().is_ok()
}

/// A new unique id for one communicator (rank 0 makes it, every rank uses it).
pub fn unique_id() -> Result<UniqueId, CudaError> {
    Ok(nccl()?.unique_id()?)
}

/// Runs `f` inside ncclGroupStart/End, as needed when one thread initialises several ranks.
pub fn group<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    nccl()?.group(f)
}

/// One rank's communicator. Operations are enqueued on the stream given at each call.
#[derive(Debug)]
pub struct Communicator {
    inner: llmd_nvlib::nccl::Communicator,
}

/// NCCL's element type for a collective over `t` (bf16 or f32).
fn nccl_type(t: &TensorRef) -> Result<DataType, CudaError> {
    match t.dtype() {
        DType::BF16 => Ok(DataType::BF16),
        DType::F32 => Ok(DataType::F32),
        other => Err(CudaError::Shape(format!("NCCL collective on {other:?}"))),
    }
}

impl Communicator {
    /// Joins communicator `id` as `rank` of `world`. The calling thread's current CUDA
    /// context must be the rank's GPU. Blocks until all ranks joined.
    pub fn init(id: UniqueId, rank: usize, world: usize) -> Result<Communicator, CudaError> {
        Ok(Communicator { inner: nccl()?.comm_init_rank(id, rank, world)? })
    }

    pub fn rank(&self) -> usize {
        self.inner.rank()
    }

    pub fn world(&self) -> usize {
        self.inner.world()
    }

    /// In-place sum of `buf` across all ranks: bf16 or f32, any shape, on this rank's GPU.
    pub fn all_reduce_sum(&self, buf: &TensorRef, stream: &cudarc::driver::CudaStream) -> Result<(), CudaError> {
        let ty = nccl_type(buf)?;
        // SAFETY: `buf` views a live allocation of this rank's GPU holding `numel` elements of
        // `ty` (views are made only from owned tensors, within their bounds); the stream is
        // this GPU's, and the runner keeps the buffer until the stream has run the call.
        unsafe { self.inner.all_reduce_sum(buf.addr(), buf.addr(), buf.numel(), ty, stream.cu_stream() as *mut _) }?;
        Ok(())
    }

    /// out[rank · n .. (rank + 1) · n] = `input` of each rank (n = input.numel()); `out` has the
    /// same element type and room for `world` inputs.
    pub fn all_gather(
        &self,
        input: &TensorRef,
        out: &TensorRef,
        stream: &cudarc::driver::CudaStream,
    ) -> Result<(), CudaError> {
        let ty = nccl_type(input)?;
        if out.dtype() != input.dtype() || out.numel() < input.numel() * self.world() {
            return Err(CudaError::Shape(format!("all_gather of {:?} into {:?}", input.shape(), out.shape())));
        }
        // SAFETY: sizes and types checked above; both views are of live allocations on this
        // rank's GPU, kept until the stream has run the call.
        unsafe { self.inner.all_gather(input.addr(), out.addr(), input.numel(), ty, stream.cu_stream() as *mut _) }?;
        Ok(())
    }
}
