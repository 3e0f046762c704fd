//! `llmctl doctor`: host checks, each with what it saw and how to fix it.
//!
//! Every file read goes through [`DoctorContext::root`] (`/` in production), so tests point the
//! checks at fixture trees holding `proc/`, `sys/`, `dev/`, `etc/` and `run/`. Whatever cannot
//! be read from files is a fact the daemon passes in (the GPU report, the config, the caller)
//! or an injectable probe ([`Probes`]): the `cuInit` call, `systemctl is-active`, the NCCL
//! all-reduce. [`run_checks`] blocks (cuInit, NCCL and the hub connect take seconds): call it
//! from a blocking thread.
//!
//! docs/doctor.md lists every check.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llmd_proto::messages::{CheckResult, CheckStatus, DoctorReport, GpuReport};

use crate::cuda::{
    CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE, CUDA_ERROR_INSUFFICIENT_DRIVER, CUDA_ERROR_NO_DEVICE,
    CUDA_ERROR_SYSTEM_DRIVER_MISMATCH, CUDA_ERROR_SYSTEM_NOT_READY, CudaInit, CudaProbe, format_driver_version,
};
pub use crate::nccl::{NcclOutcome, NcclRun};
use crate::placement::gib;

/// Oldest CUDA version the driver must support: llmd's CUDA backend is built against the
/// CUDA 12 driver API, and Hopper GPUs need CUDA 12.0 (driver R525) anyway.
pub const MIN_CUDA: (u32, u32) = (12, 0);

/// Free space beyond the models' size below which the disk check warns (10 %).
const DISK_HEADROOM_PCT: u64 = 10;

/// Default timeout of the hub reachability check.
pub const HUB_TIMEOUT: Duration = Duration::from_secs(3);

/// Unit name of NVIDIA's fabric manager.
pub const FABRIC_MANAGER_UNIT: &str = "nvidia-fabricmanager.service";

/// Peer-to-peer status of one GPU pair, as NVML reports it ([`crate::Telemetry::p2p_matrix`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P2pPair {
    pub a: u32,
    pub b: u32,
    /// P2P read status: "ok" or why not ("chipset_not_supported", "disabled_by_regkey", ...).
    pub read: String,
    /// P2P write status, same values as `read`.
    pub write: String,
    /// Whether the pair talks over NVLink; `None` when NVML could not say.
    pub nvlink: Option<bool>,
    /// Closest common ancestor as `nvidia-smi topo -m` names it ("PIX", "PHB", "SYS", ...).
    pub topology: Option<String>,
}

/// A configured model for the disk check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredModel {
    pub name: String,
    /// Estimated download size; `None` when unknown (the check then says so).
    pub size_bytes: Option<u64>,
    /// Already in the models dir: needs no more space.
    pub downloaded: bool,
}

/// The parts of the daemon's config that the checks look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorConfig {
    /// Absolute host path of the models dir (read under the root).
    pub models_dir: PathBuf,
    pub models: Vec<ConfiguredModel>,
    /// Address the OpenAI API listens on, e.g. "0.0.0.0:8000".
    pub http_listen: String,
    /// Model hub base URL, e.g. "https://huggingface.co"; `None` skips the check.
    pub hub_endpoint: Option<String>,
    /// Group whose members may load/unload models; `None` skips the membership check.
    pub control_group: Option<String>,
    /// Why the config file is invalid; `None` when it loaded fine.
    pub config_error: Option<String>,
}

impl Default for DoctorConfig {
    fn default() -> Self {
        DoctorConfig {
            models_dir: PathBuf::from("/var/lib/llmd/models"),
            models: Vec::new(),
            http_listen: "127.0.0.1:8000".into(),
            hub_endpoint: Some("https://huggingface.co".into()),
            control_group: Some("llmd".into()),
            config_error: None,
        }
    }
}

/// Who runs `llmctl doctor` (from the control socket's peer credentials).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    /// Primary and supplementary gids that are known; membership listed in /etc/group
    /// counts too.
    pub gids: Vec<u32>,
}

/// The `cuInit` smoke test.
pub type CudaProbeFn = Box<dyn Fn() -> CudaProbe + Send + Sync>;
/// Asks systemd for a unit's state: Ok("active" | "inactive" | "failed" | ...), Err when
/// systemd could not be asked.
pub type UnitStateFn = Box<dyn Fn(&str) -> Result<String, String> + Send + Sync>;
/// Runs the NCCL all-reduce over the given GPU indices.
pub type NcclFn = Box<dyn Fn(&[u32]) -> NcclOutcome + Send + Sync>;

/// Injectable probes: the defaults do the real thing; tests replace them.
pub struct Probes {
    /// The `cuInit` smoke test; default [`crate::cuda::probe_cuda`].
    pub cuda: CudaProbeFn,
    /// `systemctl is-active <unit>`: Ok(stdout word, e.g. "active", "inactive", "failed"),
    /// Err when systemctl could not be run.
    pub unit_state: UnitStateFn,
    /// The NCCL all-reduce over the given GPU indices.
    pub nccl: NcclFn,
    /// Timeout of the hub connect.
    pub hub_timeout: Duration,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes").field("hub_timeout", &self.hub_timeout).finish_non_exhaustive()
    }
}

impl Default for Probes {
    fn default() -> Self {
        Probes {
            cuda: Box::new(crate::cuda::probe_cuda),
            unit_state: Box::new(systemctl_is_active),
            nccl: Box::new(crate::nccl::all_reduce_check),
            hub_timeout: HUB_TIMEOUT,
        }
    }
}

/// Runs `systemctl is-active <unit>` and returns its one-word answer.
pub fn systemctl_is_active(unit: &str) -> Result<String, String> {
    // is-active exits non-zero for inactive units; stdout still holds the state word.
    let out = std::process::Command::new("systemctl")
        .args(["is-active", unit])
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if state.is_empty() { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) } else { Ok(state) }
}

/// Everything the checks look at.
#[derive(Debug)]
pub struct DoctorContext {
    /// Where `/proc`, `/sys`, `/dev`, `/etc` and `/run` are read from; "/" in production.
    pub root: PathBuf,
    /// The daemon's current GPU report.
    pub gpus: GpuReport,
    /// GPU pair P2P statuses from NVML; `None` without NVML.
    pub p2p: Option<Vec<P2pPair>>,
    pub config: DoctorConfig,
    /// `None` when unknown (the membership check is skipped).
    pub caller: Option<Caller>,
    /// Name of the user the daemon runs as (checked for /dev/nvidia* access).
    pub llmd_user: String,
    /// Whether this daemon currently holds the HTTP listen address itself.
    pub http_held_by_llmd: bool,
    /// Skip slow checks (NCCL all-reduce, hub reachability).
    pub quick: bool,
    pub probes: Probes,
}

impl DoctorContext {
    /// A context reading the real host ("/") with the real probes.
    pub fn new(gpus: GpuReport, config: DoctorConfig) -> DoctorContext {
        DoctorContext {
            root: PathBuf::from("/"),
            gpus,
            p2p: None,
            config,
            caller: None,
            llmd_user: "llmd".into(),
            http_held_by_llmd: false,
            quick: false,
            probes: Probes::default(),
        }
    }

    /// `abs` ("/proc/modules") under the root.
    fn path(&self, abs: impl AsRef<Path>) -> PathBuf {
        let abs = abs.as_ref();
        self.root.join(abs.strip_prefix("/").unwrap_or(abs))
    }
}

fn result(name: &str, status: CheckStatus, observed: impl Into<String>, fix: impl Into<String>) -> CheckResult {
    CheckResult { name: name.into(), status, observed: observed.into(), fix: fix.into() }
}
fn pass(name: &str, observed: impl Into<String>) -> CheckResult {
    result(name, CheckStatus::Pass, observed, "")
}
fn skip(name: &str, observed: impl Into<String>) -> CheckResult {
    result(name, CheckStatus::Skip, observed, "")
}
fn warn(name: &str, observed: impl Into<String>, fix: impl Into<String>) -> CheckResult {
    result(name, CheckStatus::Warn, observed, fix)
}
fn fail(name: &str, observed: impl Into<String>, fix: impl Into<String>) -> CheckResult {
    result(name, CheckStatus::Fail, observed, fix)
}

const NO_DRIVER: &str = "skipped: the NVIDIA driver is not loaded";

/// Runs every check in a fixed order. Blocking.
pub fn run_checks(ctx: &DoctorContext) -> DoctorReport {
    let driver = driver_version(ctx);
    let driver_loaded = driver.is_some();
    // The cuInit probe runs once: the CUDA version check uses its cuDriverGetVersion.
    let cuda = driver_loaded.then(|| (ctx.probes.cuda)());
    let checks = vec![
        check_config(ctx),
        check_driver(ctx, driver.as_ref()),
        check_nvml(ctx, driver_loaded),
        check_cuda_version(ctx, driver_loaded, cuda.as_ref()),
        check_cuda_init(cuda.as_ref()),
        check_nvidia_uvm(ctx, driver_loaded),
        check_device_nodes(ctx, driver_loaded),
        check_nouveau(ctx),
        check_persistence(ctx, driver_loaded),
        check_fabric_manager(ctx, cuda.as_ref()),
        check_p2p(ctx),
        check_nccl(ctx),
        check_models_disk(ctx),
        check_control_group(ctx),
        check_http_port(ctx),
        check_hub(ctx),
    ];
    DoctorReport { checks }
}

// ---------------------------------------------------------------------------------------------
// config_valid

fn check_config(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "config_valid";
    match &ctx.config.config_error {
        None => pass(NAME, "config loaded"),
        Some(e) => fail(
            NAME,
            format!("config is invalid: {e}"),
            "fix the file (llmd --check-config), then `systemctl reload llmd`",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// driver_loaded

/// `(version, whole first line)` from /proc/driver/nvidia/version.
fn driver_version(ctx: &DoctorContext) -> Option<(String, String)> {
    let text = std::fs::read_to_string(ctx.path("/proc/driver/nvidia/version")).ok()?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    Some((parse_driver_version(&line).unwrap_or_else(|| "unknown".into()), line))
}

/// Finds "550.54.15" in "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar ...".
fn parse_driver_version(line: &str) -> Option<String> {
    line.split_whitespace()
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

fn check_driver(ctx: &DoctorContext, driver: Option<&(String, String)>) -> CheckResult {
    const NAME: &str = "driver_loaded";
    match driver {
        Some((version, line)) => {
            let flavor = if line.contains("Open Kernel Module") { " (open kernel module)" } else { "" };
            pass(NAME, format!("NVIDIA driver {version}{flavor} loaded"))
        }
        None => fail(
            NAME,
            format!(
                "{} is missing: the NVIDIA kernel driver is not loaded; llmd serves on the CPU",
                ctx.path("/proc/driver/nvidia/version").display()
            ),
            "install the NVIDIA datacenter driver (e.g. `apt install nvidia-driver-570-server-open`) and `modprobe nvidia`, or reboot",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// nvml

fn check_nvml(ctx: &DoctorContext, driver_loaded: bool) -> CheckResult {
    const NAME: &str = "nvml";
    if !driver_loaded {
        return skip(NAME, NO_DRIVER);
    }
    if let Some(reason) = &ctx.gpus.unavailable {
        let fix = if reason.contains("mismatch") {
            "the kernel module and libnvidia-ml differ (driver upgraded without reboot): reboot, or unload and reload the nvidia modules"
        } else if reason.contains("permission") {
            "give the llmd user access to /dev/nvidia* (see the device_nodes check)"
        } else {
            "install the driver's user-space libraries (libnvidia-ml.so.1, e.g. package libnvidia-compute-<version>) and run `ldconfig`"
        };
        return fail(NAME, format!("NVML unavailable: {reason}"), fix);
    }
    if ctx.gpus.gpus.is_empty() {
        return fail(
            NAME,
            "NVML lists no GPU",
            "check `lspci | grep -i nvidia`; a GPU bound to vfio-pci or hidden by the container runtime is invisible to NVML",
        );
    }
    let names: BTreeSet<&str> = ctx.gpus.gpus.iter().map(|g| g.name.as_str()).collect();
    pass(NAME, format!("{} GPU(s): {}", ctx.gpus.gpus.len(), names.into_iter().collect::<Vec<_>>().join(", ")))
}

// ---------------------------------------------------------------------------------------------
// cuda_version

fn parse_major_minor(s: &str) -> Option<(u32, u32)> {
    let mut it = s.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

fn check_cuda_version(ctx: &DoctorContext, driver_loaded: bool, cuda: Option<&CudaProbe>) -> CheckResult {
    const NAME: &str = "cuda_version";
    if !driver_loaded {
        return skip(NAME, NO_DRIVER);
    }
    let version =
        ctx.gpus.cuda_driver_version.clone().or_else(|| cuda.and_then(|c| c.driver_version).map(format_driver_version));
    let Some(text) = version else {
        return warn(
            NAME,
            "could not read the CUDA version the driver supports (neither NVML nor libcuda answered)",
            "see the nvml and cuda_init checks",
        );
    };
    let need = format!("{}.{}", MIN_CUDA.0, MIN_CUDA.1);
    match parse_major_minor(&text) {
        Some(v) if v >= MIN_CUDA => pass(NAME, format!("driver supports CUDA {text}; llmd needs {need} or newer")),
        Some(_) => fail(
            NAME,
            format!("driver supports CUDA {text}; llmd needs {need} or newer"),
            "upgrade the NVIDIA driver to R525 or newer (R570+ recommended)",
        ),
        None => warn(NAME, format!("unrecognized CUDA version `{text}`"), "check `nvidia-smi` output"),
    }
}

// ---------------------------------------------------------------------------------------------
// cuda_init

fn check_cuda_init(cuda: Option<&CudaProbe>) -> CheckResult {
    const NAME: &str = "cuda_init";
    let Some(probe) = cuda else { return skip(NAME, NO_DRIVER) };
    match &probe.init {
        CudaInit::Ok { devices } => pass(NAME, format!("cuInit succeeded; {devices} CUDA device(s)")),
        CudaInit::LibraryMissing(e) => fail(
            NAME,
            format!("cannot load the CUDA driver library: {e}"),
            "install the driver's CUDA library (package libnvidia-compute-<version>, or the nvidia-container-toolkit inside containers) and run `ldconfig`",
        ),
        CudaInit::SymbolMissing(sym) => fail(
            NAME,
            format!("the CUDA driver library has no `{sym}`: not a real CUDA driver library"),
            "remove stub libcuda copies from LD_LIBRARY_PATH (e.g. .../cuda/lib64/stubs) and reinstall the driver",
        ),
        CudaInit::Failed { code, name } => {
            let observed = format!("cuInit failed: {name} ({code})");
            let fix = match *code {
                CUDA_ERROR_SYSTEM_NOT_READY => {
                    "start nvidia-fabricmanager: `systemctl enable --now nvidia-fabricmanager` (its version must match the driver's)"
                }
                CUDA_ERROR_NO_DEVICE => {
                    "no CUDA device is visible: check CUDA_VISIBLE_DEVICES, the container's GPU access, and `nvidia-smi`"
                }
                CUDA_ERROR_SYSTEM_DRIVER_MISMATCH | CUDA_ERROR_INSUFFICIENT_DRIVER => {
                    "libcuda and the kernel module differ (driver upgraded without reboot): reboot, or reload the nvidia modules"
                }
                CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
                    "a CUDA forward-compatibility libcuda is in use on a GPU that does not support it: remove cuda-compat from LD_LIBRARY_PATH"
                }
                _ => "check `dmesg | grep -i -e nvrm -e xid` for driver errors; reset the GPU or reboot",
            };
            fail(NAME, observed, fix)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// kernel modules

/// Whether a kernel module is loaded, from /proc/modules or /sys/module/<name>; `None` when
/// neither can be read.
fn module_loaded(ctx: &DoctorContext, name: &str) -> Option<bool> {
    let in_proc = std::fs::read_to_string(ctx.path("/proc/modules"))
        .ok()
        .map(|text| text.lines().any(|l| l.split_whitespace().next() == Some(name)));
    let sys_module = ctx.path("/sys/module");
    let in_sys = sys_module.is_dir().then(|| sys_module.join(name).exists());
    match (in_proc, in_sys) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(false) || b.unwrap_or(false)),
    }
}

fn check_nvidia_uvm(ctx: &DoctorContext, driver_loaded: bool) -> CheckResult {
    const NAME: &str = "nvidia_uvm";
    if !driver_loaded {
        return skip(NAME, NO_DRIVER);
    }
    match module_loaded(ctx, "nvidia_uvm") {
        Some(true) => pass(NAME, "nvidia_uvm is loaded"),
        Some(false) => fail(
            NAME,
            "nvidia_uvm is not loaded: CUDA cannot allocate memory",
            "`sudo modprobe nvidia_uvm` (or `sudo nvidia-modprobe -u -c=0`); add it to /etc/modules-load.d/ to survive reboots",
        ),
        None => warn(
            NAME,
            "cannot read /proc/modules or /sys/module",
            "run doctor on the host, not in a restricted container",
        ),
    }
}

fn check_nouveau(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "nouveau";
    let mut loaded = Vec::new();
    let mut unknown = false;
    for module in ["nouveau", "nova_core"] {
        match module_loaded(ctx, module) {
            Some(true) => loaded.push(module),
            Some(false) => {}
            None => unknown = true,
        }
    }
    if !loaded.is_empty() {
        return fail(
            NAME,
            format!("{} loaded: it claims the GPUs before the NVIDIA driver", loaded.join(" and ")),
            "blacklist it: `echo -e 'blacklist nouveau\\nblacklist nova_core\\noptions nouveau modeset=0' | sudo tee /etc/modprobe.d/blacklist-nouveau.conf && sudo update-initramfs -u`, then reboot",
        );
    }
    if unknown {
        return warn(
            NAME,
            "cannot read /proc/modules or /sys/module",
            "run doctor on the host, not in a restricted container",
        );
    }
    pass(NAME, "nouveau and nova_core are not loaded")
}

// ---------------------------------------------------------------------------------------------
// device_nodes

/// A user resolved from /etc/passwd and /etc/group under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UserIds {
    uid: u32,
    gids: BTreeSet<u32>,
}

/// `(name, uid, gid)` rows of /etc/passwd.
fn passwd_entries(ctx: &DoctorContext) -> Vec<(String, u32, u32)> {
    let text = std::fs::read_to_string(ctx.path("/etc/passwd")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
        })
        .collect()
}

/// `(name, gid, members)` rows of /etc/group.
fn group_entries(ctx: &DoctorContext) -> Vec<(String, u32, Vec<String>)> {
    let text = std::fs::read_to_string(ctx.path("/etc/group")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let members = f
                .get(3)
                .map_or(Vec::new(), |m| m.split(',').filter(|s| !s.is_empty()).map(|s| s.trim().to_string()).collect());
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members))
        })
        .collect()
}

fn resolve_user(ctx: &DoctorContext, name: &str) -> Option<UserIds> {
    let (_, uid, gid) = passwd_entries(ctx).into_iter().find(|(n, _, _)| n == name)?;
    let mut gids = BTreeSet::from([gid]);
    gids.extend(group_entries(ctx).into_iter().filter(|(_, _, m)| m.iter().any(|m| m == name)).map(|(_, g, _)| g));
    Some(UserIds { uid, gids })
}

fn group_name(ctx: &DoctorContext, gid: u32) -> String {
    group_entries(ctx).into_iter().find(|(_, g, _)| *g == gid).map_or_else(|| gid.to_string(), |(n, _, _)| n)
}

/// Whether `user` may open a node with this owner/group/mode for reading and writing.
fn can_read_write(user: &UserIds, uid: u32, gid: u32, mode: u32) -> bool {
    if user.uid == 0 {
        return true;
    }
    let bits = if user.uid == uid {
        (mode >> 6) & 0o7
    } else if user.gids.contains(&gid) {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    bits & 0o6 == 0o6
}

fn check_device_nodes(ctx: &DoctorContext, driver_loaded: bool) -> CheckResult {
    const NAME: &str = "device_nodes";
    if !driver_loaded {
        return skip(NAME, NO_DRIVER);
    }
    let dev = ctx.path("/dev");
    let mut nodes: Vec<String> = vec!["nvidiactl".into(), "nvidia-uvm".into()];
    if ctx.gpus.gpus.is_empty() {
        // Without NVML, check whatever GPU nodes exist (at least one is required).
        let mut found: Vec<String> = std::fs::read_dir(&dev)
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| {
                        n.strip_prefix("nvidia").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        if found.is_empty() {
            found.push("nvidia0".into());
        }
        nodes.extend(found);
    } else {
        nodes.extend(ctx.gpus.gpus.iter().map(|g| format!("nvidia{}", g.index)));
    }

    let user_note;
    let user = if ctx.llmd_user == "root" {
        user_note = String::new();
        Some(UserIds { uid: 0, gids: BTreeSet::from([0]) })
    } else {
        user_note = format!(" for user {}", ctx.llmd_user);
        resolve_user(ctx, &ctx.llmd_user)
    };

    let mut missing = Vec::new();
    let mut denied = Vec::new();
    for node in &nodes {
        match std::fs::metadata(dev.join(node)) {
            Err(_) => missing.push(format!("/dev/{node}")),
            Ok(meta) => {
                if let Some(user) = &user
                    && !can_read_write(user, meta.uid(), meta.gid(), meta.mode())
                {
                    denied.push((format!("/dev/{node}"), meta.gid(), meta.mode() & 0o777));
                }
            }
        }
    }
    if !missing.is_empty() {
        return fail(
            NAME,
            format!("missing: {}", missing.join(", ")),
            "create the nodes: `sudo nvidia-modprobe -u -c=0` (and -c=N per GPU); inside containers, pass the devices (nvidia-container-toolkit / CDI)",
        );
    }
    let Some(_) = user else {
        return warn(
            NAME,
            format!(
                "{} present, but user `{}` is not in /etc/passwd so access was not checked",
                nodes.join(", "),
                ctx.llmd_user
            ),
            "create the service user (`sudo useradd --system --groups video llmd`) or fix the configured user name",
        );
    };
    if !denied.is_empty() {
        let list: Vec<String> = denied
            .iter()
            .map(|(path, gid, mode)| format!("{path} (group {}, mode {mode:o})", group_name(ctx, *gid)))
            .collect();
        let group = group_name(ctx, denied[0].1);
        return fail(
            NAME,
            format!("not readable and writable{user_note}: {}", list.join(", ")),
            format!(
                "add the user to the nodes' group: `sudo usermod -aG {group} {}`, or set NVreg_DeviceFileMode=0666 in /etc/modprobe.d/nvidia.conf",
                ctx.llmd_user
            ),
        );
    }
    pass(
        NAME,
        format!(
            "{} present and accessible{user_note}",
            nodes.iter().map(|n| format!("/dev/{n}")).collect::<Vec<_>>().join(", ")
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// persistence_mode

fn check_persistence(ctx: &DoctorContext, driver_loaded: bool) -> CheckResult {
    const NAME: &str = "persistence_mode";
    if !driver_loaded {
        return skip(NAME, NO_DRIVER);
    }
    if ctx.gpus.gpus.is_empty() {
        return skip(NAME, "skipped: NVML lists no GPU");
    }
    let off: Vec<String> =
        ctx.gpus.gpus.iter().filter(|g| g.persistence_mode == Some(false)).map(|g| g.index.to_string()).collect();
    let unknown = ctx.gpus.gpus.iter().filter(|g| g.persistence_mode.is_none()).count();
    if !off.is_empty() {
        return warn(
            NAME,
            format!(
                "persistence mode is off on GPU {}: each CUDA start re-initializes the GPU (seconds)",
                off.join(", ")
            ),
            "`sudo systemctl enable --now nvidia-persistenced` (or `sudo nvidia-smi -pm 1`)",
        );
    }
    if unknown == ctx.gpus.gpus.len() {
        return skip(NAME, "NVML does not report persistence mode on these GPUs");
    }
    pass(NAME, format!("persistence mode on for {} GPU(s)", ctx.gpus.gpus.len() - unknown))
}

// ---------------------------------------------------------------------------------------------
// fabric_manager

/// NVSwitch-based systems (HGX/DGX 8-GPU boards) expose the nvswitch driver.
fn nvswitch_present(ctx: &DoctorContext) -> Option<String> {
    let proc = ctx.path("/proc/driver/nvidia-nvswitch");
    if proc.exists() {
        return Some("/proc/driver/nvidia-nvswitch".into());
    }
    let dev = std::fs::read_dir(ctx.path("/dev")).ok()?;
    let mut nodes: Vec<String> = dev
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("nvidia-nvswitch"))
        .collect();
    nodes.sort();
    nodes.first().map(|n| format!("/dev/{n}"))
}

fn check_fabric_manager(ctx: &DoctorContext, cuda: Option<&CudaProbe>) -> CheckResult {
    const NAME: &str = "fabric_manager";
    let Some(evidence) = nvswitch_present(ctx) else {
        return skip(NAME, "no NVSwitch found; the fabric manager is not needed");
    };
    let fix = "`sudo systemctl enable --now nvidia-fabricmanager` (install nvidia-fabricmanager-<driver branch>; its version must match the driver's exactly)";
    // On NVSwitch systems cuInit answers 802 until the fabric is trained, so a successful
    // cuInit proves the fabric is up even where the manager runs outside this machine
    // (GPU pass-through VMs, where the hypervisor runs it).
    let cuda_ok = matches!(cuda.map(|c| &c.init), Some(CudaInit::Ok { .. }));
    let cuda_802 = matches!(cuda.map(|c| &c.init), Some(CudaInit::Failed { code: CUDA_ERROR_SYSTEM_NOT_READY, .. }));
    let state = match (ctx.probes.unit_state)(FABRIC_MANAGER_UNIT) {
        Ok(state) => state,
        Err(e) => {
            // Without systemctl (containers), systemd's runtime record of running units is
            // the next best witness.
            let record = ctx.path(format!("/run/systemd/units/invocation:{FABRIC_MANAGER_UNIT}"));
            if record.exists() {
                "active".into()
            } else if cuda_ok {
                return pass(
                    NAME,
                    format!(
                        "NVSwitch present ({evidence}); cuInit succeeded, so the fabric is up (systemd not reachable: {e})"
                    ),
                );
            } else {
                return warn(
                    NAME,
                    format!("NVSwitch present ({evidence}); cannot tell whether nvidia-fabricmanager runs: {e}"),
                    fix,
                );
            }
        }
    };
    if state == "active" {
        pass(NAME, format!("NVSwitch present ({evidence}); nvidia-fabricmanager is active"))
    } else if cuda_ok {
        pass(
            NAME,
            format!(
                "NVSwitch present ({evidence}); nvidia-fabricmanager is {state} here, but cuInit succeeded: the fabric is managed elsewhere (e.g. by the hypervisor)"
            ),
        )
    } else {
        let consequence =
            if cuda_802 { "cuInit fails with error 802" } else { "CUDA fails with error 802 until it runs" };
        fail(NAME, format!("NVSwitch present ({evidence}) but nvidia-fabricmanager is {state}: {consequence}"), fix)
    }
}

// ---------------------------------------------------------------------------------------------
// p2p

fn check_p2p(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "p2p";
    let n = ctx.gpus.gpus.len();
    if n <= 1 {
        return skip(NAME, format!("{n} GPU(s): peer-to-peer does not apply"));
    }
    let Some(pairs) = &ctx.p2p else {
        return skip(NAME, "NVML unavailable: cannot read the P2P matrix");
    };
    let bad: Vec<&P2pPair> = pairs.iter().filter(|p| p.read != "ok" || p.write != "ok").collect();
    let nvlink = pairs.iter().filter(|p| p.nvlink == Some(true)).count();
    let mut matrix = String::new();
    for p in pairs {
        let link = if p.nvlink == Some(true) {
            "NVLink".to_string()
        } else {
            p.topology.clone().unwrap_or_else(|| "?".into())
        };
        let status = if p.read == "ok" && p.write == "ok" {
            "ok".to_string()
        } else if p.read == p.write {
            p.read.clone()
        } else {
            format!("read {}, write {}", p.read, p.write)
        };
        let _ = write!(matrix, "; {}-{}: {status} ({link})", p.a, p.b);
    }
    if bad.is_empty() {
        pass(NAME, format!("{n} GPUs, all {} pairs P2P ok, {nvlink} over NVLink{matrix}", pairs.len()))
    } else {
        warn(
            NAME,
            format!(
                "{} of {} GPU pairs cannot use P2P; tensor-parallel traffic goes through host memory{matrix}",
                bad.len(),
                pairs.len()
            ),
            "disable ACS on PCIe switches and IOMMU (or set iommu=pt) in BIOS/kernel command line; `nvidia-smi topo -p2p rw` shows the matrix; on NVLink systems check `nvidia-smi nvlink -s` and the fabric manager",
        )
    }
}

// ---------------------------------------------------------------------------------------------
// nccl_all_reduce

fn check_nccl(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "nccl_all_reduce";
    let gpus: Vec<u32> = ctx.gpus.gpus.iter().map(|g| g.index).collect();
    if gpus.len() <= 1 {
        return skip(NAME, format!("{} GPU(s): no collective to test", gpus.len()));
    }
    if ctx.quick {
        return skip(NAME, "skipped in quick mode");
    }
    match (ctx.probes.nccl)(&gpus) {
        NcclOutcome::Unsupported(reason) => skip(NAME, reason),
        NcclOutcome::Failed(e) => fail(
            NAME,
            format!("NCCL all-reduce over GPUs {gpus:?} failed: {e}"),
            "run with NCCL_DEBUG=INFO to see the transport; check the p2p and fabric_manager checks and that libnccl.so.2 is installed",
        ),
        NcclOutcome::Ran(run) => {
            let measured = format!(
                "{}: all-reduce of {} over {} GPUs: bus bandwidth {:.1} GB/s (algorithm {:.1} GB/s)",
                run.nccl,
                gib(run.bytes),
                run.gpus.len(),
                run.bus_bw_gbps,
                run.alg_bw_gbps
            );
            if run.correct {
                pass(NAME, format!("{measured}; sum correct"))
            } else {
                fail(
                    NAME,
                    format!("{measured}; WRONG SUM: {}", run.mismatch.as_deref().unwrap_or("values differ")),
                    "GPU-to-GPU transfers corrupt data: check `dmesg` for XID 74/NVLink errors, update the driver, and run `nvidia-smi -q -d ECC`; try NCCL_P2P_DISABLE=1 to isolate P2P",
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// models_disk

/// Free bytes available to unprivileged users on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Result<u64, String> {
    let stat = nix::sys::statvfs::statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    #[allow(clippy::unnecessary_cast)] // the field types differ between libc targets
    Ok(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

fn check_models_disk(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "models_disk";
    let dir = &ctx.config.models_dir;
    let mut probe = ctx.path(dir);
    // The models dir may not exist before the first pull; its filesystem is the nearest
    // existing ancestor's.
    let mut note = String::new();
    while !probe.exists() {
        match probe.parent() {
            Some(parent) => probe = parent.to_path_buf(),
            None => break,
        }
        note = " (does not exist yet)".into();
    }
    let free = match free_bytes(&probe) {
        Ok(free) => free,
        Err(e) => {
            return warn(
                NAME,
                format!("cannot read free space for {}: {e}", dir.display()),
                "check that the models dir is on a mounted filesystem",
            );
        }
    };
    let pending: Vec<&ConfiguredModel> = ctx.config.models.iter().filter(|m| !m.downloaded).collect();
    let need: u64 = pending.iter().filter_map(|m| m.size_bytes).sum();
    let unknown: Vec<&str> = pending.iter().filter(|m| m.size_bytes.is_none()).map(|m| m.name.as_str()).collect();
    let unknown_note =
        if unknown.is_empty() { String::new() } else { format!("; size unknown for {}", unknown.join(", ")) };
    let observed = format!(
        "{} free in {}{note}; configured models not yet downloaded need {}{unknown_note}",
        gib(free),
        dir.display(),
        gib(need)
    );
    let fix = "free space there, or point models_dir at a larger disk (and move the existing models)";
    if free < need {
        fail(NAME, format!("{observed}: {} short", gib(need - free)), fix)
    } else if free - need < need / 100 * DISK_HEADROOM_PCT {
        warn(NAME, format!("{observed}: less than {DISK_HEADROOM_PCT}% headroom"), fix)
    } else {
        pass(NAME, observed)
    }
}

// ---------------------------------------------------------------------------------------------
// control_group

fn check_control_group(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "control_group";
    let Some(group) = &ctx.config.control_group else {
        return skip(NAME, "no control group configured: only root and the llmd user may load/unload");
    };
    let Some(caller) = &ctx.caller else {
        return skip(NAME, "caller unknown");
    };
    let fix_add = format!("`sudo usermod -aG {group} $USER`, then log in again (or `newgrp {group}`)");
    let Some((_, gid, members)) = group_entries(ctx).into_iter().find(|(n, _, _)| n == group) else {
        return warn(
            NAME,
            format!("group `{group}` does not exist, so only root and the llmd user may load/unload"),
            format!("`sudo groupadd --system {group}`, then {fix_add}"),
        );
    };
    if caller.uid == 0 {
        return pass(NAME, "caller is root");
    }
    let name = passwd_entries(ctx).into_iter().find(|(_, uid, _)| *uid == caller.uid);
    let primary = name.as_ref().map(|(_, _, g)| *g);
    let listed = name.as_ref().is_some_and(|(n, _, _)| members.contains(n));
    let who = name.as_ref().map_or_else(|| format!("uid {}", caller.uid), |(n, _, _)| n.clone());
    if caller.gids.contains(&gid) || primary == Some(gid) || listed {
        pass(NAME, format!("{who} is in group `{group}`: may load and unload models"))
    } else {
        warn(
            NAME,
            format!("{who} is not in group `{group}`: read-only commands work, load/unload/pull are refused"),
            fix_add,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// http_port

fn check_http_port(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "http_port";
    let listen = &ctx.config.http_listen;
    if ctx.http_held_by_llmd {
        return pass(NAME, format!("{listen} is held by llmd"));
    }
    let addrs: Vec<SocketAddr> = match listen.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return fail(
                NAME,
                format!("`{listen}` is not a listen address: {e}"),
                "set http.listen to host:port, e.g. 0.0.0.0:8000",
            );
        }
    };
    let Some(addr) = addrs.first() else {
        return fail(
            NAME,
            format!("`{listen}` resolves to no address"),
            "set http.listen to host:port, e.g. 0.0.0.0:8000",
        );
    };
    match TcpListener::bind(addr) {
        Ok(_) => pass(NAME, format!("{addr} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => fail(
            NAME,
            format!("{addr} is in use by another process"),
            format!("find it with `sudo ss -ltnp 'sport = :{}'` and stop it, or change http.listen", addr.port()),
        ),
        Err(e) => fail(
            NAME,
            format!("cannot bind {addr}: {e}"),
            "ports below 1024 need CAP_NET_BIND_SERVICE; the host part must be an address of this machine",
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// hub_reachable

/// `(host, port)` of an http(s) URL.
fn url_host_port(url: &str) -> Result<(String, u16), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("`{url}` has no scheme"))?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => 443,
        "http" => 80,
        other => return Err(format!("unsupported scheme `{other}`")),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if authority.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| format!("bad IPv6 host in `{url}`"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port in `{url}`"))?,
            None => default_port,
        };
        return Ok((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_string(), port.parse().map_err(|_| format!("bad port in `{url}`"))?)),
        None => Ok((authority.to_string(), default_port)),
    }
}

fn check_hub(ctx: &DoctorContext) -> CheckResult {
    const NAME: &str = "hub_reachable";
    let Some(url) = &ctx.config.hub_endpoint else {
        return skip(NAME, "no hub endpoint configured");
    };
    if ctx.quick {
        return skip(NAME, "skipped in quick mode");
    }
    let fix = "check DNS, firewall and proxy settings (HTTPS_PROXY); set HF_ENDPOINT to a reachable mirror; offline hosts can copy models into the models dir";
    let (host, port) = match url_host_port(url) {
        Ok(hp) => hp,
        Err(e) => {
            return fail(
                NAME,
                format!("bad hub endpoint: {e}"),
                "set the hub endpoint to a URL like https://huggingface.co",
            );
        }
    };
    let timeout = ctx.probes.hub_timeout;
    let started = Instant::now();
    let addrs = match resolve_with_timeout(&host, port, timeout) {
        Ok(addrs) => addrs,
        Err(e) => return fail(NAME, format!("cannot resolve {host}: {e}"), fix),
    };
    let remaining = timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
    let mut last_err = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, remaining) {
            Ok(_) => {
                return pass(
                    NAME,
                    format!("connected to {host}:{port} ({addr}) in {} ms", started.elapsed().as_millis()),
                );
            }
            Err(e) => last_err = format!("{addr}: {e}"),
        }
    }
    fail(NAME, format!("cannot connect to {host}:{port} within {} ms: {last_err}", timeout.as_millis()), fix)
}

/// getaddrinfo has no timeout of its own; run it on a helper thread and stop waiting.
fn resolve_with_timeout(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let target = (host.to_string(), port);
    std::thread::Builder::new()
        .name("llmd-doctor-dns".into())
        .spawn(move || {
            let _ = tx.send(target.to_socket_addrs().map(|a| a.collect::<Vec<_>>()).map_err(|e| e.to_string()));
        })
        .map_err(|e| e.to_string())?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) if addrs.is_empty() => Err("no address".into()),
        Ok(result) => result,
        Err(_) => Err(format!("DNS lookup timed out after {} ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_version_parsing() {
        assert_eq!(
            parse_driver_version(
                "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024"
            )
            .as_deref(),
            Some("550.54.15")
        );
        assert_eq!(
            parse_driver_version("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build")
                .as_deref(),
            Some("570.86.15")
        );
        assert_eq!(parse_driver_version("garbage"), None);
    }

    #[test]
    fn major_minor_parsing() {
        assert_eq!(parse_major_minor("12.4"), Some((12, 4)));
        assert_eq!(parse_major_minor("13"), Some((13, 0)));
        assert_eq!(parse_major_minor("x.y"), None);
    }

    #[test]
    fn url_parsing() {
        assert_eq!(url_host_port("https://huggingface.co").unwrap(), ("huggingface.co".into(), 443));
        assert_eq!(url_host_port("http://mirror:8080/path?q").unwrap(), ("mirror".into(), 8080));
        assert_eq!(url_host_port("http://[::1]:9/").unwrap(), ("::1".into(), 9));
        assert_eq!(url_host_port("https://u:p@hf-mirror.com").unwrap(), ("hf-mirror.com".into(), 443));
        assert!(url_host_port("ftp://x").is_err());
        assert!(url_host_port("huggingface.co").is_err());
        assert!(url_host_port("https://").is_err());
        assert!(url_host_port("https://h:notaport").is_err());
    }

    #[test]
    fn access_bits() {
        let user = UserIds { uid: 1000, gids: BTreeSet::from([1000, 44]) };
        assert!(can_read_write(&user, 0, 0, 0o666));
        assert!(!can_read_write(&user, 0, 0, 0o660));
        assert!(can_read_write(&user, 0, 44, 0o660));
        assert!(can_read_write(&user, 1000, 0, 0o600));
        assert!(!can_read_write(&user, 1000, 0, 0o066), "owner bits win for the owner");
        assert!(can_read_write(&UserIds { uid: 0, gids: BTreeSet::new() }, 5, 5, 0o000));
    }
}
