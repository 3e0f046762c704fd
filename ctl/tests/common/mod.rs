//! A fake llmd for llmctl's tests: a real Unix socket speaking the real protocol (framing and
//! messages from `llmd-proto`), answering each request with canned but realistic replies and
//! progress frames, and recording what it was asked.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llmd_proto::framing::{read_message, write_message};
use llmd_proto::*;
use tokio::net::UnixStream;

pub const LLMCTL: &str = env!("CARGO_BIN_EXE_llmctl");

pub struct FakeDaemon {
    pub socket: PathBuf,
    pub requests: Arc<Mutex<Vec<Request>>>,
    pub dir: tempfile::TempDir,
}

/// Runs `future` on a runtime of its own thread, for servers the blocking test drives.
pub fn spawn_on_thread<F: std::future::Future<Output = ()> + Send + 'static>(future: F) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("test runtime");
        rt.block_on(future);
    });
}

impl FakeDaemon {
    pub fn start() -> FakeDaemon {
        FakeDaemon::start_with_http("0.0.0.0:8000".to_string())
    }

    /// `http_listen` is what `status` reports, so `chat` can be pointed at a test server.
    pub fn start_with_http(http_listen: String) -> FakeDaemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("llmd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind fake socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        spawn_on_thread(async move {
            let listener = tokio::net::UnixListener::from_std(listener).expect("tokio listener");
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, recorded.clone(), http_listen.clone()));
            }
        });
        FakeDaemon { socket, requests, dir }
    }

    /// Runs llmctl against this daemon and waits for it.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run llmctl")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(LLMCTL);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd.env_remove("LLMD_SOCKET").env("NO_COLOR", "1").stdin(Stdio::null());
        cmd
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until the daemon has seen a request matching `pred`.
    pub fn wait_for(&self, pred: impl Fn(&Request) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.requests().iter().any(&pred) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}\nstderr: {}", stdout(out), stderr(out)))
}

const GIB: u64 = 1 << 30;

/// An hour and two minutes ago, so `ps` shows a stable uptime.
fn loaded_at() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 3725
}

pub fn running_models() -> Vec<RunningModel> {
    vec![
        RunningModel {
            name: "qwen3-8b".into(),
            source: "hf:Qwen/Qwen3-8B".into(),
            architecture: "Qwen3ForCausalLM".into(),
            params: 8_190_735_360,
            dtype: Dtype::BFloat16,
            device: Backend::Cuda,
            tp: 2,
            gpus: vec![0, 1],
            max_model_len: 40960,
            weight_bytes: 16_381_470_720,
            kv_cache_bytes: 48 * GIB,
            kv_block_size: 16,
            kv_blocks_total: 4000,
            kv_blocks_used: 1000,
            running: 3,
            waiting: 1,
            loaded_at: loaded_at(),
        },
        RunningModel {
            name: "tiny".into(),
            source: "/srv/models/tiny-llama".into(),
            architecture: "LlamaForCausalLM".into(),
            params: 1_100_048_384,
            dtype: Dtype::Float32,
            device: Backend::Cpu,
            tp: 1,
            gpus: vec![],
            max_model_len: 2048,
            weight_bytes: 4_400_193_536,
            kv_cache_bytes: GIB,
            kv_block_size: 16,
            kv_blocks_total: 512,
            kv_blocks_used: 0,
            running: 0,
            waiting: 0,
            loaded_at: loaded_at(),
        },
    ]
}

pub fn stored_models() -> Vec<StoredModel> {
    vec![
        StoredModel {
            id: "hf:Qwen/Qwen3-8B".into(),
            source: "hf".into(),
            revision: Some("b968826d9c46dd6066d109eabc6255188de91218".into()),
            path: "/var/lib/llmd/models/models--Qwen--Qwen3-8B/snapshots/b968826d9c46dd6066d109eabc6255188de91218"
                .into(),
            size_bytes: 16_388_044_423,
            architecture: Some("Qwen3ForCausalLM".into()),
            loaded: true,
        },
        StoredModel {
            id: "ms:deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B".into(),
            source: "ms".into(),
            revision: Some("master".into()),
            path: "/var/lib/llmd/models/modelscope/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B".into(),
            size_bytes: 3_554_235_024,
            architecture: Some("Qwen2ForCausalLM".into()),
            loaded: false,
        },
    ]
}

pub fn gpu_report() -> GpuReport {
    let gpu = |index: u32, used: u64, model: Option<&str>| GpuInfo {
        index,
        name: "NVIDIA H100 80GB HBM3".into(),
        uuid: format!("GPU-5b1f3c2e-0000-4000-8000-00000000000{index}"),
        pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index),
        utilization_gpu_pct: Some(if model.is_some() { 87 } else { 0 }),
        utilization_memory_pct: Some(if model.is_some() { 41 } else { 0 }),
        memory_used_bytes: used,
        memory_free_bytes: 85_520_809_984 - used,
        memory_total_bytes: 85_520_809_984,
        temperature_c: Some(if model.is_some() { 64 } else { 31 }),
        power_draw_w: Some(if model.is_some() { 412.6 } else { 71.2 }),
        power_limit_w: Some(700.0),
        sm_clock_mhz: Some(1980),
        mem_clock_mhz: Some(2619),
        persistence_mode: Some(true),
        ecc_errors_corrected: Some(0),
        ecc_errors_uncorrected: Some(0),
        throttle_reasons: if model.is_some() { vec!["sw_power_cap".into()] } else { vec![] },
        xid_errors: 0,
        total_energy_mj: Some(9_876_543_210),
        processes: model
            .map(|m| {
                vec![GpuProcess {
                    pid: 4242,
                    name: "llmd".into(),
                    used_memory_bytes: Some(used - GIB),
                    llmd_model: Some(m.into()),
                }]
            })
            .unwrap_or_default(),
    };
    GpuReport {
        unavailable: None,
        driver_version: Some("570.86.15".into()),
        cuda_driver_version: Some("12.8".into()),
        gpus: vec![gpu(0, 70 * GIB, Some("qwen3-8b")), gpu(1, 600 << 20, None)],
    }
}

pub fn doctor_report(quick: bool) -> DoctorReport {
    let check = |name: &str, status, observed: &str, fix: &str| CheckResult {
        name: name.into(),
        status,
        observed: observed.into(),
        fix: fix.into(),
    };
    let mut checks = vec![
        check("driver_loaded", CheckStatus::Pass, "NVIDIA driver 570.86.15 loaded", ""),
        check("persistence_mode", CheckStatus::Warn, "persistence mode off on GPU 1", "sudo nvidia-smi -pm 1"),
    ];
    if quick {
        checks.push(check("nccl_all_reduce", CheckStatus::Skip, "skipped by --quick", ""));
    } else {
        checks.push(check(
            "nvidia_uvm",
            CheckStatus::Fail,
            "kernel module nvidia_uvm is not loaded",
            "sudo modprobe nvidia_uvm",
        ));
    }
    DoctorReport { checks }
}

fn progress(operation: &str, model: &str, phase: &str, done: u64, total: u64, unit: ProgressUnit) -> Progress {
    Progress {
        operation: operation.into(),
        model: model.into(),
        phase: phase.into(),
        done,
        total: Some(total),
        unit,
        rate: 52_428_800.0,
        eta_secs: Some((total - done) as f64 / 52_428_800.0),
        files: vec![],
    }
}

fn download_frames(operation: &str, model: &str) -> Vec<Progress> {
    let total = 3 * GIB;
    let mut frames =
        vec![Progress { total: None, ..progress(operation, model, "resolving", 0, 0, ProgressUnit::Bytes) }];
    for step in 1..=3u64 {
        let mut p = progress(operation, model, "downloading", step * GIB, total, ProgressUnit::Bytes);
        p.files = vec![
            FileProgress {
                name: "model-00001-of-00002.safetensors".into(),
                done: (step * GIB).min(2 * GIB),
                total: Some(2 * GIB),
                rate: 31_457_280.0,
                eta_secs: Some(12.0),
            },
            FileProgress {
                name: "model-00002-of-00002.safetensors".into(),
                done: step.saturating_sub(2) * GIB,
                total: Some(GIB),
                rate: 20_971_520.0,
                eta_secs: None,
            },
        ];
        frames.push(p);
    }
    frames
}

async fn send(stream: &mut UnixStream, frame: ServerFrame) {
    let _ = write_message(stream, &frame).await;
}

fn error(code: ErrorCode, message: &str) -> Result<Reply, ControlError> {
    Err(ControlError::new(code, message))
}

async fn serve(mut stream: UnixStream, requests: Arc<Mutex<Vec<Request>>>, http_listen: String) {
    while let Ok(Some(frame)) = read_message::<_, ClientFrame>(&mut stream).await {
        let id = frame.id;
        requests.lock().unwrap().push(frame.request.clone());
        let result = match frame.request {
            Request::Hello { protocol, .. } if protocol != PROTOCOL_VERSION => {
                error(ErrorCode::VersionMismatch, "protocol mismatch")
            }
            Request::Hello { .. } => {
                Ok(Reply::Hello(Welcome { protocol: PROTOCOL_VERSION, daemon_version: "0.1.0".into() }))
            }
            Request::Status => Ok(Reply::Status(StatusInfo {
                version: "0.1.0".into(),
                protocol: PROTOCOL_VERSION,
                state: DaemonState::Ready,
                pid: 4242,
                uptime_secs: 93_784,
                http_listen: http_listen.clone(),
                socket: "/run/llmd/llmd.sock".into(),
                dbus: "system".into(),
                device: Backend::Cuda,
                models_dir: "/var/lib/llmd/models".into(),
                models_loaded: 2,
                gpus: 2,
            })),
            Request::Ps => Ok(Reply::Ps { models: running_models() }),
            Request::List => Ok(Reply::List { models: stored_models() }),
            Request::Load(p) if p.source == "hf:missing/model" => {
                error(ErrorCode::NotFound, "repository missing/model not found on https://huggingface.co")
            }
            Request::Load(p) if p.source == "slow" => {
                let frame = progress("load-slow", "slow", "loading weights", 10, 291, ProgressUnit::Tensors);
                send(&mut stream, ServerFrame::Progress { id, progress: frame }).await;
                // Hold the load open until the client goes away, as a long real load would.
                while let Ok(Some(_)) = read_message::<_, ClientFrame>(&mut stream).await {}
                return;
            }
            Request::Load(p) => {
                let op = "load-1";
                let mut frames = download_frames(op, &p.source);
                for done in [97, 194, 291] {
                    frames.push(progress(op, &p.source, "loading weights", done, 291, ProgressUnit::Tensors));
                }
                for progress in frames {
                    send(&mut stream, ServerFrame::Progress { id, progress }).await;
                }
                let mut m = running_models().remove(0);
                m.name = p.name.unwrap_or_else(|| "qwen3-8b".into());
                m.source = p.source;
                m.tp = p.tp.unwrap_or(1);
                m.gpus = p.gpus.unwrap_or_else(|| vec![0]);
                m.running = 0;
                m.waiting = 0;
                m.kv_blocks_used = 0;
                Ok(Reply::Loaded(m))
            }
            Request::Unload { name } if name == "ghost" => error(ErrorCode::NotFound, "no loaded model named `ghost`"),
            Request::Unload { name } => Ok(Reply::Unloaded { name }),
            Request::Pull(p) => {
                for progress in download_frames("pull-1", &p.source) {
                    send(&mut stream, ServerFrame::Progress { id, progress }).await;
                }
                let mut m = stored_models().remove(1);
                m.id = p.source;
                m.loaded = false;
                Ok(Reply::Pulled(m))
            }
            Request::Rm { model } if model == "hf:Qwen/Qwen3-8B" => {
                error(ErrorCode::Conflict, "hf:Qwen/Qwen3-8B is loaded as `qwen3-8b`; unload it first")
            }
            Request::Rm { model } => Ok(Reply::Removed { model, freed_bytes: 3_554_235_024 }),
            Request::Cancel { operation } => Ok(Reply::Cancelled { operation }),
            Request::Gpus => Ok(Reply::Gpus(gpu_report())),
            Request::Doctor(p) => Ok(Reply::Doctor(doctor_report(p.quick))),
        };
        let frame = match result {
            Ok(reply) => ServerFrame::Reply { id, reply },
            Err(error) => ServerFrame::Error { id, error },
        };
        send(&mut stream, frame).await;
    }
}
