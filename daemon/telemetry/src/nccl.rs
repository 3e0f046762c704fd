//! The doctor's NCCL all-reduce: what the `check_nccl` scripts and nccl-tests'
//! `all_reduce_perf` do, in-process over all GPUs.
//!
//! Each rank fills a buffer with `rank + 1`; after a sum all-reduce every element must equal
//! `n(n+1)/2` (exact in f32 for any realistic GPU count). Bus bandwidth follows nccl-tests:
//! `busbw = algbw × 2(n−1)/n`, where `algbw = bytes / time`.
//!
//! Built only with the crate's `cuda` feature (cudarc, loading libcuda and libnccl at run
//! time); without it the check reports "built without CUDA support".

use crate::doctor::NcclOutcome;

/// Per-GPU buffer size: large enough to reach near-peak bus bandwidth on NVLink, small enough
/// to fit next to a loaded model (send + receive = 2 × this).
pub const NCCL_BYTES: usize = 128 << 20;

/// Timed iterations after one warm-up.
pub const NCCL_ITERS: u32 = 5;

/// nccl-tests' bus bandwidth factor for all-reduce over `n` ranks.
pub fn bus_bw_factor(n: usize) -> f64 {
    if n == 0 { 0.0 } else { 2.0 * (n as f64 - 1.0) / n as f64 }
}

/// The value every element must hold after summing `rank + 1` over `n` ranks.
pub fn expected_sum(n: usize) -> f32 {
    (n * (n + 1) / 2) as f32
}

/// Runs the all-reduce over `gpus` (NVML indices, which equal CUDA ordinals when
/// `CUDA_DEVICE_ORDER=PCI_BUS_ID`, as the daemon sets it). Blocking: takes about a second.
pub fn all_reduce_check(gpus: &[u32]) -> NcclOutcome {
    imp::run(gpus)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::NcclOutcome;

    pub(super) fn run(_gpus: &[u32]) -> NcclOutcome {
        NcclOutcome::Unsupported("built without CUDA support (enable the `cuda` feature)".into())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::time::Instant;

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
    use cudarc::nccl::safe::{Comm, ReduceOp};
    use std::sync::Arc;

    use super::{NCCL_BYTES, NCCL_ITERS, NcclOutcome, bus_bw_factor, expected_sum};
    use crate::doctor::NcclRun;

    pub(super) fn run(gpus: &[u32]) -> NcclOutcome {
        // cudarc panics on a missing library or symbol; a doctor check must never take the
        // daemon down, so both are checked first and any remaining panic is caught.
        // SAFETY: `is_culib_present` only tries dlopen on candidate names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return NcclOutcome::Unsupported("libcuda.so.1 not found".into());
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return NcclOutcome::Unsupported(
                "libnccl.so.2 not found: install NCCL (package libnccl2) to run this check".into(),
            );
        }
        let gpus = gpus.to_vec();
        match std::panic::catch_unwind(move || measure(&gpus)) {
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

    fn measure(gpus: &[u32]) -> Result<NcclRun, String> {
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
        let comms = Comm::from_devices(streams.clone()).map_err(|e| format!("ncclCommInitAll: {e:?}"))?;
        let mut sends: Vec<CudaSlice<f32>> = Vec::with_capacity(n);
        let mut recvs: Vec<CudaSlice<f32>> = Vec::with_capacity(n);
        for (rank, stream) in streams.iter().enumerate() {
            let host = vec![(rank + 1) as f32; elems];
            sends.push(
                stream
                    .clone_htod(&host)
                    .map_err(|e| format!("GPU {}: cannot allocate {} MiB: {e}", gpus[rank], NCCL_BYTES >> 20))?,
            );
            recvs.push(
                stream
                    .alloc_zeros::<f32>(elems)
                    .map_err(|e| format!("GPU {}: cannot allocate {} MiB: {e}", gpus[rank], NCCL_BYTES >> 20))?,
            );
        }
        let launch = |sends: &[CudaSlice<f32>], recvs: &mut [CudaSlice<f32>]| -> Result<(), String> {
            // One thread drives every GPU, so the per-rank calls must be grouped.
            cudarc::nccl::result::group_start().map_err(|e| format!("ncclGroupStart: {e:?}"))?;
            let mut first_err = None;
            for ((comm, send), recv) in comms.iter().zip(sends).zip(recvs.iter_mut()) {
                if let Err(e) = comm.all_reduce(send, recv, &ReduceOp::Sum) {
                    first_err.get_or_insert(format!("ncclAllReduce: {e:?}"));
                }
            }
            let end = cudarc::nccl::result::group_end().map_err(|e| format!("ncclGroupEnd: {e:?}"));
            if let Some(e) = first_err {
                return Err(e);
            }
            end?;
            for (stream, g) in streams.iter().zip(gpus) {
                stream.synchronize().map_err(|e| format!("GPU {g}: {e}"))?;
            }
            Ok(())
        };
        // Warm-up: NCCL sets up its channels on the first collective.
        launch(&sends, &mut recvs)?;
        let started = Instant::now();
        for _ in 0..NCCL_ITERS {
            launch(&sends, &mut recvs)?;
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
        let alg_bw_gbps = NCCL_BYTES as f64 / secs / 1e9;
        Ok(NcclRun {
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

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_cuda_the_check_is_unsupported() {
        assert_eq!(
            all_reduce_check(&[0, 1]),
            NcclOutcome::Unsupported("built without CUDA support (enable the `cuda` feature)".into())
        );
    }
}
