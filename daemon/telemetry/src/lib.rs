//! GPU telemetry and host checks for llmd.
//!
//! - [`Telemetry`]: NVML, loaded at run time (`libnvidia-ml.so.1`). [`Telemetry::start`] never
//!   fails: without the driver every [`GpuReport`] says why in `unavailable` and the daemon
//!   serves on the CPU. With NVML, an XID watch thread logs and counts critical XID events.
//! - [`metrics`]: the GPU gauges of `/metrics`, with dcgm-exporter's names and labels.
//! - [`doctor`]: `llmctl doctor` checks reading `/proc`, `/sys` and `/dev` through a root path,
//!   so every outcome is testable on fixture trees.
//! - [`placement`]: memory estimate and GPU choice for `llmctl load --tp N [--gpus ...]`.
//!
//! Nothing here needs a GPU to build or test. Every NVIDIA library (NVML, libcuda, NCCL) is
//! opened through llmd-nvlib, under the names the engine uses. The NCCL all-reduce itself needs
//! the `cuda` feature (cudarc for contexts and memory); without it the check reports the NCCL it
//! found.

pub mod cuda;
pub mod doctor;
pub mod metrics;
pub mod nccl;
pub mod nvml;
pub mod placement;
pub mod xid;

pub use doctor::{Caller, ConfiguredModel, DoctorConfig, DoctorContext, P2pPair, Probes, run_checks};
pub use llmd_proto::messages::GpuReport;
pub use metrics::dcgm_metrics;
pub use nvml::Telemetry;
pub use placement::{MemoryEstimate, PlacementError, estimate_memory, place, place_estimate};
pub use xid::{XidCounters, describe_xid, xid_info};
