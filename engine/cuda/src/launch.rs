//! The ground floor of every launch wrapper: shape checks, launch configurations, integer
//! conversions for kernel arguments, and the [`launch!`] macro.

use cudarc::driver::LaunchConfig;

use crate::device::{DType, TensorRef};
use crate::error::CudaError;

/// Whether `t` is `dtype` of exactly `shape`; the error names the argument.
pub(crate) fn check(t: &TensorRef, name: &str, dtype: DType, shape: &[usize]) -> Result<(), CudaError> {
    if t.dtype() != dtype || t.shape() != shape {
        return Err(CudaError::Shape(format!(
            "`{name}` is {:?} {:?}, expected {dtype:?} {shape:?}",
            t.dtype(),
            t.shape()
        )));
    }
    Ok(())
}

/// A 1-D block of `block` threads over `grid`, no dynamic shared memory.
pub(crate) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// `v` as a kernel's `int` argument, or an error naming `what`.
pub(crate) fn i32_of(v: usize, what: &str) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::Shape(format!("{what} = {v} exceeds i32")))
}

/// `v` as a kernel's `unsigned` argument (or grid size), or an error naming `what`.
pub(crate) fn u32_of(v: usize, what: &str) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::Shape(format!("{what} = {v} exceeds u32")))
}

/// Builds and launches a kernel with the given arguments in order.
macro_rules! launch {
    ($gpu:expr, $f:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut builder = $gpu.stream.launch_builder($f);
        $( builder.arg($arg); )*
        // SAFETY: every wrapper checked the shapes of the buffers it passes against the kernel's
        // documented contract; pointers come from views of live allocations of this context.
        unsafe { builder.launch($cfg) }.map(|_| ()).map_err($crate::error::CudaError::from)
    }};
}
pub(crate) use launch;
