//! The CUDA backend of the llmd engine. It drives the GPU through cudarc directly — kernels of
//! our own compiled by nvcc at build time and embedded in the binary, GEMMs through cuBLAS —
//! and loads every NVIDIA library at run time (cudarc `dynamic-loading`), so one binary runs on
//! hosts with and without GPUs. candle's CUDA device is not used: its `cuda` feature forces
//! cudarc `dynamic-linking` (a hard link-time dependency on libcuda) and its tensor-per-op
//! model cannot be captured as a CUDA graph with static buffers, which decode speed needs.
//!
//! The entry point is [`runner::load_cuda`], which returns a
//! [`llmd_models::runner::ModelRunner`] the serving core drives exactly like the CPU one.

pub mod allreduce;
pub mod device;
pub mod error;
pub mod kernel_checks;
pub mod kernels;
pub mod moe;
pub mod nccl;
pub mod prefill_attention;
pub mod runner;
pub mod tp;

pub use device::{Gpu, device_count, driver_present};
pub use error::CudaError;
pub use runner::{
    CudaLoadConfig, CudaRunner, Shard, check_model, load_cuda, load_cuda_runner,
};
