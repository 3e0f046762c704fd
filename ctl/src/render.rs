//! Human output for each reply. Pure functions from reply to text, so tests can pin them.

use std::fmt::Write as _;

use llmd_proto::{CheckStatus, DoctorReport, GpuReport, RunningModel, StatusInfo, StoredModel};

use crate::fmt::{self, Table};

/// Renders `Some(v)` as `v` followed by `suffix`, `None` as `-`.
fn opt<T: std::fmt::Display>(value: Option<T>, suffix: &str) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v}{suffix}"))
}

pub fn status(s: &StatusInfo) -> String {
    let mut out = format!("llmd {} (protocol {}): {}\n", s.version, s.protocol, s.state.as_str());
    let device = match s.gpus {
        0 => s.device.to_string(),
        1 => format!("{} (1 GPU)", s.device),
        n => format!("{} ({n} GPUs)", s.device),
    };
    let rows = [
        ("pid", s.pid.to_string()),
        ("uptime", fmt::duration(s.uptime_secs)),
        ("http", s.http_listen.clone()),
        ("socket", s.socket.clone()),
        ("d-bus", s.dbus.clone()),
        ("device", device),
        ("models dir", s.models_dir.clone()),
        ("models", format!("{} loaded", s.models_loaded)),
    ];
    for (key, value) in rows {
        let _ = writeln!(out, "  {key:<11} {value}");
    }
    out
}

/// Where a model runs, compactly: `cpu`, `cuda:0`, `cuda:0,1`.
fn placement(m: &RunningModel) -> String {
    if m.gpus.is_empty() {
        return m.device.to_string();
    }
    let ids: Vec<String> = m.gpus.iter().map(u32::to_string).collect();
    format!("{}:{}", m.device, ids.join(","))
}

pub fn ps(models: &[RunningModel], now_unix: u64) -> String {
    if models.is_empty() {
        return "no models loaded (serve one with `llmctl load <source>`)\n".to_string();
    }
    let mut t = Table::new(&[
        "NAME", "ARCH", "PARAMS", "DTYPE", "DEVICE", "TP", "CONTEXT", "WEIGHTS", "KV CACHE", "KV USED", "RUN", "WAIT",
        "UP",
    ])
    .right(&[2, 5, 6, 7, 8, 9, 10, 11, 12]);
    for m in models {
        t.row(vec![
            m.name.clone(),
            m.architecture.clone(),
            fmt::count(m.params),
            m.dtype.to_string(),
            placement(m),
            m.tp.to_string(),
            m.max_model_len.to_string(),
            fmt::bytes(m.weight_bytes),
            fmt::bytes(m.kv_cache_bytes),
            format!("{}%", fmt::percent(u64::from(m.kv_blocks_used), u64::from(m.kv_blocks_total))),
            m.running.to_string(),
            m.waiting.to_string(),
            fmt::duration(now_unix.saturating_sub(m.loaded_at)),
        ]);
    }
    t.render()
}

pub fn list(models: &[StoredModel]) -> String {
    if models.is_empty() {
        return "no models on disk (fetch one with `llmctl pull <source>`)\n".to_string();
    }
    let mut t = Table::new(&["MODEL", "SOURCE", "REVISION", "SIZE", "ARCH", "LOADED", "PATH"]).right(&[3]);
    for m in models {
        // Commit hashes are 40 hex digits; 12 identify them, like `git log --abbrev`.
        let revision = m.revision.as_deref().map(|r| if r.len() == 40 { &r[..12] } else { r });
        t.row(vec![
            m.id.clone(),
            m.source.clone(),
            opt(revision, ""),
            fmt::bytes(m.size_bytes),
            opt(m.architecture.as_deref(), ""),
            if m.loaded { "yes" } else { "no" }.to_string(),
            m.path.clone(),
        ]);
    }
    t.render()
}

pub fn loaded(m: &RunningModel) -> String {
    format!(
        "loaded {} ({} {}, {} params, {}) on {}: weights {}, KV cache {} ({} blocks), context {}\n",
        m.name,
        m.architecture,
        m.dtype,
        fmt::count(m.params),
        m.source,
        placement(m),
        fmt::bytes(m.weight_bytes),
        fmt::bytes(m.kv_cache_bytes),
        m.kv_blocks_total,
        m.max_model_len,
    )
}

pub fn pulled(m: &StoredModel) -> String {
    format!("pulled {} ({}) into {}\n", m.id, fmt::bytes(m.size_bytes), m.path)
}

pub fn gpus(report: &GpuReport, color: bool) -> String {
    let mut out = String::new();
    if let Some(reason) = &report.unavailable {
        let _ = writeln!(out, "no GPU telemetry: {reason}");
        out.push_str("llmd serves models on the CPU; `llmctl doctor` says what is missing.\n");
        return out;
    }
    let _ = writeln!(
        out,
        "driver {}  CUDA {}  {} GPU{}",
        opt(report.driver_version.as_deref(), ""),
        opt(report.cuda_driver_version.as_deref(), ""),
        report.gpus.len(),
        if report.gpus.len() == 1 { "" } else { "s" }
    );
    if report.gpus.is_empty() {
        return out;
    }
    let mut t = Table::new(&[
        "GPU",
        "NAME",
        "UTIL",
        "MEM UTIL",
        "MEMORY",
        "USED / TOTAL",
        "TEMP",
        "POWER / LIMIT",
        "SM / MEM CLOCK",
    ])
    .right(&[0, 2, 3, 5, 6, 7, 8]);
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    for g in &report.gpus {
        let used = g.memory_used_bytes;
        let total = g.memory_total_bytes;
        t.row(vec![
            g.index.to_string(),
            g.name.clone(),
            opt(g.utilization_gpu_pct, "%"),
            opt(g.utilization_memory_pct, "%"),
            format!("{} {:>3}%", fmt::bar(used, total, 20), fmt::percent(used, total)),
            format!("{:.1} / {:.1} GiB", gib(used), gib(total)),
            opt(g.temperature_c, "°C"),
            format!(
                "{} / {}",
                opt(g.power_draw_w.map(|w| w.round() as u64), ""),
                opt(g.power_limit_w.map(|w| w.round() as u64), " W")
            ),
            format!("{} / {} MHz", opt(g.sm_clock_mhz, ""), opt(g.mem_clock_mhz, "")),
        ]);
    }
    out.push_str(&t.render());

    // Conditions an operator should notice, one line each, below the table like nvitop's alerts.
    let mut notes = Vec::new();
    for g in &report.gpus {
        if !g.throttle_reasons.is_empty() {
            notes.push(format!("GPU {}: throttled ({})", g.index, g.throttle_reasons.join(", ")));
        }
        if let Some(n) = g.ecc_errors_uncorrected.filter(|&n| n > 0) {
            notes.push(format!("GPU {}: {n} uncorrected ECC errors", g.index));
        }
        if g.xid_errors > 0 {
            notes.push(format!(
                "GPU {}: {} XID errors since the daemon started (see journalctl -u llmd)",
                g.index, g.xid_errors
            ));
        }
        if g.persistence_mode == Some(false) {
            notes.push(format!("GPU {}: persistence mode off (sudo nvidia-smi -pm 1)", g.index));
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            let _ = writeln!(out, "{}", paint(&format!("! {note}"), YELLOW, color));
        }
    }

    out.push('\n');
    let processes: Vec<_> = report.gpus.iter().flat_map(|g| g.processes.iter().map(move |p| (g.index, p))).collect();
    if processes.is_empty() {
        out.push_str("no processes on the GPUs\n");
        return out;
    }
    let mut t = Table::new(&["GPU", "PID", "PROCESS", "GPU MEMORY", "LLMD MODEL"]).right(&[0, 1, 3]);
    for (index, p) in processes {
        t.row(vec![
            index.to_string(),
            p.pid.to_string(),
            p.name.clone(),
            p.used_memory_bytes.map_or_else(|| "-".to_string(), fmt::bytes),
            opt(p.llmd_model.as_deref(), ""),
        ]);
    }
    out.push_str(&t.render());
    out
}

const RED: &str = "31";
const GREEN: &str = "32";
const YELLOW: &str = "33";
const DIM: &str = "2";

/// Wraps `text` in an ANSI colour when writing to a terminal.
pub fn paint(text: &str, code: &str, color: bool) -> String {
    if color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_string() }
}

pub fn doctor(report: &DoctorReport, color: bool) -> String {
    let mut out = String::new();
    let width = report.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let (mut pass, mut warn, mut fail, mut skip) = (0, 0, 0, 0);
    for c in &report.checks {
        let (label, code) = match c.status {
            CheckStatus::Pass => {
                pass += 1;
                ("PASS", GREEN)
            }
            CheckStatus::Warn => {
                warn += 1;
                ("WARN", YELLOW)
            }
            CheckStatus::Fail => {
                fail += 1;
                ("FAIL", RED)
            }
            CheckStatus::Skip => {
                skip += 1;
                ("SKIP", DIM)
            }
        };
        let _ = writeln!(out, "{}  {:<width$}  {}", paint(label, code, color), c.name, c.observed);
        if !c.fix.is_empty() && c.status != CheckStatus::Pass {
            let _ = writeln!(out, "      {:<width$}  fix: {}", "", c.fix);
        }
    }
    let _ = writeln!(out, "\n{pass} passed, {warn} warnings, {fail} failed, {skip} skipped");
    out
}

#[cfg(test)]
mod tests {
    use llmd_proto::{Backend, CheckResult, DaemonState, GpuInfo, GpuProcess};

    use super::*;

    #[test]
    fn status_lists_every_field() {
        let s = StatusInfo {
            version: "0.1.0".into(),
            protocol: 1,
            state: DaemonState::Ready,
            pid: 42,
            uptime_secs: 3725,
            http_listen: "0.0.0.0:8000".into(),
            socket: "/run/llmd/llmd.sock".into(),
            dbus: "system".into(),
            device: Backend::Cuda,
            models_dir: "/var/lib/llmd/models".into(),
            models_loaded: 1,
            gpus: 2,
        };
        let text = status(&s);
        assert!(text.starts_with("llmd 0.1.0 (protocol 1): ready\n"), "{text}");
        assert!(text.contains("  uptime      1h 02m\n"), "{text}");
        assert!(text.contains("  device      cuda (2 GPUs)\n"), "{text}");
    }

    #[test]
    fn gpu_table_flags_and_processes() {
        let report = GpuReport {
            unavailable: None,
            driver_version: Some("570.86.15".into()),
            cuda_driver_version: Some("12.8".into()),
            gpus: vec![GpuInfo {
                index: 0,
                name: "NVIDIA H100 80GB HBM3".into(),
                utilization_gpu_pct: Some(87),
                memory_used_bytes: 40 << 30,
                memory_total_bytes: 80 << 30,
                temperature_c: Some(65),
                power_draw_w: Some(312.4),
                power_limit_w: Some(700.0),
                throttle_reasons: vec!["sw_power_cap".into()],
                processes: vec![GpuProcess {
                    pid: 7,
                    name: "llmd".into(),
                    used_memory_bytes: Some(39 << 30),
                    llmd_model: Some("qwen".into()),
                }],
                ..GpuInfo::default()
            }],
        };
        let text = gpus(&report, false);
        assert!(text.contains("[██████████░░░░░░░░░░]  50%"), "{text}");
        assert!(text.contains("40.0 / 80.0 GiB"), "{text}");
        assert!(text.contains("312 / 700 W"), "{text}");
        assert!(text.contains("! GPU 0: throttled (sw_power_cap)"), "{text}");
        assert!(text.contains("39.0 GiB  qwen"), "{text}");
    }

    #[test]
    fn doctor_shows_fixes_for_problems_only() {
        let report = DoctorReport {
            checks: vec![
                CheckResult {
                    name: "driver_loaded".into(),
                    status: CheckStatus::Pass,
                    observed: "570.86".into(),
                    fix: String::new(),
                },
                CheckResult {
                    name: "nvidia_uvm".into(),
                    status: CheckStatus::Fail,
                    observed: "not loaded".into(),
                    fix: "modprobe nvidia_uvm".into(),
                },
            ],
        };
        let text = doctor(&report, false);
        assert_eq!(
            text,
            "PASS  driver_loaded  570.86\nFAIL  nvidia_uvm     not loaded\n                     fix: modprobe nvidia_uvm\n\n1 passed, 0 warnings, 1 failed, 0 skipped\n"
        );
    }
}
