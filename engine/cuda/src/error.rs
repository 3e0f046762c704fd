//! Errors of the CUDA backend.

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// An NVIDIA library did not open (the message names every file tried).
    #[error(transparent)]
    Library(#[from] llmd_nvlib::LoadError),
    #[error("GPU {ordinal} does not exist ({count} visible)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("this llmd was built without CUDA kernels (nvcc was not found at build time)")]
    NoKernels,
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    #[error("NCCL: {0}")]
    Nccl(#[from] llmd_nvlib::nccl::NcclError),
    #[error("shape error: {0}")]
    Shape(String),
    #[error("unsupported model for the CUDA backend: {0}")]
    Unsupported(String),
    #[error("not enough GPU memory: {0}")]
    OutOfMemory(String),
    #[error(transparent)]
    Model(#[from] llmd_models::ModelError),
}

impl From<CudaError> for llmd_models::ModelError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Model(m) => m,
            CudaError::OutOfMemory(m) => llmd_models::ModelError::InsufficientMemory(m),
            other => llmd_models::ModelError::Backend(other.to_string()),
        }
    }
}
