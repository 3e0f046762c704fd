//! [`Telemetry`]: NVML loaded at run time, read into [`GpuReport`]s.
//!
//! [`Telemetry::start`] opens NVML through llmd-nvlib (`libnvidia-ml.so.1`) and hands the file
//! that opened to `nvml-wrapper`, which keeps its own handle to it; when that fails (no driver,
//! no GPU, driver/library mismatch) the handle still works and every report says why in
//! `unavailable`, so the daemon serves on the CPU instead of crashing.

use std::path::Path;
use std::sync::Arc;

use llmd_proto::messages::{GpuInfo, GpuProcess, GpuReport};
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, P2pCapabilitiesIndex, P2pStatus, TemperatureSensor, TopologyLevel,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::{Device, Nvml};

use crate::doctor::P2pPair;
use crate::xid::{XidCounters, XidWatcher};

/// GPU telemetry for the daemon: one per process, shared behind an `Arc`.
///
/// Cheap to query; every call reads NVML afresh.
#[derive(Debug)]
pub struct Telemetry {
    backend: Backend,
    xid: XidCounters,
}

#[derive(Debug)]
enum Backend {
    Nvml {
        nvml: Arc<Nvml>,
        // Held for its Drop, which stops the thread; `None` when no GPU supports XID events.
        _watcher: Option<XidWatcher>,
    },
    Unavailable(String),
}

impl Telemetry {
    /// Loads NVML and starts the XID watch thread. Never fails: without NVML every report
    /// carries the reason in `unavailable` and no thread is started.
    pub fn start() -> Telemetry {
        let xid = XidCounters::default();
        let nvml = match llmd_nvlib::Search::System.open(llmd_nvlib::NvLib::Nvml) {
            Ok(lib) => {
                Nvml::builder().lib_path(std::ffi::OsStr::new(lib.file())).init().map_err(|e| unavailable_reason(&e))
            }
            Err(e) => Err(format!("{e} (is the NVIDIA driver installed?)")),
        };
        match nvml {
            Ok(nvml) => {
                let nvml = Arc::new(nvml);
                let watcher = XidWatcher::start(nvml.clone(), xid.clone());
                Telemetry { backend: Backend::Nvml { nvml, _watcher: watcher }, xid }
            }
            Err(reason) => {
                tracing::warn!("GPU telemetry unavailable: {reason}; llmd serves on the CPU");
                Telemetry { backend: Backend::Unavailable(reason), xid }
            }
        }
    }

    /// A handle that never touches NVML, e.g. for `--device cpu` or tests.
    pub fn unavailable(reason: impl Into<String>) -> Telemetry {
        Telemetry { backend: Backend::Unavailable(reason.into()), xid: XidCounters::default() }
    }

    /// Whether NVML loaded.
    pub fn is_available(&self) -> bool {
        matches!(self.backend, Backend::Nvml { .. })
    }

    /// XID counters shared with the watch thread.
    pub fn xid_counters(&self) -> &XidCounters {
        &self.xid
    }

    /// A report without model ownership of GPU processes.
    pub fn report(&self) -> GpuReport {
        self.report_with_owners(&|_, _| None)
    }

    /// A report in which each GPU process gets `llmd_model = owner(pid, gpu_index)`; the
    /// daemon answers for its own pid with the model it placed on that GPU.
    pub fn report_with_owners(&self, owner: &dyn Fn(u32, u32) -> Option<String>) -> GpuReport {
        let nvml = match &self.backend {
            Backend::Nvml { nvml, .. } => nvml,
            Backend::Unavailable(reason) => {
                return GpuReport { unavailable: Some(reason.clone()), ..GpuReport::default() };
            }
        };
        let count = match nvml.device_count() {
            Ok(n) => n,
            Err(e) => {
                return GpuReport { unavailable: Some(format!("NVML cannot count GPUs: {e}")), ..GpuReport::default() };
            }
        };
        let driver_version = nvml.sys_driver_version().ok();
        let cuda_driver_version = nvml.sys_cuda_driver_version().ok().map(format_cuda_version);
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            match nvml.device_by_index(index) {
                Ok(device) => gpus.push(read_gpu(nvml, &device, index, self.xid.count(index), owner)),
                // A GPU that NVML cannot open (fallen off the bus, in reset) still gets a row so
                // that `llmctl gpus` shows it exists.
                Err(e) => gpus.push(GpuInfo {
                    index,
                    name: format!("<unreadable: {e}>"),
                    xid_errors: self.xid.count(index),
                    ..GpuInfo::default()
                }),
            }
        }
        GpuReport { unavailable: None, driver_version, cuda_driver_version, gpus }
    }

    /// Prometheus text for `/metrics`: a fresh report with dcgm-exporter's names
    /// (see [`crate::metrics`]).
    pub fn dcgm_metrics(&self, hostname: &str) -> String {
        crate::metrics::dcgm_metrics(&self.report(), hostname)
    }

    /// Peer-to-peer status of every GPU pair, for the doctor's P2P check; `None` without NVML.
    pub fn p2p_matrix(&self) -> Option<Vec<P2pPair>> {
        let Backend::Nvml { nvml, .. } = &self.backend else { return None };
        let count = nvml.device_count().ok()?;
        let mut pairs = Vec::new();
        for a in 0..count {
            for b in (a + 1)..count {
                pairs.push(read_p2p_pair(nvml, a, b));
            }
        }
        Some(pairs)
    }
}

fn unavailable_reason(e: &nvml_wrapper::error::NvmlError) -> String {
    use nvml_wrapper::error::NvmlError;
    match e {
        NvmlError::LibloadingError(inner) => {
            format!("cannot load libnvidia-ml.so.1 (is the NVIDIA driver installed?): {inner}")
        }
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_string(),
        NvmlError::LibRmVersionMismatch => {
            "NVIDIA driver/library version mismatch (driver upgraded without a reboot?)".to_string()
        }
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_string(),
        other => format!("NVML failed to initialize: {other}"),
    }
}

/// NVML encodes CUDA versions as `1000 * major + 10 * minor`: 12040 → "12.4".
pub(crate) fn format_cuda_version(v: i32) -> String {
    format!("{}.{}", nvml_wrapper::cuda_driver_version_major(v), nvml_wrapper::cuda_driver_version_minor(v))
}

/// Every field is read on its own so that one unsupported query (ECC on a consumer card,
/// power on some vGPUs) leaves only that field empty.
fn read_gpu(
    nvml: &Nvml,
    device: &Device<'_>,
    index: u32,
    xid_errors: u64,
    owner: &dyn Fn(u32, u32) -> Option<String>,
) -> GpuInfo {
    let memory = device.memory_info().ok();
    let utilization = device.utilization_rates().ok();
    let processes = device
        .running_compute_processes()
        .map(|procs| {
            procs
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    name: process_name(nvml, p.pid),
                    used_memory_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => Some(bytes),
                        UsedGpuMemory::Unavailable => None,
                    },
                    llmd_model: owner(p.pid, index),
                })
                .collect()
        })
        .unwrap_or_default();
    GpuInfo {
        index,
        name: device.name().unwrap_or_default(),
        uuid: device.uuid().unwrap_or_default(),
        pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
        total_energy_mj: device.total_energy_consumption().ok(),
        utilization_gpu_pct: utilization.as_ref().map(|u| u.gpu),
        utilization_memory_pct: utilization.as_ref().map(|u| u.memory),
        memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
        memory_free_bytes: memory.as_ref().map_or(0, |m| m.free),
        memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
        temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
        power_draw_w: device.power_usage().ok().map(milliwatts_to_watts),
        power_limit_w: device.enforced_power_limit().ok().map(milliwatts_to_watts),
        sm_clock_mhz: device.clock_info(Clock::SM).ok(),
        mem_clock_mhz: device.clock_info(Clock::Memory).ok(),
        persistence_mode: device.is_in_persistent_mode().ok(),
        ecc_errors_corrected: device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile).ok(),
        ecc_errors_uncorrected: device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile).ok(),
        throttle_reasons: device
            .current_throttle_reasons()
            .map(|r| throttle_reason_names(r.bits()))
            .unwrap_or_default(),
        xid_errors,
        processes,
    }
}

fn process_name(nvml: &Nvml, pid: u32) -> String {
    // NVML sees host pids; /proc is the fallback when the query is refused.
    if let Ok(name) = nvml.sys_process_name(pid, 64) {
        return name;
    }
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

pub(crate) fn milliwatts_to_watts(mw: u32) -> f64 {
    f64::from(mw) / 1000.0
}

/// Names of the active clock throttle reasons in an NVML bitmask, in a fixed order.
/// Bits NVML reports that this table does not know are dropped.
pub fn throttle_reason_names(bits: u64) -> Vec<String> {
    const NAMES: &[(ThrottleReasons, &str)] = &[
        (ThrottleReasons::GPU_IDLE, "gpu_idle"),
        (ThrottleReasons::APPLICATIONS_CLOCKS_SETTING, "applications_clocks_setting"),
        (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::SYNC_BOOST, "sync_boost"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake_slowdown"),
        (ThrottleReasons::DISPLAY_CLOCK_SETTING, "display_clock_setting"),
    ];
    let reasons = ThrottleReasons::from_bits_truncate(bits);
    NAMES.iter().filter(|(flag, _)| reasons.contains(*flag)).map(|(_, name)| (*name).to_string()).collect()
}

fn p2p_status_name(status: Result<P2pStatus, nvml_wrapper::error::NvmlError>) -> String {
    match status {
        Ok(P2pStatus::Ok) => "ok".into(),
        Ok(P2pStatus::ChipsetNotSupported) => "chipset_not_supported".into(),
        Ok(P2pStatus::GpuNotSupported) => "gpu_not_supported".into(),
        Ok(P2pStatus::IohTopologyNotSupported) => "ioh_topology_not_supported".into(),
        Ok(P2pStatus::DisabledByRegkey) => "disabled_by_regkey".into(),
        Ok(P2pStatus::NotSupported) => "not_supported".into(),
        Ok(P2pStatus::Unknown) => "unknown".into(),
        Err(e) => format!("unreadable: {e}"),
    }
}

fn topology_name(level: TopologyLevel) -> &'static str {
    // The short names `nvidia-smi topo -m` prints.
    match level {
        TopologyLevel::Internal => "internal",
        TopologyLevel::Single => "PIX",
        TopologyLevel::Multiple => "PXB",
        TopologyLevel::HostBridge => "PHB",
        TopologyLevel::Node => "NODE",
        TopologyLevel::System => "SYS",
    }
}

fn read_p2p_pair(nvml: &Nvml, a: u32, b: u32) -> P2pPair {
    let (da, db) = match (nvml.device_by_index(a), nvml.device_by_index(b)) {
        (Ok(da), Ok(db)) => (da, db),
        (Err(e), _) | (_, Err(e)) => {
            let status = format!("unreadable: {e}");
            return P2pPair { a, b, read: status.clone(), write: status, nvlink: None, topology: None };
        }
    };
    let read = p2p_status_name(da.p2p_status(&db, P2pCapabilitiesIndex::Read));
    let write = p2p_status_name(da.p2p_status(&db, P2pCapabilitiesIndex::Write));
    let nvlink = da.p2p_status(&db, P2pCapabilitiesIndex::NvLink).ok().map(|s| s == P2pStatus::Ok);
    // `topology_common_ancestor` takes the other device by value; reopen it.
    let topology = nvml
        .device_by_index(b)
        .ok()
        .and_then(|other| da.topology_common_ancestor(other).ok())
        .map(|level| topology_name(level).to_string());
    P2pPair { a, b, read, write, nvlink, topology }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_handle_reports_reason_and_no_gpus() {
        let t = Telemetry::unavailable("no driver");
        assert!(!t.is_available());
        let report = t.report();
        assert_eq!(report.unavailable.as_deref(), Some("no driver"));
        assert!(report.gpus.is_empty());
        assert!(t.p2p_matrix().is_none());
        let text = t.dcgm_metrics("host");
        assert!(!text.contains("gpu=\""), "no GPU series without NVML: {text}");
    }

    #[test]
    fn start_never_panics_without_a_gpu() {
        // On a host without the driver this exercises the fallback; with one, a real report.
        let t = Telemetry::start();
        let report = t.report();
        assert_eq!(report.unavailable.is_some(), !t.is_available());
    }

    #[test]
    fn cuda_version_formatting() {
        assert_eq!(format_cuda_version(12040), "12.4");
        assert_eq!(format_cuda_version(13000), "13.0");
        assert_eq!(format_cuda_version(12090), "12.9");
    }

    #[test]
    fn throttle_reasons_by_name() {
        let bits =
            (ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_THERMAL_SLOWDOWN | ThrottleReasons::GPU_IDLE).bits();
        assert_eq!(throttle_reason_names(bits), vec!["gpu_idle", "sw_power_cap", "hw_thermal_slowdown"]);
        assert!(throttle_reason_names(0).is_empty());
    }

    #[test]
    fn power_in_watts() {
        assert_eq!(milliwatts_to_watts(700_000), 700.0);
        assert_eq!(milliwatts_to_watts(72_345), 72.345);
    }

    #[test]
    fn p2p_and_topology_names() {
        assert_eq!(p2p_status_name(Ok(P2pStatus::Ok)), "ok");
        assert_eq!(p2p_status_name(Ok(P2pStatus::DisabledByRegkey)), "disabled_by_regkey");
        assert_eq!(
            p2p_status_name(Err(nvml_wrapper::error::NvmlError::NotSupported)),
            "unreadable: the requested operation is not available on the target device"
        );
        assert_eq!(topology_name(TopologyLevel::System), "SYS");
    }
}
