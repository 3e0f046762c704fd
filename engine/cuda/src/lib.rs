//! The CUDA backend of the llmd engine. It drives the GPU through cudarc directly — kernels of
//! our own compiled by nvcc at build time and embedded in the binary, GEMMs through cuBLAS —
//! and opens every NVIDIA library at run time (through llmd-nvlib: NCCL there, the driver and
//! cuBLAS by cudarc under the names llmd-nvlib checks first), so one binary runs on hosts with
//! and without GPUs. candle's CUDA device is not used: its `cuda` feature forces cudarc
//! `dynamic-linking` (a hard link-time dependency on libcuda) and its tensor-per-op model cannot
//! be captured as a CUDA graph with static buffers, which decode speed needs.
//!
//! The entry point is [`load_cuda`], which returns a [`llmd_models::runner::ModelRunner`] the
//! serving core drives exactly like the CPU one.
//!
//! Modules from the ground up (each imports only those on its left or lower rows):
//!
//! | floor | modules |
//! |---|---|
//! | 1 | [`error`], [`shard`] (which slice of the model a GPU holds), [`module`] (the embedded fatbin and its kernel handles) |
//! | 2 | [`device`] (a GPU, owned tensors and their checked views) |
//! | 3 | `launch` (shape checks, launch configuration, the `launch!` macro), [`nccl`] |
//! | 4 | launch wrappers: [`kernels`] (dense ops), [`moe`], [`prefill_attention`], [`allreduce`] |
//! | 5 | [`runner`] (one GPU), then [`tp`] (several), then [`load`] (picks one) |
//! | top | `checks` (feature `checks`): GPU self-checks for the `llmd-cuda-check` binary |

pub mod allreduce;
#[cfg(feature = "checks")]
pub mod checks;
pub mod device;
pub mod error;
pub mod kernels;
pub(crate) mod launch;
pub mod load;
pub mod module;
pub mod moe;
pub mod nccl;
pub mod prefill_attention;
pub mod runner;
pub mod shard;
pub mod tp;

pub use device::{Gpu, device_count, driver_present};
pub use error::CudaError;
pub use load::load_cuda;
pub use runner::{CudaLoadConfig, CudaRunner, check_model, load_cuda_runner};
pub use shard::Shard;
