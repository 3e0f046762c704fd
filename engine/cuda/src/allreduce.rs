//! One-shot all-reduce through peer memory for tensor-parallel steps of few tokens, fused with
//! the residual add and RMSNorm that follow every all-reduce of a decoder layer
//! (`kernels/allreduce.cuh`).
//!
//! NCCL's ring all-reduce costs tens of microseconds per call for the few KiB a decode step
//! sums, twice per layer (estimated 10–20 µs inside a graph on 4× H200, see
//! bench/results/2026-11-21-h200x4-tp.md). With peer access between the ranks' contexts one
//! kernel reads every rank's rows directly, sums them in rank order (the same bits on every
//! rank), and normalises, replacing two launches. It serves steps of at most
//! [`PeerAllReduce::max_rows`] tokens on hosts where every pair of GPUs has peer access; NCCL
//! serves the rest (prefill chunks, large batches) and hosts without P2P.

use cudarc::driver::{PushKernelArg, sys};

use crate::device::{DType, DeviceTensor, Gpu, TensorRef};
use crate::error::CudaError;
use crate::launch::{cfg, check, i32_of, launch};
use crate::nccl::Communicator;
use crate::shard::Shard;

/// `AR_MAX_RANKS` in the kernel: the most ranks one call sums.
pub const MAX_RANKS: usize = 8;
/// `AR_MAX_BLOCKS` in the kernel: the most token rows one call takes (one block per row).
pub const MAX_ROWS: usize = 128;
/// Most rows the peer path takes: above, NCCL plus a separate RMSNorm is as fast or faster
/// (4× H200, hidden 8,192, in graphs: 64 rows 18.4 µs peer vs 17.4 µs NCCL alone; 128 rows
/// 33.0 vs 26.2; 1 row 7.2 vs 10.1; bench/results/2026-11-21-h200x4-tp-peer-3/allreduce.txt).
pub const PEER_MAX_ROWS: usize = 64;
/// The kernel runs one thread per 8 values of a row.
const MAX_HIDDEN: usize = 8 * 1024;

/// Which input buffer a call reduces. Three rotate so that a rank rewrites a buffer only two
/// calls after peers read it (the kernel's header explains why that makes an end barrier
/// unnecessary): the attention output, the MLP output, the embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    Attention = 0,
    Mlp = 1,
    Embedding = 2,
}

/// What the other ranks need of one rank: its context and the addresses they read and signal.
#[derive(Debug, Clone, Copy)]
pub struct PeerBuffers {
    /// `CUcontext` of the rank, as an integer so the value can cross threads.
    ctx: usize,
    device: i32,
    inputs: [u64; 3],
    flags: u64,
}

/// One rank's share of the peer all-reduce: its input buffers (read by every rank), its flag
/// area (written by every rank), and the table of every rank's addresses. Inputs and flags are
/// allocated outside cudarc's pool ([`DeviceTensor::zeros_peer_visible`]): pool memory is not
/// reachable through peer access.
pub struct PeerAllReduce {
    /// bf16 [max_rows, hidden] each, one per [`Site`].
    inputs: [DeviceTensor; 3],
    /// u32 flag words (arrival counters) the ranks signal each other through.
    flags: DeviceTensor,
    /// u64 [3 × world] input pointers (site-major), then [world] flag-area pointers.
    table: DeviceTensor,
    rank: usize,
    world: usize,
    hidden: usize,
    max_rows: usize,
    /// Set once every rank connected; until then (and when any rank failed) NCCL serves.
    ready: bool,
}

impl std::fmt::Debug for PeerAllReduce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerAllReduce")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("max_rows", &self.max_rows)
            .field("ready", &self.ready)
            .finish()
    }
}

impl PeerAllReduce {
    /// The buffers of rank `shard` for rows of `hidden` values, or `None` when the shape or the
    /// world size is outside what the kernel takes (NCCL then serves every call).
    pub fn new(gpu: &Gpu, shard: Shard, hidden: usize, max_tokens: usize) -> Result<Option<Self>, CudaError> {
        if shard.world < 2 || shard.world > MAX_RANKS || !hidden.is_multiple_of(8) || hidden > MAX_HIDDEN {
            return Ok(None);
        }
        // Every block spins until its peers arrive, so all blocks of a call must be resident at
        // once: at most one row per SM (a block has up to 1,024 threads).
        let max_rows = PEER_MAX_ROWS.min(MAX_ROWS).min(gpu.sm_count).min(max_tokens.max(1));
        let input = || DeviceTensor::zeros_peer_visible(gpu, &[max_rows, hidden], DType::BF16);
        let inputs = [input()?, input()?, input()?];
        let flags = DeviceTensor::zeros_peer_visible(gpu, &[MAX_ROWS * MAX_RANKS + MAX_ROWS], DType::U32)?;
        let table = DeviceTensor::zeros(gpu, &[4 * shard.world * 2], DType::U32)?;
        Ok(Some(PeerAllReduce {
            inputs,
            flags,
            table,
            rank: shard.rank,
            world: shard.world,
            hidden,
            max_rows,
            ready: false,
        }))
    }

    /// Most token rows one call takes.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    pub fn buffers(&self, gpu: &Gpu) -> PeerBuffers {
        PeerBuffers {
            ctx: gpu.ctx.cu_ctx() as usize,
            device: gpu.ctx.cu_device(),
            inputs: [self.inputs[0].addr(), self.inputs[1].addr(), self.inputs[2].addr()],
            flags: self.flags.addr(),
        }
    }

    /// Enables peer access from this rank's context to every other rank's and uploads their
    /// addresses. Fails when a pair of GPUs has no peer access. The caller turns the path on
    /// with [`PeerAllReduce::set_ready`] only after every rank connected.
    pub fn connect(&mut self, gpu: &Gpu, peers: &[PeerBuffers]) -> Result<(), CudaError> {
        if peers.len() != self.world {
            return Err(CudaError::Shape(format!("{} peer entries for {} ranks", peers.len(), self.world)));
        }
        gpu.ctx.bind_to_thread()?;
        for (p, peer) in peers.iter().enumerate().filter(|(p, _)| *p != self.rank) {
            let mut can = 0;
            // SAFETY: valid out-pointer and device handles from live contexts.
            unsafe { sys::cuDeviceCanAccessPeer(&mut can, gpu.ctx.cu_device(), peer.device) }.result()?;
            if can == 0 {
                return Err(CudaError::Unsupported(format!(
                    "GPU {} cannot access the memory of rank {p}'s GPU (no NVLink/PCIe peer access)",
                    gpu.ordinal
                )));
            }
            // SAFETY: the peer context is alive (its rank holds it until every rank is dropped)
            // and this thread's current context is this rank's.
            let r = unsafe { sys::cuCtxEnablePeerAccess(peer.ctx as sys::CUcontext, 0) };
            if r != sys::CUresult::CUDA_SUCCESS && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                r.result()?;
            }
        }
        let mut table = Vec::with_capacity(4 * self.world);
        for site in 0..3 {
            table.extend(peers.iter().map(|p| p.inputs[site]));
        }
        table.extend(peers.iter().map(|p| p.flags));
        self.table.upload(gpu, &table)?;
        gpu.synchronize()
    }

    pub fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }

    /// Whether this path takes a step of `t` tokens: every rank connected, at most `max_rows`.
    pub fn serves(&self, t: usize) -> bool {
        self.ready && t <= self.max_rows
    }

    /// The buffer a step of `t` tokens (one [`PeerAllReduce::serves`]) writes its `site`
    /// partial sums into.
    pub fn input(&self, site: Site, t: usize) -> Result<TensorRef, CudaError> {
        self.inputs[site as usize].rows(0, t)
    }

    /// Sums every rank's `site` rows (the first `residual.shape[0]`), then residual += sum (=
    /// sum for the embedding) and out = rmsnorm(residual) * weight.
    pub fn reduce_add_rmsnorm(
        &self,
        gpu: &Gpu,
        site: Site,
        residual: &TensorRef,
        out: &TensorRef,
        weight: &TensorRef,
        eps: f32,
    ) -> Result<(), CudaError> {
        let (t, h) = (residual.shape().first().copied().unwrap_or(0), self.hidden);
        if t == 0 || !self.serves(t) {
            return Err(CudaError::Shape(format!(
                "peer all-reduce of {t} rows (ready: {}, at most {})",
                self.ready, self.max_rows
            )));
        }
        check(residual, "residual", DType::BF16, &[t, h])?;
        check(out, "out", DType::BF16, &[t, h])?;
        check(weight, "weight", DType::BF16, &[h])?;
        // Kernel arguments into the address table (u64 [4 × world], uploaded by `connect`).
        let base = self.table.addr();
        let peer_in = base + (site as usize * self.world * 8) as u64;
        let peer_flags = base + (3 * self.world * 8) as u64;
        let own_flags = self.flags.addr();
        let (rank, world) = (i32_of(self.rank, "rank")?, i32_of(self.world, "world")?);
        let hidden = i32_of(h, "hidden")?;
        let add = i32::from(site != Site::Embedding);
        let threads = (h / 8).next_multiple_of(32) as u32;
        launch!(
            gpu,
            &gpu.kernels.allreduce,
            cfg((t as u32, 1, 1), threads),
            &peer_in,
            &peer_flags,
            &own_flags,
            &rank,
            &world,
            residual.arg(),
            out.arg(),
            weight.arg(),
            &hidden,
            &eps,
            &add
        )
    }
}

/// Microseconds per call of one all-reduce of `rows` × `hidden` bf16 values, measured inside a
/// captured graph of back-to-back calls on every rank at once (as decode steps run them).
#[derive(Debug, Clone, Copy)]
pub struct AllReduceTiming {
    pub rows: usize,
    pub bytes: usize,
    /// `ncclAllReduce` alone.
    pub nccl_us: f64,
    /// The peer kernel, residual add and RMSNorm included; `None` without peer access.
    pub peer_us: Option<f64>,
}

/// Times NCCL and the peer all-reduce on `gpus` for each row count in `rows` (rank 0's view;
/// all ranks replay together). The all-reduce term of the tensor-parallel roofline.
pub fn time_all_reduce(gpus: &[usize], hidden: usize, rows: &[usize]) -> Result<Vec<AllReduceTiming>, CudaError> {
    const CALLS: usize = 100;
    const REPLAYS: usize = 20;
    let world = gpus.len();
    if world < 2 {
        return Err(CudaError::Shape("timing an all-reduce needs at least 2 GPUs".into()));
    }
    let id = crate::nccl::unique_id()?;
    let max_rows = rows.iter().copied().max().unwrap_or(1).max(1);
    let exchange = std::sync::Mutex::new(vec![None; world]);
    let barrier = std::sync::Barrier::new(world);
    let rank_run = |rank: usize, ordinal: usize| -> Result<Vec<AllReduceTiming>, CudaError> {
        let gpu = Gpu::open(ordinal)?;
        gpu.ctx.bind_to_thread()?;
        let comm = Communicator::init(id, rank, world)?;
        let shard = Shard { rank, world };
        let mut peer = PeerAllReduce::new(&gpu, shard, hidden, max_rows)?;
        let lock = || exchange.lock().map_err(|_| CudaError::Shape("peer exchange poisoned".into()));
        if let Some(p) = &peer {
            lock()?[rank] = Some(p.buffers(&gpu));
        }
        barrier.wait();
        let peers: Option<Vec<PeerBuffers>> = lock()?.iter().copied().collect();
        let connected = match (&mut peer, peers) {
            (Some(p), Some(list)) => p.connect(&gpu, &list).is_ok(),
            _ => false,
        };
        // Every rank must take the same path: peer timing only when all connected.
        lock()?[rank] = if connected { peer.as_ref().map(|p| p.buffers(&gpu)) } else { None };
        barrier.wait();
        let all_connected = lock()?.iter().all(Option::is_some);
        barrier.wait();
        if let Some(p) = &mut peer {
            p.set_ready(all_connected);
        }
        let residual = DeviceTensor::zeros(&gpu, &[max_rows, hidden], DType::BF16)?;
        let normed = DeviceTensor::zeros(&gpu, &[max_rows, hidden], DType::BF16)?;
        let weight = DeviceTensor::zeros(&gpu, &[hidden], DType::BF16)?;
        let x = DeviceTensor::zeros(&gpu, &[max_rows, hidden], DType::BF16)?;
        let time = |calls: &dyn Fn() -> Result<(), CudaError>| -> Result<f64, CudaError> {
            calls()?;
            gpu.synchronize()?;
            let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
            gpu.stream.begin_capture(mode)?;
            let captured = (0..CALLS).try_for_each(|_| calls());
            let graph = gpu.stream.end_capture(sys::CUgraphInstantiate_flags(0))?;
            captured?;
            let graph = graph.ok_or_else(|| CudaError::Shape("all-reduce capture produced no graph".into()))?;
            graph.launch()?;
            gpu.synchronize()?;
            let t0 = std::time::Instant::now();
            for _ in 0..REPLAYS {
                graph.launch()?;
            }
            gpu.synchronize()?;
            Ok(t0.elapsed().as_secs_f64() * 1e6 / (REPLAYS * CALLS) as f64)
        };
        let mut out = Vec::new();
        for &t in rows {
            let nccl_us = time(&|| comm.all_reduce_sum(&x.rows(0, t)?, &gpu.stream))?;
            let peer_us = match peer.as_ref().filter(|p| p.serves(t)) {
                Some(p) => Some(time(&|| {
                    p.reduce_add_rmsnorm(
                        &gpu,
                        Site::Attention,
                        &residual.rows(0, t)?,
                        &normed.rows(0, t)?,
                        &weight.r(),
                        1e-5,
                    )
                })?),
                None => None,
            };
            out.push(AllReduceTiming { rows: t, bytes: t * hidden * 2, nccl_us, peer_us });
        }
        gpu.synchronize()?;
        Ok(out)
    };
    let results: Vec<Result<Vec<AllReduceTiming>, CudaError>> = std::thread::scope(|s| {
        let handles: Vec<_> =
            gpus.iter().enumerate().map(|(rank, &ordinal)| s.spawn(move || rank_run(rank, ordinal))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(CudaError::Shape("all-reduce timing thread panicked".into()))))
            .collect()
    });
    results.into_iter().next().unwrap_or_else(|| Err(CudaError::Shape("no ranks".into())))
}
