//! XID errors: what the common codes mean, per-GPU counters, and the NVML watch thread.
//!
//! An XID is the NVIDIA driver's report of a GPU error (it also lands in the kernel log as
//! `NVRM: Xid (PCI:0000:18:00): 79, ...`). The watch thread subscribes to NVML's critical XID
//! events, logs each one with the GPU index, the code and its meaning, and counts them per GPU.
//! The counts show up in `GpuInfo::xid_errors` and in the `DCGM_FI_DEV_XID_ERRORS` gauge.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;

/// What an XID code means and what an operator should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidInfo {
    /// The XID number.
    pub code: u64,
    /// Short meaning, from NVIDIA's XID catalog.
    pub meaning: &'static str,
    /// What usually fixes it.
    pub action: &'static str,
}

/// The XIDs an inference host actually sees, from NVIDIA's "XID Errors" catalog.
const XID_TABLE: &[XidInfo] = &[
    XidInfo {
        code: 13,
        meaning: "Graphics engine exception (often an illegal memory access by an application)",
        action: "check the application (run it under compute-sanitizer); if it repeats across applications, check the GPU",
    },
    XidInfo {
        code: 31,
        meaning: "GPU memory page fault (an application accessed an invalid address)",
        action: "usually an application bug; if it repeats across applications, run GPU diagnostics",
    },
    XidInfo {
        code: 32,
        meaning: "Invalid or corrupted push buffer stream",
        action: "check PCIe link health (dmesg, lspci -vv); reboot if it repeats",
    },
    XidInfo { code: 38, meaning: "Driver firmware error", action: "update the driver; reboot" },
    XidInfo {
        code: 43,
        meaning: "GPU stopped processing (a user application faulted; its channel was reset)",
        action: "the GPU keeps working; look at the application that was running",
    },
    XidInfo {
        code: 45,
        meaning: "Preemptive cleanup after a previous error or a killed process",
        action: "informational; look at the XID logged before it",
    },
    XidInfo {
        code: 48,
        meaning: "Double-bit ECC error (DBE)",
        action: "reset the GPU (nvidia-smi -r) or reboot; replace the GPU if it repeats",
    },
    XidInfo {
        code: 61,
        meaning: "Internal micro-controller breakpoint/warning",
        action: "reset the GPU or reboot; report to NVIDIA if it repeats",
    },
    XidInfo {
        code: 62,
        meaning: "Internal micro-controller halt",
        action: "reset the GPU or reboot; report to NVIDIA if it repeats",
    },
    XidInfo {
        code: 63,
        meaning: "ECC page retirement or row remapping recorded",
        action: "reset the GPU (or reboot) so the remapping takes effect",
    },
    XidInfo {
        code: 64,
        meaning: "ECC page retirement or row remapping failed",
        action: "reset the GPU; replace it if remapping keeps failing",
    },
    XidInfo { code: 68, meaning: "Video processor (NVDEC) exception", action: "reset the GPU if it repeats" },
    XidInfo {
        code: 69,
        meaning: "Graphics engine class error",
        action: "check the application; reset the GPU if it repeats",
    },
    XidInfo {
        code: 74,
        meaning: "NVLink error",
        action: "check NVLink status (nvidia-smi nvlink -s) and the fabric manager; reset the GPUs or reboot",
    },
    XidInfo {
        code: 79,
        meaning: "GPU has fallen off the bus",
        action: "reboot; check power, cooling and PCIe seating; replace the GPU if it repeats",
    },
    XidInfo { code: 92, meaning: "High single-bit ECC error rate", action: "watch ECC counters; schedule a GPU reset" },
    XidInfo {
        code: 94,
        meaning: "Contained ECC error (only the affected application is hit)",
        action: "restart the affected application; reset the GPU when convenient",
    },
    XidInfo {
        code: 95,
        meaning: "Uncontained ECC error (all applications on the GPU are hit)",
        action: "reset the GPU (nvidia-smi -r) or reboot",
    },
    XidInfo {
        code: 109,
        meaning: "Context switch timeout",
        action: "check the application; reset the GPU if it repeats",
    },
    XidInfo {
        code: 119,
        meaning: "GSP RPC timeout",
        action: "reset the GPU or reboot; update the driver if it repeats",
    },
    XidInfo { code: 120, meaning: "GSP error", action: "reset the GPU or reboot; update the driver if it repeats" },
    XidInfo {
        code: 121,
        meaning: "C2C link corrected error",
        action: "watch for repeats; reset the GPU if they continue",
    },
    XidInfo { code: 140, meaning: "Unrecovered ECC error", action: "reset the GPU or reboot" },
    XidInfo {
        code: 154,
        meaning: "GPU recovery action changed (the driver now asks for a reset or reboot)",
        action: "do what `nvidia-smi -q` lists under recovery action (GPU reset or node reboot)",
    },
];

/// Looks up the meaning of an XID code; `None` for codes outside the table.
pub fn xid_info(code: u64) -> Option<&'static XidInfo> {
    XID_TABLE.iter().find(|info| info.code == code)
}

/// One-line description for logs: "79 (GPU has fallen off the bus)".
pub fn describe_xid(code: u64) -> String {
    match xid_info(code) {
        Some(info) => format!("{code} ({})", info.meaning),
        None => format!("{code} (not in llmd's table; see NVIDIA's XID catalog)"),
    }
}

/// XID events counted per GPU index since the daemon started. Cheap to clone and share.
#[derive(Debug, Clone, Default)]
pub struct XidCounters {
    inner: Arc<Mutex<BTreeMap<u32, XidTally>>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct XidTally {
    count: u64,
    last: Option<u64>,
}

impl XidCounters {
    /// Records one XID event on GPU `gpu`; `code` is `None` when NVML could not name it.
    pub fn record(&self, gpu: u32, code: Option<u64>) {
        let mut map = self.inner.lock().unwrap_or_else(|poison| poison.into_inner());
        let tally = map.entry(gpu).or_default();
        tally.count += 1;
        if code.is_some() {
            tally.last = code;
        }
    }

    /// Number of XID events seen on GPU `gpu`.
    pub fn count(&self, gpu: u32) -> u64 {
        self.inner.lock().unwrap_or_else(|poison| poison.into_inner()).get(&gpu).map_or(0, |t| t.count)
    }

    /// The most recent XID code seen on GPU `gpu`.
    pub fn last(&self, gpu: u32) -> Option<u64> {
        self.inner.lock().unwrap_or_else(|poison| poison.into_inner()).get(&gpu).and_then(|t| t.last)
    }

    /// Counts of every GPU that had at least one event.
    pub fn counts(&self) -> BTreeMap<u32, u64> {
        self.inner.lock().unwrap_or_else(|poison| poison.into_inner()).iter().map(|(gpu, t)| (*gpu, t.count)).collect()
    }
}

/// Logs one XID event and counts it. Split from the thread so that it is testable.
pub(crate) fn handle_xid_event(counters: &XidCounters, gpu: u32, code: Option<u64>) {
    counters.record(gpu, code);
    match code {
        Some(code) => {
            let action = xid_info(code).map_or("see NVIDIA's XID catalog", |info| info.action);
            tracing::error!(gpu, xid = code, action, "GPU {gpu}: XID {}", describe_xid(code));
        }
        None => tracing::error!(gpu, "GPU {gpu}: XID error of unknown type (NVML reported 999)"),
    }
}

/// How long one `nvmlEventSetWait` blocks; bounds how long [`XidWatcher::stop`] waits.
const WAIT_MS: u32 = 500;

/// The running XID watch thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct XidWatcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl XidWatcher {
    /// Starts the watch thread over every GPU NVML lists. Returns `None` (and logs why) when
    /// no GPU supports XID events, so no idle thread is left around.
    pub(crate) fn start(nvml: Arc<Nvml>, counters: XidCounters) -> Option<XidWatcher> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<bool>();
        let thread_stop = stop.clone();
        let spawned = std::thread::Builder::new().name("llmd-xid-watch".into()).spawn(move || {
            // The event set borrows the Nvml handle, so both live on this thread.
            let Some(set) = register_all(&nvml) else {
                let _ = ready_tx.send(false);
                return;
            };
            let _ = ready_tx.send(true);
            watch_loop(&set, &counters, &thread_stop);
        });
        let thread = match spawned {
            Ok(thread) => thread,
            Err(e) => {
                tracing::warn!("cannot start the XID watch thread: {e}");
                return None;
            }
        };
        if ready_rx.recv().unwrap_or(false) {
            Some(XidWatcher { stop, thread: Some(thread) })
        } else {
            let _ = thread.join();
            None
        }
    }

    /// Stops the thread and waits for it (at most one NVML wait period).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for XidWatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

fn register_all(nvml: &Nvml) -> Option<nvml_wrapper::EventSet<'_>> {
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("XID watch disabled: cannot count GPUs: {e}");
            return None;
        }
    };
    let mut set = match nvml.create_event_set() {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!("XID watch disabled: cannot create an NVML event set: {e}");
            return None;
        }
    };
    let mut registered = 0;
    for index in 0..count {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("XID watch: skipping GPU {index}: {e}");
                continue;
            }
        };
        let supported = device.supported_event_types().map(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !matches!(supported, Ok(true)) {
            tracing::warn!("XID watch: GPU {index} does not report XID events");
            continue;
        }
        // `register_events` consumes the set and hands it back; on failure it is gone, so
        // start a fresh one for the remaining GPUs.
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                tracing::warn!("XID watch: cannot register GPU {index}: {}", e.error);
                set = match nvml.create_event_set() {
                    Ok(s) => s,
                    Err(_) => return None,
                };
            }
        }
    }
    if registered == 0 {
        tracing::warn!("XID watch disabled: no GPU accepted XID event registration");
        return None;
    }
    tracing::info!("watching XID errors on {registered} GPU(s)");
    Some(set)
}

fn watch_loop(set: &nvml_wrapper::EventSet<'_>, counters: &XidCounters, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match set.wait(WAIT_MS) {
            Ok(event) => {
                let gpu = event.device.index().unwrap_or(u32::MAX);
                let code = match event.event_data {
                    Some(XidError::Value(code)) => Some(code),
                    Some(XidError::Unknown) | None => None,
                };
                handle_xid_event(counters, gpu, code);
            }
            Err(NvmlError::Timeout) => {}
            Err(NvmlError::GpuLost) => {
                // A lost GPU keeps failing the wait; log once per period and keep watching
                // the others rather than spinning.
                tracing::error!("XID watch: a GPU has fallen off the bus (NVML GpuLost)");
                std::thread::sleep(std::time::Duration::from_millis(u64::from(WAIT_MS)));
            }
            Err(e) => {
                tracing::warn!("XID watch: event wait failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(u64::from(WAIT_MS)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_the_common_codes() {
        for code in [13, 31, 43, 45, 48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120] {
            assert!(xid_info(code).is_some(), "XID {code} missing from the table");
        }
        assert_eq!(xid_info(79).unwrap().meaning, "GPU has fallen off the bus");
        assert!(xid_info(1).is_none());
    }

    #[test]
    fn table_codes_are_unique() {
        let mut codes: Vec<u64> = XID_TABLE.iter().map(|i| i.code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), XID_TABLE.len());
    }

    #[test]
    fn describe_known_and_unknown() {
        assert_eq!(describe_xid(48), "48 (Double-bit ECC error (DBE))");
        assert_eq!(describe_xid(7), "7 (not in llmd's table; see NVIDIA's XID catalog)");
    }

    #[test]
    fn counters_count_per_gpu_and_keep_last_code() {
        let counters = XidCounters::default();
        handle_xid_event(&counters, 0, Some(13));
        handle_xid_event(&counters, 0, Some(79));
        handle_xid_event(&counters, 0, None);
        handle_xid_event(&counters, 3, Some(48));
        assert_eq!(counters.count(0), 3);
        assert_eq!(counters.last(0), Some(79));
        assert_eq!(counters.count(3), 1);
        assert_eq!(counters.count(1), 0);
        assert_eq!(counters.last(1), None);
        assert_eq!(counters.counts(), BTreeMap::from([(0, 3), (3, 1)]));
        // Clones share the same tallies: the thread and the reporter see one set of counts.
        let clone = counters.clone();
        clone.record(3, Some(94));
        assert_eq!(counters.count(3), 2);
    }
}
