//! Every outcome of every doctor check, on fixture trees (tests/fixtures/<host>/ copied into a
//! temp dir, plus /dev nodes, /etc files and dirs made per test) with stubbed probes.

use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use llmd_proto::messages::{CheckResult, CheckStatus, GpuInfo, GpuReport};
use llmd_telemetry::cuda::{CudaInit, CudaProbe};
use llmd_telemetry::doctor::{NcclOutcome, NcclRun};
use llmd_telemetry::{Caller, ConfiguredModel, DoctorConfig, DoctorContext, P2pPair, Probes, run_checks};

use CheckStatus::{Fail, Pass, Skip, Warn};

/// A host tree in a temp dir.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn empty() -> Host {
        Host { dir: tempfile::tempdir().unwrap() }
    }

    fn fixture(name: &str) -> Host {
        let host = Host::empty();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        copy_tree(&src, host.root());
        host
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn mkdir(&self, rel: &str) {
        std::fs::create_dir_all(self.path(rel)).unwrap();
    }

    /// A /dev node stand-in: a plain file owned by the test user with `mode`.
    fn dev(&self, name: &str, mode: u32) {
        self.write(&format!("dev/{name}"), "");
        std::fs::set_permissions(self.path(&format!("dev/{name}")), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The owner uid and gid that files created here get.
    fn owner(&self) -> (u32, u32) {
        let meta = std::fs::metadata(self.root()).unwrap();
        (meta.uid(), meta.gid())
    }

    /// /etc/passwd and /etc/group where `llmd` is a different user than the file owner, the
    /// owner's group (the nodes' group) is called "video", and `llmd` is in it when
    /// `llmd_in_video`. alice is listed in group `llmd`; bob is in no extra group.
    fn users(&self, llmd_in_video: bool) {
        let (uid, gid) = self.owner();
        let owner = if uid == 0 { "root" } else { "owner" };
        let (llmd_uid, llmd_gid) = (uid + 1000, gid + 1000);
        self.write(
            "etc/passwd",
            &format!(
                "{owner}:x:{uid}:{gid}::/home/owner:/bin/sh\nllmd:x:{llmd_uid}:{llmd_gid}:llmd:/var/lib/llmd:/usr/sbin/nologin\nalice:x:{}:{}::/home/alice:/bin/bash\nbob:x:{}:{}::/home/bob:/bin/bash\n",
                uid + 2000,
                gid + 2000,
                uid + 3000,
                gid + 3000
            ),
        );
        let members = if llmd_in_video { "llmd" } else { "" };
        self.write(
            "etc/group",
            &format!(
                "video:x:{gid}:{members}\nllmd:x:{llmd_gid}:alice\nalice:x:{}:\nbob:x:{}:\n",
                gid + 2000,
                gid + 3000
            ),
        );
    }
}

fn copy_tree(src: &Path, dst: &Path) {
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            copy_tree(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
}

fn gpu(index: u32) -> GpuInfo {
    GpuInfo {
        index,
        name: "NVIDIA H100 80GB HBM3".into(),
        persistence_mode: Some(true),
        memory_total_bytes: 80 << 30,
        memory_free_bytes: 79 << 30,
        ..GpuInfo::default()
    }
}

fn report(n: u32) -> GpuReport {
    GpuReport {
        unavailable: None,
        driver_version: Some("550.54.15".into()),
        cuda_driver_version: Some("12.4".into()),
        gpus: (0..n).map(gpu).collect(),
    }
}

fn cuda_ok() -> CudaProbe {
    CudaProbe { driver_version: Some(12040), init: CudaInit::Ok { devices: 8 } }
}

fn nccl_run(correct: bool) -> NcclRun {
    NcclRun {
        nccl: "NCCL 2.21.5 (libnccl.so.2)".into(),
        gpus: vec![0, 1],
        bytes: 128 << 20,
        correct,
        mismatch: (!correct).then(|| "GPU 1 element 7: expected 3, got 2".to_string()),
        alg_bw_gbps: 150.0,
        bus_bw_gbps: 150.0,
    }
}

/// A context on `host` with probes that succeed and no network use (HTTP held by llmd, no hub).
fn ctx(host: &Host, gpus: GpuReport) -> DoctorContext {
    host.mkdir("var/lib/llmd/models");
    let mut ctx = DoctorContext::new(
        gpus,
        DoctorConfig {
            models_dir: PathBuf::from("/var/lib/llmd/models"),
            models: Vec::new(),
            http_listen: "127.0.0.1:8000".into(),
            hub_endpoint: None,
            control_group: Some("llmd".into()),
            config_error: None,
        },
    );
    ctx.root = host.root().to_path_buf();
    ctx.http_held_by_llmd = true;
    ctx.probes = Probes {
        cuda: Box::new(cuda_ok),
        unit_state: Box::new(|_| Ok("active".into())),
        nccl: Box::new(|_| NcclOutcome::Ran(nccl_run(true))),
        hub_timeout: Duration::from_secs(2),
    };
    ctx
}

fn check(ctx: &DoctorContext, name: &str) -> CheckResult {
    let report = run_checks(ctx);
    report.checks.into_iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check named {name}"))
}

#[track_caller]
fn expect(c: &CheckResult, status: CheckStatus, observed_part: &str, fix_part: &str) {
    assert_eq!(c.status, status, "{c:?}");
    assert!(c.observed.contains(observed_part), "observed `{}` lacks `{observed_part}`", c.observed);
    assert!(c.fix.contains(fix_part), "fix `{}` lacks `{fix_part}`", c.fix);
    if status == Pass || status == Skip {
        assert!(c.fix.is_empty(), "no fix on {status:?}: {c:?}");
    } else {
        assert!(!c.fix.is_empty(), "a {status:?} needs a fix: {c:?}");
    }
}

/// The HGX fixture with healthy /dev nodes for `n` GPUs and users set up.
fn healthy(n: u32) -> Host {
    let host = Host::fixture("hgx-h100");
    for node in ["nvidiactl", "nvidia-uvm"] {
        host.dev(node, 0o666);
    }
    for i in 0..n {
        host.dev(&format!("nvidia{i}"), 0o666);
    }
    host.users(true);
    host
}

#[test]
fn healthy_host_passes_everything_that_applies() {
    let host = healthy(2);
    let mut c = ctx(&host, report(2));
    c.p2p = Some(vec![P2pPair {
        a: 0,
        b: 1,
        read: "ok".into(),
        write: "ok".into(),
        nvlink: Some(true),
        topology: Some("SYS".into()),
    }]);
    c.caller = Some(Caller { uid: 0, gids: vec![0] });
    let report = run_checks(&c);
    let names: Vec<&str> = report.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "config_valid",
            "driver_loaded",
            "nvml",
            "cuda_version",
            "cuda_init",
            "nvidia_uvm",
            "device_nodes",
            "nouveau",
            "persistence_mode",
            "fabric_manager",
            "p2p",
            "nccl_all_reduce",
            "models_disk",
            "control_group",
            "http_port",
            "hub_reachable",
        ]
    );
    for check in &report.checks {
        let expected = if check.name == "hub_reachable" { Skip } else { Pass };
        assert_eq!(check.status, expected, "{check:?}");
    }
}

#[test]
fn cpu_only_host_fails_driver_and_skips_gpu_checks_without_probing_cuda() {
    let host = Host::fixture("cpu-only");
    let mut c =
        ctx(&host, GpuReport { unavailable: Some("cannot load libnvidia-ml.so.1".into()), ..GpuReport::default() });
    c.probes.cuda = Box::new(|| panic!("cuInit must not be probed without a driver"));
    let report = run_checks(&c);
    let get = |n: &str| report.checks.iter().find(|c| c.name == n).unwrap().clone();
    expect(&get("driver_loaded"), Fail, "kernel driver is not loaded", "install the NVIDIA");
    for name in ["nvml", "cuda_version", "cuda_init", "nvidia_uvm", "device_nodes", "persistence_mode"] {
        expect(&get(name), Skip, "driver is not loaded", "");
    }
    expect(&get("nouveau"), Pass, "not loaded", "");
    expect(&get("fabric_manager"), Skip, "no NVSwitch", "");
    expect(&get("p2p"), Skip, "0 GPU(s)", "");
    expect(&get("nccl_all_reduce"), Skip, "0 GPU(s)", "");
}

#[test]
fn config_valid_outcomes() {
    let host = healthy(1);
    let mut c = ctx(&host, report(1));
    expect(&check(&c, "config_valid"), Pass, "config loaded", "");
    c.config.config_error = Some("unknown field `modles` at line 3".into());
    expect(&check(&c, "config_valid"), Fail, "unknown field `modles`", "systemctl reload llmd");
}

#[test]
fn driver_loaded_outcomes() {
    let host = healthy(1);
    let c = ctx(&host, report(1));
    expect(&check(&c, "driver_loaded"), Pass, "NVIDIA driver 550.54.15 loaded", "");
    let open = Host::fixture("open-driver-no-uvm");
    expect(&check(&ctx(&open, report(1)), "driver_loaded"), Pass, "570.86.15 (open kernel module)", "");
    let garbled = Host::empty();
    garbled.write("proc/driver/nvidia/version", "something else\n");
    expect(&check(&ctx(&garbled, report(1)), "driver_loaded"), Pass, "driver unknown", "");
    expect(&check(&ctx(&Host::fixture("nouveau"), report(0)), "driver_loaded"), Fail, "not loaded", "modprobe nvidia");
}

#[test]
fn nvml_outcomes() {
    let host = healthy(2);
    expect(&check(&ctx(&host, report(2)), "nvml"), Pass, "2 GPU(s): NVIDIA H100 80GB HBM3", "");
    let unavailable = |reason: &str| GpuReport { unavailable: Some(reason.into()), ..GpuReport::default() };
    expect(
        &check(&ctx(&host, unavailable("NVIDIA driver/library version mismatch")), "nvml"),
        Fail,
        "version mismatch",
        "reboot",
    );
    expect(
        &check(&ctx(&host, unavailable("no permission to talk to the NVIDIA driver")), "nvml"),
        Fail,
        "permission",
        "device_nodes",
    );
    expect(&check(&ctx(&host, unavailable("cannot load libnvidia-ml.so.1")), "nvml"), Fail, "libnvidia-ml", "ldconfig");
    expect(&check(&ctx(&host, report(0)), "nvml"), Fail, "NVML lists no GPU", "lspci");
}

#[test]
fn cuda_version_outcomes() {
    let host = healthy(1);
    expect(&check(&ctx(&host, report(1)), "cuda_version"), Pass, "driver supports CUDA 12.4; llmd needs 12.0", "");

    // NVML unavailable: the version comes from cuDriverGetVersion.
    let mut c = ctx(&host, GpuReport { unavailable: Some("x".into()), ..GpuReport::default() });
    c.probes.cuda = Box::new(|| CudaProbe { driver_version: Some(13000), init: CudaInit::Ok { devices: 1 } });
    expect(&check(&c, "cuda_version"), Pass, "CUDA 13.0", "");

    let mut old = report(1);
    old.cuda_driver_version = Some("11.8".into());
    expect(&check(&ctx(&host, old), "cuda_version"), Fail, "CUDA 11.8; llmd needs 12.0", "R525");

    let mut c = ctx(&host, GpuReport { unavailable: Some("x".into()), ..GpuReport::default() });
    c.probes.cuda = Box::new(|| CudaProbe { driver_version: None, init: CudaInit::LibraryMissing("gone".into()) });
    expect(&check(&c, "cuda_version"), Warn, "could not read", "cuda_init");

    let mut odd = report(1);
    odd.cuda_driver_version = Some("twelve".into());
    expect(&check(&ctx(&host, odd), "cuda_version"), Warn, "unrecognized CUDA version `twelve`", "nvidia-smi");
}

#[test]
fn cuda_init_outcomes() {
    let host = healthy(1);
    expect(&check(&ctx(&host, report(1)), "cuda_init"), Pass, "cuInit succeeded; 8 CUDA device(s)", "");
    let with = |init: CudaInit| {
        let mut c = ctx(&host, report(1));
        c.probes.cuda = Box::new(move || CudaProbe { driver_version: Some(12040), init: init.clone() });
        check(&c, "cuda_init")
    };
    let failed = |code: i32, name: &str| CudaInit::Failed { code, name: name.into() };
    expect(
        &with(failed(802, "CUDA_ERROR_SYSTEM_NOT_READY")),
        Fail,
        "cuInit failed: CUDA_ERROR_SYSTEM_NOT_READY (802)",
        "start nvidia-fabricmanager",
    );
    expect(&with(failed(100, "CUDA_ERROR_NO_DEVICE")), Fail, "(100)", "CUDA_VISIBLE_DEVICES");
    expect(&with(failed(803, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH")), Fail, "(803)", "reboot");
    expect(&with(failed(35, "CUDA_ERROR_INSUFFICIENT_DRIVER")), Fail, "(35)", "reboot");
    expect(&with(failed(804, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE")), Fail, "(804)", "cuda-compat");
    expect(&with(failed(999, "CUDA_ERROR_UNKNOWN")), Fail, "(999)", "dmesg");
    expect(
        &with(CudaInit::LibraryMissing("libcuda.so.1: cannot open shared object file".into())),
        Fail,
        "cannot load the CUDA driver library: libcuda.so.1: cannot open",
        "libnvidia-compute",
    );
    expect(&with(CudaInit::SymbolMissing("cuInit".into())), Fail, "has no `cuInit`", "stubs");
}

#[test]
fn nvidia_uvm_outcomes() {
    expect(&check(&ctx(&healthy(1), report(1)), "nvidia_uvm"), Pass, "nvidia_uvm is loaded", "");
    expect(
        &check(&ctx(&Host::fixture("open-driver-no-uvm"), report(1)), "nvidia_uvm"),
        Fail,
        "not loaded",
        "modprobe nvidia_uvm",
    );

    // /proc/modules unreadable but /sys/module says it is there (e.g. a built-in module).
    let sys_only = Host::fixture("open-driver-no-uvm");
    std::fs::remove_file(sys_only.path("proc/modules")).unwrap();
    sys_only.mkdir("sys/module/nvidia_uvm");
    expect(&check(&ctx(&sys_only, report(1)), "nvidia_uvm"), Pass, "loaded", "");

    let unreadable = Host::fixture("open-driver-no-uvm");
    std::fs::remove_file(unreadable.path("proc/modules")).unwrap();
    expect(
        &check(&ctx(&unreadable, report(1)), "nvidia_uvm"),
        Warn,
        "cannot read /proc/modules",
        "restricted container",
    );
}

#[test]
fn nouveau_outcomes() {
    expect(&check(&ctx(&healthy(1), report(1)), "nouveau"), Pass, "not loaded", "");
    expect(&check(&ctx(&Host::fixture("nouveau"), report(0)), "nouveau"), Fail, "nouveau loaded", "blacklist nouveau");
    let nova = Host::fixture("cpu-only");
    nova.mkdir("sys/module/nova_core");
    expect(&check(&ctx(&nova, report(0)), "nouveau"), Fail, "nova_core loaded", "blacklist nova_core");
    expect(&check(&ctx(&Host::empty(), report(0)), "nouveau"), Warn, "cannot read", "restricted container");
}

#[test]
fn device_nodes_outcomes() {
    expect(
        &check(&ctx(&healthy(2), report(2)), "device_nodes"),
        Pass,
        "/dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia0, /dev/nvidia1 present and accessible for user llmd",
        "",
    );

    let missing = healthy(1);
    expect(&check(&ctx(&missing, report(2)), "device_nodes"), Fail, "missing: /dev/nvidia1", "nvidia-modprobe");

    // Group-only access (0660) and llmd not in the nodes' group.
    let denied = Host::fixture("hgx-h100");
    for node in ["nvidiactl", "nvidia-uvm", "nvidia0"] {
        denied.dev(node, 0o660);
    }
    denied.users(false);
    expect(
        &check(&ctx(&denied, report(1)), "device_nodes"),
        Fail,
        "not readable and writable for user llmd: /dev/nvidiactl (group video, mode 660)",
        "usermod -aG video llmd",
    );
    // The same nodes pass once llmd is in the group.
    denied.users(true);
    expect(&check(&ctx(&denied, report(1)), "device_nodes"), Pass, "accessible for user llmd", "");

    // Mode 0600 is only for the owner; root may open anything.
    let owner_only = healthy(1);
    owner_only.dev("nvidia0", 0o600);
    expect(&check(&ctx(&owner_only, report(1)), "device_nodes"), Fail, "/dev/nvidia0", "NVreg_DeviceFileMode");
    let mut as_root = ctx(&owner_only, report(1));
    as_root.llmd_user = "root".into();
    expect(&check(&as_root, "device_nodes"), Pass, "present and accessible", "");

    let plain = healthy(1);
    let mut unknown_user = ctx(&plain, report(1));
    unknown_user.llmd_user = "llmd-svc".into();
    expect(&check(&unknown_user, "device_nodes"), Warn, "user `llmd-svc` is not in /etc/passwd", "useradd");

    // Without NVML the GPU nodes present in /dev are checked.
    let no_nvml = healthy(3);
    let c = ctx(&no_nvml, GpuReport { unavailable: Some("x".into()), ..GpuReport::default() });
    expect(&check(&c, "device_nodes"), Pass, "/dev/nvidia0, /dev/nvidia1, /dev/nvidia2 present", "");
    let none = Host::fixture("hgx-h100");
    none.users(true);
    let c = ctx(&none, GpuReport { unavailable: Some("x".into()), ..GpuReport::default() });
    expect(
        &check(&c, "device_nodes"),
        Fail,
        "missing: /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia0",
        "nvidia-modprobe",
    );
}

#[test]
fn persistence_mode_outcomes() {
    let host = healthy(2);
    expect(&check(&ctx(&host, report(2)), "persistence_mode"), Pass, "persistence mode on for 2 GPU(s)", "");
    let mut off = report(2);
    off.gpus[1].persistence_mode = Some(false);
    expect(&check(&ctx(&host, off), "persistence_mode"), Warn, "off on GPU 1", "nvidia-persistenced");
    let mut unknown = report(2);
    unknown.gpus.iter_mut().for_each(|g| g.persistence_mode = None);
    expect(&check(&ctx(&host, unknown), "persistence_mode"), Skip, "does not report", "");
    expect(&check(&ctx(&host, report(0)), "persistence_mode"), Skip, "lists no GPU", "");
}

#[test]
fn fabric_manager_outcomes() {
    let host = healthy(1);
    expect(
        &check(&ctx(&host, report(1)), "fabric_manager"),
        Pass,
        "NVSwitch present (/proc/driver/nvidia-nvswitch); nvidia-fabricmanager is active",
        "",
    );
    let not_ready = || CudaProbe {
        driver_version: Some(12040),
        init: CudaInit::Failed { code: 802, name: "CUDA_ERROR_SYSTEM_NOT_READY".into() },
    };

    let mut inactive = ctx(&host, report(1));
    inactive.probes.cuda = Box::new(not_ready);
    inactive.probes.unit_state = Box::new(|unit| {
        assert_eq!(unit, "nvidia-fabricmanager.service");
        Ok("failed".into())
    });
    expect(
        &check(&inactive, "fabric_manager"),
        Fail,
        "nvidia-fabricmanager is failed: cuInit fails with error 802",
        "systemctl enable --now nvidia-fabricmanager",
    );
    // Inactive here but CUDA works: the fabric is managed outside (pass-through VM).
    inactive.probes.cuda = Box::new(cuda_ok);
    expect(&check(&inactive, "fabric_manager"), Pass, "is failed here, but cuInit succeeded", "");

    let mut no_systemctl = ctx(&host, report(1));
    no_systemctl.probes.cuda = Box::new(not_ready);
    no_systemctl.probes.unit_state = Box::new(|_| Err("cannot run systemctl: No such file or directory".into()));
    expect(
        &check(&no_systemctl, "fabric_manager"),
        Warn,
        "cannot tell whether nvidia-fabricmanager runs",
        "nvidia-fabricmanager",
    );
    no_systemctl.probes.cuda = Box::new(cuda_ok);
    expect(&check(&no_systemctl, "fabric_manager"), Pass, "cuInit succeeded, so the fabric is up", "");
    no_systemctl.probes.cuda = Box::new(not_ready);
    host.write("run/systemd/units/invocation:nvidia-fabricmanager.service", "");
    expect(&check(&no_systemctl, "fabric_manager"), Pass, "nvidia-fabricmanager is active", "");

    // NVSwitch seen through its device node only; cuInit not yet answering either.
    let dev_only = Host::fixture("open-driver-no-uvm");
    dev_only.dev("nvidia-nvswitchctl", 0o666);
    let mut c = ctx(&dev_only, report(1));
    c.probes.cuda = Box::new(|| CudaProbe { driver_version: None, init: CudaInit::LibraryMissing("x".into()) });
    c.probes.unit_state = Box::new(|_| Ok("inactive".into()));
    expect(
        &check(&c, "fabric_manager"),
        Fail,
        "NVSwitch present (/dev/nvidia-nvswitchctl) but nvidia-fabricmanager is inactive: CUDA fails with error 802 until it runs",
        "nvidia-fabricmanager",
    );

    let plain = Host::fixture("open-driver-no-uvm");
    expect(&check(&ctx(&plain, report(1)), "fabric_manager"), Skip, "no NVSwitch", "");
}

fn pair(a: u32, b: u32, status: &str, nvlink: bool) -> P2pPair {
    P2pPair { a, b, read: status.into(), write: status.into(), nvlink: Some(nvlink), topology: Some("PHB".into()) }
}

#[test]
fn p2p_outcomes() {
    let host = healthy(3);
    expect(&check(&ctx(&host, report(1)), "p2p"), Skip, "1 GPU(s)", "");
    expect(&check(&ctx(&host, report(3)), "p2p"), Skip, "NVML unavailable", "");

    let mut good = ctx(&host, report(3));
    good.p2p = Some(vec![pair(0, 1, "ok", true), pair(0, 2, "ok", true), pair(1, 2, "ok", false)]);
    expect(
        &check(&good, "p2p"),
        Pass,
        "3 GPUs, all 3 pairs P2P ok, 2 over NVLink; 0-1: ok (NVLink); 0-2: ok (NVLink); 1-2: ok (PHB)",
        "",
    );

    let mut bad = ctx(&host, report(3));
    let mut mixed = pair(1, 2, "ok", false);
    mixed.write = "not_supported".into();
    bad.p2p = Some(vec![pair(0, 1, "ok", true), pair(0, 2, "chipset_not_supported", false), mixed]);
    expect(
        &check(&bad, "p2p"),
        Warn,
        "2 of 3 GPU pairs cannot use P2P; tensor-parallel traffic goes through host memory; 0-1: ok (NVLink); 0-2: chipset_not_supported (PHB); 1-2: read ok, write not_supported (PHB)",
        "ACS",
    );
}

#[test]
fn nccl_outcomes() {
    let host = healthy(2);
    expect(&check(&ctx(&host, report(1)), "nccl_all_reduce"), Skip, "1 GPU(s)", "");

    let mut quick = ctx(&host, report(2));
    quick.quick = true;
    quick.probes.nccl = Box::new(|_| panic!("quick mode must not run NCCL"));
    expect(&check(&quick, "nccl_all_reduce"), Skip, "quick mode", "");

    expect(
        &check(&ctx(&host, report(2)), "nccl_all_reduce"),
        Pass,
        "NCCL 2.21.5 (libnccl.so.2): all-reduce of 0.1 GiB over 2 GPUs: bus bandwidth 150.0 GB/s (algorithm 150.0 GB/s); sum correct",
        "",
    );

    let mut wrong = ctx(&host, report(2));
    wrong.probes.nccl = Box::new(|gpus| {
        assert_eq!(gpus, [0, 1]);
        NcclOutcome::Ran(nccl_run(false))
    });
    expect(
        &check(&wrong, "nccl_all_reduce"),
        Fail,
        "WRONG SUM: GPU 1 element 7: expected 3, got 2",
        "NCCL_P2P_DISABLE",
    );

    let mut failed = ctx(&host, report(2));
    failed.probes.nccl = Box::new(|_| NcclOutcome::Failed("ncclCommInitAll: NCCL_ERROR_UNHANDLED_CUDA_ERROR".into()));
    expect(&check(&failed, "nccl_all_reduce"), Fail, "ncclCommInitAll", "NCCL_DEBUG=INFO");

    let mut unsupported = ctx(&host, report(2));
    unsupported.probes.nccl = Box::new(llmd_telemetry::nccl::all_reduce_check);
    let c = check(&unsupported, "nccl_all_reduce");
    if cfg!(feature = "cuda") {
        // With the feature on a host without CUDA/NCCL the probe still must not fail hard.
        assert!(matches!(c.status, Skip | Fail), "{c:?}");
    } else {
        // No NCCL on this host (named by the file tried first), or one found in a build that
        // cannot run the all-reduce.
        assert_eq!(c.status, Skip, "{c:?}");
        assert!(
            c.observed.contains("libnccl.so.2") || c.observed.contains("built without CUDA support"),
            "{}",
            c.observed
        );
    }
}

/// The check with NCCL looked up in one directory: a host with only `libnccl.so.2` (what the
/// libnccl2 package installs) is seen to have NCCL, with its version; an empty one is told
/// which file is missing. The directory has no libcuda, so the check skips there.
#[test]
fn nccl_check_finds_libnccl_so_2_in_a_library_dir() {
    use llmd_nvlib::Search;
    use llmd_nvlib::fake::build_fake_nccl;
    use llmd_nvlib::nccl::Version;

    let host = healthy(2);
    let libs = tempfile::tempdir().unwrap();
    let mut c = ctx(&host, report(2));
    let search = Search::Dirs(vec![libs.path().to_path_buf()]);
    let probe_search = search.clone();
    c.probes.nccl = Box::new(move |gpus| llmd_telemetry::nccl::all_reduce_check_in(&probe_search, gpus));
    let missing = check(&c, "nccl_all_reduce");
    expect(&missing, Skip, &format!("NCCL could not be loaded (tried {}/libnccl.so.2, ", libs.path().display()), "");
    expect(&missing, Skip, "install NCCL 2 (package libnccl2", "");

    let lib = build_fake_nccl(libs.path(), "libnccl.so.2", Version { major: 2, minor: 21, patch: 5 }).unwrap();
    let found = check(&c, "nccl_all_reduce");
    expect(
        &found,
        Skip,
        &format!("NCCL 2.21.5 ({}) found, but the CUDA driver library could not be loaded", lib.display()),
        "",
    );
}

fn free_in(host: &Host) -> u64 {
    let st = nix::sys::statvfs::statvfs(host.root()).unwrap();
    #[allow(clippy::unnecessary_cast)]
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    free
}

fn model(name: &str, size: Option<u64>, downloaded: bool) -> ConfiguredModel {
    ConfiguredModel { name: name.into(), size_bytes: size, downloaded }
}

#[test]
fn models_disk_outcomes() {
    let host = healthy(1);
    let mut c = ctx(&host, report(1));
    expect(
        &check(&c, "models_disk"),
        Pass,
        "free in /var/lib/llmd/models; configured models not yet downloaded need 0.0 GiB",
        "",
    );

    // Downloaded models need no space, whatever their size.
    c.config.models = vec![model("big", Some(u64::MAX / 4), true), model("small", Some(1 << 20), false)];
    expect(&check(&c, "models_disk"), Pass, "need 0.0 GiB", "");

    c.config.models = vec![model("huge", Some(u64::MAX / 4), false)];
    expect(&check(&c, "models_disk"), Fail, "short", "larger disk");

    // Just enough, but under 10 % headroom. Chosen well inside the band so that other
    // writers on the test filesystem do not move it out.
    let free = free_in(&host);
    c.config.models = vec![model("tight", Some(free / 105 * 100), false)];
    expect(&check(&c, "models_disk"), Warn, "less than 10% headroom", "larger disk");

    c.config.models = vec![model("unknown", None, false)];
    expect(&check(&c, "models_disk"), Pass, "size unknown for unknown", "");

    c.config.models_dir = PathBuf::from("/srv/models/not/yet");
    expect(&check(&c, "models_disk"), Pass, "/srv/models/not/yet (does not exist yet)", "");
}

#[test]
fn control_group_outcomes() {
    let host = healthy(1);
    let (uid, gid) = host.owner();
    let (alice_uid, alice_gid) = (uid + 2000, gid + 2000);
    let llmd_gid = gid + 1000;
    let mut c = ctx(&host, report(1));
    expect(&check(&c, "control_group"), Skip, "caller unknown", "");

    c.caller = Some(Caller { uid: 0, gids: vec![0] });
    expect(&check(&c, "control_group"), Pass, "caller is root", "");

    // alice is listed as a member of `llmd` in /etc/group.
    c.caller = Some(Caller { uid: alice_uid, gids: vec![alice_gid] });
    expect(&check(&c, "control_group"), Pass, "alice is in group `llmd`", "");

    // A caller whose gid list carries the group (supplementary groups from the kernel).
    c.caller = Some(Caller { uid: 4242, gids: vec![llmd_gid] });
    expect(&check(&c, "control_group"), Pass, "uid 4242 is in group `llmd`", "");

    c.caller = Some(Caller { uid: uid + 3000, gids: vec![gid + 3000] });
    expect(
        &check(&c, "control_group"),
        Warn,
        "bob is not in group `llmd`: read-only commands work",
        "usermod -aG llmd",
    );

    c.config.control_group = Some("llmd-ops".into());
    expect(&check(&c, "control_group"), Warn, "group `llmd-ops` does not exist", "groupadd --system llmd-ops");

    c.config.control_group = None;
    expect(&check(&c, "control_group"), Skip, "no control group configured", "");
}

#[test]
fn http_port_outcomes() {
    let host = healthy(1);
    let mut c = ctx(&host, report(1));
    expect(&check(&c, "http_port"), Pass, "127.0.0.1:8000 is held by llmd", "");

    c.http_held_by_llmd = false;
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    c.config.http_listen = taken.local_addr().unwrap().to_string();
    expect(&check(&c, "http_port"), Fail, "is in use by another process", "ss -ltnp");

    let port = taken.local_addr().unwrap().port();
    drop(taken);
    c.config.http_listen = format!("127.0.0.1:{port}");
    expect(&check(&c, "http_port"), Pass, &format!("127.0.0.1:{port} is free"), "");

    c.config.http_listen = "not an address".into();
    expect(&check(&c, "http_port"), Fail, "is not a listen address", "host:port");

    // TEST-NET-1 is never an address of this machine.
    c.config.http_listen = "192.0.2.1:8000".into();
    expect(&check(&c, "http_port"), Fail, "cannot bind 192.0.2.1:8000", "address of this machine");
}

#[test]
fn hub_reachable_outcomes() {
    let host = healthy(1);
    let mut c = ctx(&host, report(1));
    expect(&check(&c, "hub_reachable"), Skip, "no hub endpoint configured", "");

    let hub = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hub.local_addr().unwrap().port();
    c.config.hub_endpoint = Some(format!("http://127.0.0.1:{port}/"));
    expect(&check(&c, "hub_reachable"), Pass, &format!("connected to 127.0.0.1:{port}"), "");

    c.quick = true;
    expect(&check(&c, "hub_reachable"), Skip, "quick mode", "");
    c.quick = false;

    drop(hub);
    expect(&check(&c, "hub_reachable"), Fail, &format!("cannot connect to 127.0.0.1:{port}"), "HF_ENDPOINT");

    c.probes.hub_timeout = Duration::from_millis(1500);
    c.config.hub_endpoint = Some("https://llmd-doctor-test.invalid".into());
    expect(&check(&c, "hub_reachable"), Fail, "llmd-doctor-test.invalid", "DNS");

    c.config.hub_endpoint = Some("huggingface.co".into());
    expect(
        &check(&c, "hub_reachable"),
        Fail,
        "bad hub endpoint: `huggingface.co` has no scheme",
        "https://huggingface.co",
    );
}
