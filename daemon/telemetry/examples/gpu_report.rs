//! Prints what llmd's telemetry sees on this host, without the daemon: the GPU report (JSON,
//! as `llmctl gpus --json` gets it), the dcgm-exporter metrics, the P2P matrix and the doctor
//! report. Used to capture real output on GPU machines:
//!
//! ```text
//! cargo run -p llmd-telemetry --features cuda --example gpu_report [-- --quick]
//! ```

use llmd_proto::messages::CheckStatus;
use llmd_telemetry::{Caller, DoctorConfig, DoctorContext, Telemetry, run_checks};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let telemetry = Telemetry::start();
    let me = std::process::id();
    // This process owns no model; label its own GPU memory to show the owner mapping works.
    let report = telemetry.report_with_owners(&|pid, gpu| (pid == me).then(|| format!("gpu_report-example@{gpu}")));
    println!("== gpus (JSON)\n{}", serde_json::to_string_pretty(&report).unwrap_or_default());

    let hostname =
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    println!("== /metrics (GPU part)\n{}", telemetry.dcgm_metrics(&hostname));

    let p2p = telemetry.p2p_matrix();
    println!("== p2p\n{p2p:#?}");

    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| "root".to_string(), |u| u.name);
    let config = DoctorConfig { models_dir: std::env::temp_dir(), ..DoctorConfig::default() };
    let mut ctx = DoctorContext::new(report, config);
    ctx.p2p = p2p;
    ctx.caller = Some(Caller { uid: uid.as_raw(), gids: vec![nix::unistd::getgid().as_raw()] });
    ctx.llmd_user = user;
    ctx.quick = quick;
    let started = std::time::Instant::now();
    let doctor = run_checks(&ctx);
    println!("== doctor ({} ms)", started.elapsed().as_millis());
    for c in &doctor.checks {
        let status = match c.status {
            CheckStatus::Pass => "pass",
            CheckStatus::Warn => "WARN",
            CheckStatus::Fail => "FAIL",
            CheckStatus::Skip => "skip",
        };
        println!("{status:4}  {:<17} {}", c.name, c.observed);
        if !c.fix.is_empty() {
            println!("      {:<17} fix: {}", "", c.fix);
        }
    }
    println!("== doctor (JSON)\n{}", serde_json::to_string_pretty(&doctor).unwrap_or_default());

    #[cfg(feature = "cuda")]
    show_processes(&telemetry);
}

/// Holds 1 GiB on every GPU and prints the GPU process list, to show that processes, their
/// memory and the owner mapping (`llmd_model`) come through.
#[cfg(feature = "cuda")]
fn show_processes(telemetry: &Telemetry) {
    let me = std::process::id();
    let count = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    let mut held = Vec::new();
    for i in 0..count as usize {
        match cudarc::driver::CudaContext::new(i).and_then(|ctx| ctx.default_stream().alloc_zeros::<u8>(1 << 30)) {
            Ok(buf) => held.push(buf),
            Err(e) => println!("GPU {i}: cannot allocate: {e}"),
        }
    }
    let report = telemetry.report_with_owners(&|pid, gpu| (pid == me).then(|| format!("example-model@gpu{gpu}")));
    for gpu in &report.gpus {
        println!(
            "== GPU {} processes (memory used {} MiB): {}",
            gpu.index,
            gpu.memory_used_bytes >> 20,
            serde_json::to_string(&gpu.processes).unwrap_or_default()
        );
    }
    drop(held);
}
