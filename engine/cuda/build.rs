//! Compiles kernels/*.cu with nvcc into one fatbin (sm_80, sm_89, sm_90 machine code plus
//! compute_90 PTX for newer GPUs) that src/kernels.rs embeds with include_bytes!.
//! nvcc is found through $NVCC, $CUDA_ROOT/bin, $CUDA_HOME/bin or PATH
//! (scripts/setup-cuda-toolchain.sh installs one). Without nvcc the crate builds without
//! kernels and reports that at run time, unless the `require-kernels` feature is on.

use std::path::PathBuf;
use std::process::Command;

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            let p = PathBuf::from(root).join("bin/nvcc");
            if p.exists() {
                return Some(p);
            }
        }
    }
    let out = Command::new("sh").args(["-c", "command -v nvcc"]).output().ok()?;
    let path = String::from_utf8(out.stdout).ok()?;
    let path = path.trim();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_ROOT", "CUDA_HOME", "CUDA_PATH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(llmd_cuda_kernels)");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let fatbin = out_dir.join("llmd_kernels.fatbin");
    let required = std::env::var("CARGO_FEATURE_REQUIRE_KERNELS").is_ok();
    let Some(nvcc) = find_nvcc() else {
        if required {
            panic!(
                "nvcc not found: run scripts/setup-cuda-toolchain.sh and source the cuda-env.sh it prints, or set NVCC"
            );
        }
        println!("cargo:warning=nvcc not found: llmd-cuda is built without kernels (GPU serving disabled)");
        std::fs::write(&fatbin, b"").expect("write empty fatbin");
        return;
    };
    let status = Command::new(&nvcc)
        .args([
            "--fatbin",
            "-O3",
            "-std=c++17",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_89,code=sm_89",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
            "-o",
        ])
        .arg(&fatbin)
        .arg("kernels/llmd.cu")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on kernels/llmd.cu");
    println!("cargo:rustc-cfg=llmd_cuda_kernels");
}
