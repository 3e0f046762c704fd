//! GPU gauges in Prometheus text format with dcgm-exporter's names and labels, so the usual
//! Grafana dashboards (NVIDIA's "DCGM Exporter Dashboard") work against llmd's `/metrics`.
//!
//! Series carry the labels `gpu`, `UUID`, `pci_bus_id`, `modelName` and `Hostname`, in that
//! order. Units follow dcgm: memory in MiB, power in W, clocks in MHz, energy in mJ.
//!
//! One difference: dcgm's `DCGM_FI_DEV_XID_ERRORS` holds the *last* XID code; llmd exports
//! the *number* of XID events since the daemon started (the code itself is in the journal).
//! Both are 0 on a healthy GPU, so "alert when non-zero" rules keep working.

use std::fmt::Write as _;

use llmd_proto::messages::{GpuInfo, GpuReport};

/// How a field's value is pulled out of a GPU row.
type Getter = fn(&GpuInfo) -> Option<String>;

const MIB: u64 = 1024 * 1024;

/// (name, type, help, value) for every gauge taken from the report, in dcgm-exporter's order.
const FIELDS: &[(&str, &str, &str, Getter)] = &[
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", "SM clock frequency (in MHz).", |g| g.sm_clock_mhz.map(|v| v.to_string())),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", |g| g.mem_clock_mhz.map(|v| v.to_string())),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", |g| g.temperature_c.map(|v| v.to_string())),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", |g| g.power_draw_w.map(format_float)),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", "GPU utilization (in %).", |g| g.utilization_gpu_pct.map(|v| v.to_string())),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge", "Memory utilization (in %).", |g| {
        g.utilization_memory_pct.map(|v| v.to_string())
    }),
    ("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", |g| {
        known_memory(g).then(|| (g.memory_free_bytes / MIB).to_string())
    }),
    ("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", |g| {
        known_memory(g).then(|| (g.memory_used_bytes / MIB).to_string())
    }),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "gauge",
        "Number of XID errors since llmd started (dcgm-exporter: value of the last XID error).",
        |g| Some(g.xid_errors.to_string()),
    ),
];

/// The energy counter comes from outside the report; see [`dcgm_metrics_with_energy`].
const ENERGY: (&str, &str, &str) =
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", "Total energy consumption since boot (in mJ).");

/// A GPU whose memory query failed reports 0 total; leaving it out beats claiming 0 MiB free.
fn known_memory(g: &GpuInfo) -> bool {
    g.memory_total_bytes > 0
}

/// Prometheus floats: integers without a fraction, others as Rust prints them (round-trips).
fn format_float(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 { format!("{v:.0}") } else { v.to_string() }
}

/// Escapes a label value per the Prometheus text format.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels(g: &GpuInfo, hostname: &str) -> String {
    format!(
        "gpu=\"{}\",UUID=\"{}\",pci_bus_id=\"{}\",modelName=\"{}\",Hostname=\"{}\"",
        g.index,
        escape_label(&g.uuid),
        escape_label(&g.pci_bus_id),
        escape_label(&g.name),
        escape_label(hostname)
    )
}

/// dcgm-exporter-compatible gauges for every GPU in `report`, including
/// `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` where the GPU reports it.
/// An empty or unavailable report gives no series (and no HELP/TYPE lines).
///
/// A metric family is written only when at least one GPU has a value for it, so a field no
/// GPU supports does not produce a dangling HELP/TYPE header.
pub fn dcgm_metrics(report: &GpuReport, hostname: &str) -> String {
    let mut out = String::new();
    let rows: Vec<(String, &GpuInfo)> = report.gpus.iter().map(|g| (labels(g, hostname), g)).collect();
    for (name, kind, help, get) in FIELDS {
        let samples: Vec<(&str, String)> = rows.iter().filter_map(|(l, g)| get(g).map(|v| (l.as_str(), v))).collect();
        write_family(&mut out, name, kind, help, &samples);
    }
    let (name, kind, help) = ENERGY;
    let samples: Vec<(&str, String)> =
        rows.iter().filter_map(|(l, g)| g.total_energy_mj.map(|v| (l.as_str(), v.to_string()))).collect();
    write_family(&mut out, name, kind, help, &samples);
    out
}

fn write_family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, String)]) {
    if samples.is_empty() {
        return;
    }
    // Writing into a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: format!("GPU-0000000{index}-aaaa-bbbb-cccc-ddddeeeeffff"),
            pci_bus_id: format!("00000000:1{index}:00.0"),
            utilization_gpu_pct: Some(87),
            utilization_memory_pct: Some(41),
            memory_used_bytes: 70_000 * MIB + 123,
            memory_free_bytes: 11_559 * MIB,
            memory_total_bytes: 81_559 * MIB,
            temperature_c: Some(54),
            power_draw_w: Some(512.25),
            power_limit_w: Some(700.0),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: Some(2619),
            persistence_mode: Some(true),
            xid_errors: index.into(),
            ..GpuInfo::default()
        }
    }

    #[test]
    fn two_gpus_exact_text() {
        let mut second = h100(1);
        // A field the second GPU cannot report is left out for it only.
        second.temperature_c = None;
        second.power_draw_w = Some(100.0);
        second.total_energy_mj = Some(42);
        let mut first = h100(0);
        first.total_energy_mj = Some(123_456_789);
        let report = GpuReport { gpus: vec![first, second], ..GpuReport::default() };
        let text = dcgm_metrics(&report, "node-7");
        let l0 = "gpu=\"0\",UUID=\"GPU-00000000-aaaa-bbbb-cccc-ddddeeeeffff\",pci_bus_id=\"00000000:10:00.0\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"node-7\"";
        let l1 = "gpu=\"1\",UUID=\"GPU-00000001-aaaa-bbbb-cccc-ddddeeeeffff\",pci_bus_id=\"00000000:11:00.0\",modelName=\"NVIDIA H100 80GB HBM3\",Hostname=\"node-7\"";
        let expected = format!(
            "# HELP DCGM_FI_DEV_SM_CLOCK SM clock frequency (in MHz).
# TYPE DCGM_FI_DEV_SM_CLOCK gauge
DCGM_FI_DEV_SM_CLOCK{{{l0}}} 1980
DCGM_FI_DEV_SM_CLOCK{{{l1}}} 1980
# HELP DCGM_FI_DEV_MEM_CLOCK Memory clock frequency (in MHz).
# TYPE DCGM_FI_DEV_MEM_CLOCK gauge
DCGM_FI_DEV_MEM_CLOCK{{{l0}}} 2619
DCGM_FI_DEV_MEM_CLOCK{{{l1}}} 2619
# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).
# TYPE DCGM_FI_DEV_GPU_TEMP gauge
DCGM_FI_DEV_GPU_TEMP{{{l0}}} 54
# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).
# TYPE DCGM_FI_DEV_POWER_USAGE gauge
DCGM_FI_DEV_POWER_USAGE{{{l0}}} 512.25
DCGM_FI_DEV_POWER_USAGE{{{l1}}} 100
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{{{l0}}} 87
DCGM_FI_DEV_GPU_UTIL{{{l1}}} 87
# HELP DCGM_FI_DEV_MEM_COPY_UTIL Memory utilization (in %).
# TYPE DCGM_FI_DEV_MEM_COPY_UTIL gauge
DCGM_FI_DEV_MEM_COPY_UTIL{{{l0}}} 41
DCGM_FI_DEV_MEM_COPY_UTIL{{{l1}}} 41
# HELP DCGM_FI_DEV_FB_FREE Framebuffer memory free (in MiB).
# TYPE DCGM_FI_DEV_FB_FREE gauge
DCGM_FI_DEV_FB_FREE{{{l0}}} 11559
DCGM_FI_DEV_FB_FREE{{{l1}}} 11559
# HELP DCGM_FI_DEV_FB_USED Framebuffer memory used (in MiB).
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{{{l0}}} 70000
DCGM_FI_DEV_FB_USED{{{l1}}} 70000
# HELP DCGM_FI_DEV_XID_ERRORS Number of XID errors since llmd started (dcgm-exporter: value of the last XID error).
# TYPE DCGM_FI_DEV_XID_ERRORS gauge
DCGM_FI_DEV_XID_ERRORS{{{l0}}} 0
DCGM_FI_DEV_XID_ERRORS{{{l1}}} 1
# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).
# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{l0}}} 123456789
DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{l1}}} 42
"
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn empty_and_unavailable_reports_give_no_series() {
        assert_eq!(dcgm_metrics(&GpuReport::default(), "h"), "");
        let unavailable = GpuReport { unavailable: Some("no driver".into()), ..GpuReport::default() };
        assert_eq!(dcgm_metrics(&unavailable, "h"), "");
    }

    #[test]
    fn without_energy_the_counter_family_is_absent() {
        let report = GpuReport { gpus: vec![h100(0)], ..GpuReport::default() };
        let text = dcgm_metrics(&report, "h");
        assert!(!text.contains("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"));
        assert!(text.contains("DCGM_FI_DEV_FB_USED{gpu=\"0\""));
    }

    #[test]
    fn unknown_memory_is_not_reported_as_zero() {
        let gpu = GpuInfo { index: 2, name: "X".into(), ..GpuInfo::default() };
        let text = dcgm_metrics(&GpuReport { gpus: vec![gpu], ..GpuReport::default() }, "h");
        assert!(!text.contains("FB_FREE"));
        assert!(!text.contains("FB_USED"));
        // The XID count is always known (0 until an event arrives).
        assert!(text.contains(
            "DCGM_FI_DEV_XID_ERRORS{gpu=\"2\",UUID=\"\",pci_bus_id=\"\",modelName=\"X\",Hostname=\"h\"} 0\n"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        let gpu = GpuInfo { name: "a\"b\\c\nd".into(), ..GpuInfo::default() };
        let text = dcgm_metrics(&GpuReport { gpus: vec![gpu], ..GpuReport::default() }, "host");
        assert!(text.contains("modelName=\"a\\\"b\\\\c\\nd\""), "{text}");
    }

    #[test]
    fn float_formatting() {
        assert_eq!(format_float(100.0), "100");
        assert_eq!(format_float(72.345), "72.345");
    }
}
