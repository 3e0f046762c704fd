//! The doctor's NCCL all-reduce: what the `check_nccl` scripts and nccl-tests'
//! `all_reduce_perf` do, in-process over all GPUs.
//!
//! Each rank fills a buffer with `rank + 1`; after a sum all-reduce every element must equal
//! `n(n+1)/2` (exact in f32 for any realistic GPU count). Bus bandwidth follows nccl-tests:
//! `busbw = algbw × 2(n−1)/n`, where `algbw = bytes / time`.
//!
//! NCCL is opened through llmd-nvlib, as the engine opens it for tensor parallelism
//! (`libnccl.so.2` first), so the check finds what serving finds; its version is reported. The
//! all-reduce itself needs the crate's `cuda` feature (cudarc for contexts, streams and memory,
//! opening libcuda at run time under the names llmd-nvlib checks first); without it the check
//! reports the NCCL it found and that the build has no CUDA support.

use llmd_nvlib::nccl::Nccl;
use llmd_nvlib::{NvLib, Search};

/// Per-GPU buffer size: large enough to reach near-peak bus bandwidth on NVLink, small enough
/// to fit next to a loaded model (send + receive = 2 × this).
pub const NCCL_BYTES: usize = 128 << 20;

/// Timed iterations after one warm-up.
pub const NCCL_ITERS: u32 = 5;

/// Result of the NCCL all-reduce probe.
#[derive(Debug, Clone, PartialEq)]
pub enum NcclOutcome {
    /// The probe cannot run here (libnccl or libcuda missing, built without CUDA); the reason,
    /// naming the library files tried or the NCCL found.
    Unsupported(String),
    /// The all-reduce ran.
    Ran(NcclRun),
    /// NCCL or CUDA returned an error.
    Failed(String),
}

/// Measurements of one NCCL all-reduce run.
#[derive(Debug, Clone, PartialEq)]
pub struct NcclRun {
    /// The NCCL that ran it: "NCCL 2.21.5 (libnccl.so.2)".
    pub nccl: String,
    /// GPUs that took part.
    pub gpus: Vec<u32>,
    /// Buffer size per GPU in bytes.
    pub bytes: u64,
    /// Whether every element came back equal to the expected sum.
    pub correct: bool,
    /// On a wrong sum: what was expected and what came back.
    pub mismatch: Option<String>,
    /// Algorithm bandwidth, bytes / time, in GB/s.
    pub alg_bw_gbps: f64,
    /// Bus bandwidth as nccl-tests reports it: alg_bw × 2(n−1)/n, in GB/s.
    pub bus_bw_gbps: f64,
}

/// nccl-tests' bus bandwidth factor for all-reduce over `n` ranks.
pub fn bus_bw_factor(n: usize) -> f64 {
    if n == 0 { 0.0 } else { 2.0 * (n as f64 - 1.0) / n as f64 }
}

/// The value every element must hold after summing `rank + 1` over `n` ranks.
pub fn expected_sum(n: usize) -> f32 {
    (n * (n + 1) / 2) as f32
}

/// Runs the all-reduce over `gpus` (NVML indices, which equal CUDA ordinals when
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`, as the daemon sets it), with the libraries the system's
/// dynamic linker finds. Blocking: takes about a second.
pub fn all_reduce_check(gpus: &[u32]) -> NcclOutcome {
    all_reduce_check_in(&Search::System, gpus)
}

/// [`all_reduce_check`] with NCCL, and the libcuda presence check, looked up through `search`
/// (the contexts themselves come from cudarc, which searches the system).
pub fn all_reduce_check_in(search: &Search, gpus: &[u32]) -> NcclOutcome {
    let nccl = match Nccl::load(search) {
        Ok(nccl) => nccl,
        Err(e) => return NcclOutcome::Unsupported(format!("{e}; {}", NvLib::Nccl.install_hint())),
    };
    let found = format!("NCCL {} ({})", nccl.version(), nccl.file());
    // cudarc panics when it cannot open libcuda: ask under the same names first.
    if let Err(e) = search.open(NvLib::Driver) {
        return NcclOutcome::Unsupported(format!("{found} found, but {e}"));
    }
    imp::run(&nccl, found, gpus)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use llmd_nvlib::nccl::Nccl;

    use super::NcclOutcome;

    pub(super) fn run(_nccl: &Nccl, found: String, _gpus: &[u32]) -> NcclOutcome {
        NcclOutcome::Unsupported(format!(
            "{found} found, but this llmd was built without CUDA support (the `cuda` feature)"
        ))
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::sync::Arc;
    use std::time::Instant;

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
    use llmd_nvlib::nccl::{DataType, Nccl, NcclError};

    use super::{NCCL_BYTES, NCCL_ITERS, NcclOutcome, NcclRun, bus_bw_factor, expected_sum};

    pub(super) fn run(nccl: &Nccl, found: String, gpus: &[u32]) -> NcclOutcome {
        // A doctor check must never take the daemon down: a panic inside cudarc is caught.
        let gpus = gpus.to_vec();
        let nccl = nccl.clone();
        match std::panic::catch_unwind(move || measure(&nccl, found, &gpus)) {
            Ok(Ok(run)) => NcclOutcome::Ran(run),
            Ok(Err(e)) => NcclOutcome::Failed(e),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                NcclOutcome::Failed(format!("CUDA/NCCL library error: {msg}"))
            }
        }
    }

    fn measure(nccl: &Nccl, found: String, gpus: &[u32]) -> Result<NcclRun, String> {
        let n = gpus.len();
        let elems = NCCL_BYTES / std::mem::size_of::<f32>();
        let streams: Vec<Arc<CudaStream>> = gpus
            .iter()
            .map(|&g| {
                let ctx =
                    CudaContext::new(g as usize).map_err(|e| format!("GPU {g}: cannot create a CUDA context: {e}"))?;
                ctx.new_stream().map_err(|e| format!("GPU {g}: cannot create a stream: {e}"))
            })
            .collect::<Result<_, String>>()?;
        let ordinals: Vec<usize> = gpus.iter().map(|&g| g as usize).collect();
        let comms = nccl.comm_init_all(&ordinals).map_err(|e| e.to_string())?;
        let mut sends: Vec<CudaSlice<f32>> = Vec::with_capacity(n);
        let mut recvs: Vec<CudaSlice<f32>> = Vec::with_capacity(n);
        for (rank, stream) in streams.iter().enumerate() {
            let host = vec![(rank + 1) as f32; elems];
            let oom = |e| format!("GPU {}: cannot allocate {} MiB: {e}", gpus[rank], NCCL_BYTES >> 20);
            sends.push(stream.clone_htod(&host).map_err(oom)?);
            recvs.push(stream.alloc_zeros::<f32>(elems).map_err(oom)?);
        }
        let launch = || -> Result<(), String> {
            // One thread drives every GPU, so the per-rank calls are grouped.
            nccl.group(|| {
                for (((comm, send), recv), stream) in comms.iter().zip(&sends).zip(&recvs).zip(&streams) {
                    let (src, _src_done) = send.device_ptr(stream);
                    let (dst, _dst_done) = recv.device_ptr(stream);
                    // SAFETY: `src` and `dst` are live allocations of `elems` f32 on the rank's GPU,
                    // kept until the stream is synchronised below; the stream belongs to that GPU.
                    unsafe { comm.all_reduce_sum(src, dst, elems, DataType::F32, stream.cu_stream() as *mut _) }?;
                }
                Ok::<_, NcclError>(())
            })
            .map_err(|e| e.to_string())?;
            for (stream, g) in streams.iter().zip(gpus) {
                stream.synchronize().map_err(|e| format!("GPU {g}: {e}"))?;
            }
            Ok(())
        };
        // Warm-up: NCCL sets up its channels on the first collective.
        launch()?;
        let started = Instant::now();
        for _ in 0..NCCL_ITERS {
            launch()?;
        }
        let secs = started.elapsed().as_secs_f64() / f64::from(NCCL_ITERS);
        let expected = expected_sum(n);
        let mut mismatch = None;
        for (rank, (stream, recv)) in streams.iter().zip(&recvs).enumerate() {
            let got = stream.clone_dtoh(recv).map_err(|e| format!("GPU {}: copy back: {e}", gpus[rank]))?;
            if let Some((i, v)) = got.iter().enumerate().find(|(_, v)| **v != expected) {
                mismatch = Some(format!("GPU {} element {i}: expected {expected}, got {v}", gpus[rank]));
                break;
            }
        }
        drop(comms);
        let alg_bw_gbps = NCCL_BYTES as f64 / secs / 1e9;
        Ok(NcclRun {
            nccl: found,
            gpus: gpus.to_vec(),
            bytes: NCCL_BYTES as u64,
            correct: mismatch.is_none(),
            mismatch,
            alg_bw_gbps,
            bus_bw_gbps: alg_bw_gbps * bus_bw_factor(n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_bandwidth_factor_matches_nccl_tests() {
        assert_eq!(bus_bw_factor(2), 1.0);
        assert_eq!(bus_bw_factor(8), 1.75);
        assert_eq!(bus_bw_factor(0), 0.0);
    }

    #[test]
    fn expected_sums() {
        assert_eq!(expected_sum(2), 3.0);
        assert_eq!(expected_sum(8), 36.0);
    }

    use llmd_nvlib::fake::build_fake_nccl;
    use llmd_nvlib::nccl::Version;

    fn unsupported(outcome: NcclOutcome) -> String {
        match outcome {
            NcclOutcome::Unsupported(reason) => reason,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    /// On a host with only `libnccl.so.2` (what the libnccl2 package installs), the check finds
    /// it and names its version. The directory holds no libcuda, so the check stops there, in
    /// both builds (with `cuda`, cudarc is never reached).
    #[test]
    fn finds_libnccl_so_2_and_reports_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let lib = build_fake_nccl(dir.path(), "libnccl.so.2", Version { major: 2, minor: 21, patch: 5 }).unwrap();
        let reason = unsupported(all_reduce_check_in(&Search::Dirs(vec![dir.path().to_path_buf()]), &[0, 1]));
        let found = format!("NCCL 2.21.5 ({}) found, but the CUDA driver library could not be loaded", lib.display());
        assert!(reason.starts_with(&found), "{reason}");
    }

    /// The real thing on a GPU host with NCCL reachable by the dynamic linker (run by hand:
    /// `cargo test -p llmd-telemetry --features cuda -- --ignored all_reduce_on_gpu_0`).
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a GPU and NCCL"]
    fn all_reduce_on_gpu_0() {
        match all_reduce_check(&[0]) {
            NcclOutcome::Ran(run) => {
                assert!(run.correct, "{run:?}");
                assert!(run.nccl.starts_with("NCCL 2."), "{}", run.nccl);
                assert!(run.alg_bw_gbps > 0.0, "{run:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_libnccl_the_check_names_libnccl_so_2() {
        let dir = tempfile::tempdir().unwrap();
        let reason = unsupported(all_reduce_check_in(&Search::Dirs(vec![dir.path().to_path_buf()]), &[0, 1]));
        assert!(reason.starts_with("NCCL could not be loaded (tried "), "{reason}");
        assert!(reason.contains(&format!("{}/libnccl.so.2", dir.path().display())), "{reason}");
        assert!(reason.ends_with("install NCCL 2 (package libnccl2, or pip nvidia-nccl-cu13)"), "{reason}");
    }
}
