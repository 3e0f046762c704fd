//! Tensor parallelism on one host: one thread per GPU, each owning one rank's
//! [`CudaRunner`](crate::runner::CudaRunner) with its NCCL communicator, driven in lockstep by
//! [`TpRunner`], which the serving core sees as a single [`ModelRunner`].
//!
//! Every step is sent to all ranks; each runs the same forward (decode steps as CUDA graphs
//! with the NCCL calls captured inside) and rank 0's output is returned. All ranks hold the same
//! number of KV blocks, the minimum their free memory allows, so one block manager serves all.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use llmd_models::ModelError;
use llmd_models::config::ModelConfig;
use llmd_models::runner::{ForwardBatch, KvCacheLayout, ModelRunner, RowOutput, RowRequest, StepLogits};

use crate::allreduce::PeerBuffers;
use crate::error::CudaError;
use crate::runner::{CudaLoadConfig, load_rank};
use crate::shard::Shard;

enum Job {
    /// Every rank opened its GPU: join the NCCL communicator and load the weights.
    Join,
    AllocKv(usize),
    /// Enable peer access to every rank for the peer all-reduce.
    ConnectPeers(Arc<Vec<PeerBuffers>>),
    /// Whether every rank connected: turns the peer all-reduce on, or drops it everywhere.
    UsePeerAllReduce(bool),
    /// [`CudaRunner::profile_decode`](crate::runner::CudaRunner::profile_decode) on every rank.
    Profile(Arc<ForwardBatch>, usize),
    Forward(Arc<ForwardBatch>, Arc<Vec<RowRequest>>),
    CopyBlock(u32, u32),
}

enum Reply {
    /// The rank's GPU is open (context, cuBLAS, kernels) or why not.
    Opened(Result<(), String>),
    Progress(usize, usize),
    Loaded(Result<Loaded, String>),
    Done(Result<(), String>),
    Rows(Result<Vec<RowOutput>, String>),
    Profile(Result<crate::runner::StepProfile, String>),
}

struct Loaded {
    possible_blocks: usize,
    weight_bytes: u64,
    num_params: u64,
    layout: KvCacheLayout,
    peer: Option<PeerBuffers>,
}

struct Worker {
    jobs: mpsc::Sender<Job>,
    replies: mpsc::Receiver<Reply>,
    thread: Option<JoinHandle<()>>,
}

/// A model split over several GPUs of this host.
pub struct TpRunner {
    workers: Vec<Worker>,
    gpus: Vec<usize>,
    layout: KvCacheLayout,
    weight_bytes: u64,
    num_params: u64,
    /// A forward was sent to every rank and not collected yet.
    in_flight: bool,
}

impl std::fmt::Debug for TpRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpRunner").field("gpus", &self.gpus).field("layout", &self.layout).finish()
    }
}

fn failed(rank: usize, e: impl std::fmt::Display) -> CudaError {
    CudaError::Shape(format!("tensor-parallel rank {rank}: {e}"))
}

impl TpRunner {
    /// Loads one rank per entry of `gpus` (distinct CUDA device numbers), in parallel.
    /// Progress is reported from rank 0. Any rank failing fails the load and frees every GPU.
    pub fn load(
        dir: &Path,
        cfg: &ModelConfig,
        opts: &CudaLoadConfig,
        gpus: &[usize],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<TpRunner, ModelError> {
        let world = gpus.len();
        let mut seen = gpus.to_vec();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != world {
            return Err(CudaError::Unsupported(format!("GPU list {gpus:?} repeats a GPU")).into());
        }
        let id = crate::nccl::unique_id()
            .map_err(|e| CudaError::Unsupported(format!("tensor parallelism needs NCCL: {e}")))?;
        let mut workers = Vec::with_capacity(world);
        for (rank, &ordinal) in gpus.iter().enumerate() {
            let (jobs, job_rx) = mpsc::channel::<Job>();
            let (reply_tx, replies) = mpsc::channel::<Reply>();
            let (dir, cfg, opts) = (dir.to_path_buf(), cfg.clone(), opts.clone());
            let thread = std::thread::Builder::new()
                .name(format!("llmd-tp{rank}"))
                .spawn(move || worker(rank, world, ordinal, id, &dir, &cfg, &opts, job_rx, reply_tx))
                .map_err(|e| failed(rank, e))?;
            workers.push(Worker { jobs, replies, thread: Some(thread) });
        }
        // Dropping `workers` on any error below ends every thread and frees its GPU.
        // Every rank opens its GPU before any joins NCCL: ncclCommInitRank waits for all ranks,
        // so a rank failing before it (no such GPU, no memory for a context, kernels that do not
        // load) would leave the others blocked there for good.
        for (rank, w) in workers.iter().enumerate() {
            match w.replies.recv() {
                Ok(Reply::Opened(Ok(()))) => {}
                Ok(Reply::Opened(Err(e))) => return Err(failed(rank, e).into()),
                _ => return Err(failed(rank, "worker thread exited before opening its GPU").into()),
            }
        }
        for (rank, w) in workers.iter().enumerate() {
            w.jobs.send(Job::Join).map_err(|_| failed(rank, "worker thread exited"))?;
        }
        let mut loaded = Vec::with_capacity(world);
        for (rank, w) in workers.iter().enumerate() {
            loop {
                match w.replies.recv().map_err(|_| failed(rank, "worker thread exited"))? {
                    Reply::Progress(done, total) => progress(done, total),
                    Reply::Loaded(r) => {
                        loaded.push(r.map_err(|e| failed(rank, e))?);
                        break;
                    }
                    _ => return Err(failed(rank, "unexpected reply while loading").into()),
                }
            }
        }
        let blocks = loaded.iter().map(|l| l.possible_blocks).min().unwrap_or(0);
        all(&workers, || Job::AllocKv(blocks))?;
        let peer_all_reduce = Self::connect_peers(&workers, &loaded)?;
        tracing::info!(tp = world, peer_all_reduce, "tensor-parallel ranks ready");
        let mut layout = loaded[0].layout;
        layout.num_blocks = blocks;
        Ok(TpRunner {
            workers,
            gpus: gpus.to_vec(),
            layout,
            weight_bytes: loaded.iter().map(|l| l.weight_bytes).sum(),
            num_params: loaded[0].num_params,
            in_flight: false,
        })
    }

    /// Connects the ranks' peer all-reduce when every rank has one, and tells every rank the
    /// outcome (all must take the same path). Whether the peer path is on; a rank that cannot
    /// reach a peer only means NCCL serves every all-reduce.
    fn connect_peers(workers: &[Worker], loaded: &[Loaded]) -> Result<bool, ModelError> {
        let peers: Option<Vec<PeerBuffers>> = loaded.iter().map(|l| l.peer).collect();
        let mut ok = false;
        if let Some(peers) = peers {
            let peers = Arc::new(peers);
            for (rank, w) in workers.iter().enumerate() {
                w.jobs.send(Job::ConnectPeers(peers.clone())).map_err(|_| failed(rank, "worker thread exited"))?;
            }
            ok = true;
            for (rank, w) in workers.iter().enumerate() {
                match w.replies.recv() {
                    Ok(Reply::Done(Ok(()))) => {}
                    Ok(Reply::Done(Err(e))) => {
                        tracing::warn!(rank, error = %e, "peer all-reduce unavailable; NCCL serves every all-reduce");
                        ok = false;
                    }
                    _ => return Err(failed(rank, "no answer to the peer connection").into()),
                }
            }
        }
        all(workers, || Job::UsePeerAllReduce(ok))?;
        Ok(ok)
    }

    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Where one decode step of `batch` spends its time on rank 0, op by op, with every rank
    /// replaying its captured step in lockstep (see `CudaRunner::profile_decode`).
    pub fn profile_decode(
        &mut self,
        batch: &ForwardBatch,
        iters: usize,
    ) -> Result<crate::runner::StepProfile, ModelError> {
        let batch = Arc::new(batch.clone());
        match all(&self.workers, || Job::Profile(batch.clone(), iters))? {
            Reply::Profile(Ok(p)) => Ok(p),
            _ => Err(ModelError::Backend("tensor-parallel rank 0 gave no profile".into())),
        }
    }

    pub fn num_params(&self) -> u64 {
        self.num_params
    }
}

/// Sends `job` to every rank and returns rank 0's reply after all answered (see [`gather`]).
fn all(workers: &[Worker], job: impl Fn() -> Job) -> Result<Reply, ModelError> {
    for (rank, w) in workers.iter().enumerate() {
        w.jobs.send(job()).map_err(|_| failed(rank, "worker thread exited"))?;
    }
    gather(workers)
}

/// Takes one reply from every rank, and returns rank 0's, or the first failing rank's error once
/// all answered (so no reply is left behind for the next job).
fn gather(workers: &[Worker]) -> Result<Reply, ModelError> {
    let mut first = None;
    let mut error = None;
    for (rank, w) in workers.iter().enumerate() {
        let reply = w.replies.recv().map_err(|_| failed(rank, "worker thread exited"))?;
        let err = match &reply {
            Reply::Done(Err(e)) | Reply::Rows(Err(e)) | Reply::Profile(Err(e)) => Some(failed(rank, e)),
            _ => None,
        };
        if error.is_none() {
            error = err;
        }
        if rank == 0 {
            first = Some(reply);
        }
    }
    if let Some(e) = error {
        return Err(e.into());
    }
    first.ok_or_else(|| ModelError::Backend("no tensor-parallel ranks".into()))
}

#[allow(clippy::too_many_arguments)]
fn worker(
    rank: usize,
    world: usize,
    ordinal: usize,
    id: crate::nccl::UniqueId,
    dir: &Path,
    cfg: &ModelConfig,
    opts: &CudaLoadConfig,
    jobs: mpsc::Receiver<Job>,
    replies: mpsc::Sender<Reply>,
) {
    let mut report = |done: usize, total: usize| {
        if rank == 0 {
            let _ = replies.send(Reply::Progress(done, total));
        }
    };
    let shard = Shard { rank, world };
    let gpu = match crate::device::Gpu::open(ordinal) {
        Ok(gpu) => {
            let _ = replies.send(Reply::Opened(Ok(())));
            gpu
        }
        Err(e) => {
            let _ = replies.send(Reply::Opened(Err(e.to_string())));
            return;
        }
    };
    // Anything but Join (the channel closing: another rank failed to open) ends the thread.
    if !matches!(jobs.recv(), Ok(Job::Join)) {
        return;
    }
    let mut runner = match load_rank(dir, cfg, opts, gpu, shard, Some(id), &mut report) {
        Ok((r, possible)) => {
            let info = Loaded {
                possible_blocks: possible,
                weight_bytes: r.weight_bytes(),
                num_params: r.num_params(),
                layout: r.kv_layout(),
                peer: r.peer_buffers(),
            };
            let _ = replies.send(Reply::Loaded(Ok(info)));
            r
        }
        Err(e) => {
            let _ = replies.send(Reply::Loaded(Err(e.to_string())));
            return;
        }
    };
    while let Ok(job) = jobs.recv() {
        let reply = match job {
            Job::Join => Reply::Done(Err("already joined".into())),
            Job::AllocKv(n) => Reply::Done(runner.alloc_kv(n).map_err(|e| e.to_string())),
            Job::ConnectPeers(peers) => Reply::Done(runner.connect_peers(&peers).map_err(|e| e.to_string())),
            Job::Profile(batch, iters) => {
                Reply::Profile(runner.profile_decode(&batch, iters).map_err(|e| e.to_string()))
            }
            Job::UsePeerAllReduce(on) => {
                runner.use_peer_all_reduce(on);
                Reply::Done(Ok(()))
            }
            Job::Forward(batch, requests) => {
                Reply::Rows(runner.forward_sample(&batch, &requests).map_err(|e| e.to_string()))
            }
            Job::CopyBlock(s, d) => Reply::Done(runner.copy_block(s, d).map_err(|e| e.to_string())),
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
}

impl ModelRunner for TpRunner {
    fn kv_layout(&self) -> KvCacheLayout {
        self.layout
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<StepLogits, ModelError> {
        let rows = self.forward_sample(batch, &[])?;
        let vocab_size =
            rows.iter().find_map(|r| if let RowOutput::Logits(l) = r { Some(l.len()) } else { None }).unwrap_or(0);
        Ok(StepLogits { vocab_size, rows: RowOutput::into_logits(rows)? })
    }

    fn forward_sample(&mut self, batch: &ForwardBatch, requests: &[RowRequest]) -> Result<Vec<RowOutput>, ModelError> {
        match self.launch(batch, requests)? {
            llmd_models::runner::Launched::Ready(rows) => Ok(rows),
            llmd_models::runner::Launched::InFlight => self.collect(),
        }
    }

    /// Hands the step to every rank's thread and returns at once: the engine thread does its
    /// host work while the ranks compute. A second launch before `collect`, or a `collect`
    /// with nothing launched, is an error.
    fn launch(
        &mut self,
        batch: &ForwardBatch,
        requests: &[RowRequest],
    ) -> Result<llmd_models::runner::Launched, ModelError> {
        if self.in_flight {
            return Err(ModelError::Backend("a step was launched before the one in flight was collected".into()));
        }
        // Every rank runs the same pick on its copy of the gathered logits; rank 0 answers.
        let (batch, requests) = (Arc::new(batch.clone()), Arc::new(requests.to_vec()));
        for (rank, w) in self.workers.iter().enumerate() {
            w.jobs
                .send(Job::Forward(batch.clone(), requests.clone()))
                .map_err(|_| failed(rank, "worker thread exited"))?;
        }
        self.in_flight = true;
        Ok(llmd_models::runner::Launched::InFlight)
    }

    /// Waits for every rank's reply to the launched step (as `all` does: the first failing
    /// rank's error once all answered) and returns rank 0's rows.
    fn collect(&mut self) -> Result<Vec<RowOutput>, ModelError> {
        if !std::mem::replace(&mut self.in_flight, false) {
            return Err(ModelError::Backend("collect called with no step in flight".into()));
        }
        match gather(&self.workers)? {
            Reply::Rows(Ok(rows)) => Ok(rows),
            _ => Err(ModelError::Backend("tensor-parallel rank 0 gave no rows".into())),
        }
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), ModelError> {
        all(&self.workers, || Job::CopyBlock(src, dst)).map(|_| ())
    }

    fn device_name(&self) -> String {
        format!("cuda:{}", self.gpus.iter().map(usize::to_string).collect::<Vec<_>>().join(","))
    }
}

impl Drop for TpRunner {
    fn drop(&mut self) {
        // Closing the job channels ends the threads; join so every GPU is freed on return.
        let threads: Vec<_> = self.workers.iter_mut().filter_map(|w| w.thread.take()).collect();
        self.workers.clear();
        for t in threads {
            let _ = t.join();
        }
    }
}
