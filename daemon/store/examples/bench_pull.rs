//! Pull benchmark (driven by bench/pull/run.sh): serves one multi-GB LFS file over loopback
//! from the fake hub of the tests, downloads it with `curl -o /dev/null`, then pulls it with
//! llmd-store (hashing, writing, fsync and all), alternating, and writes a Markdown report.
//!
//! ```text
//! cargo run --release -p llmd-store --example bench_pull -- [--size-gib 4] [--rounds 2]
//!     [--dir /tmp] [--out bench/results/2026-11-21-cpu-pull.md]
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use common::{Content, FakeFile, FakeHub, FakeRepo};
use llmd_proto::PullParams;
use llmd_store::{Store, StoreConfig};
use sha2::Digest;

struct Args {
    size_gib: f64,
    rounds: usize,
    dir: PathBuf,
    out: PathBuf,
    /// Print the progress timeline of each pull.
    verbose: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        size_gib: 4.0,
        rounds: 2,
        dir: std::env::temp_dir(),
        out: PathBuf::from("bench/results/2026-11-21-cpu-pull.md"),
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--verbose" {
            a.verbose = true;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--size-gib" => a.size_gib = v.parse().map_err(|e| format!("--size-gib: {e}"))?,
            "--rounds" => a.rounds = v.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--dir" => a.dir = v.into(),
            "--out" => a.out = v.into(),
            _ => return Err(format!("unknown option {k}")),
        }
    }
    Ok(a)
}

/// Writes `len` pseudo-random bytes (incompressible, so nothing flatters the transfer) and
/// returns their SHA-256.
fn make_file(path: &std::path::Path, len: u64) -> std::io::Result<String> {
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    let mut hasher = sha2::Sha256::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 8 << 20];
    let mut left = len;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(hex::encode(hasher.finalize()))
}

/// Seconds `curl` takes to fetch `url` into `dest` (`/dev/null` for the reference number).
fn curl(url: &str, dest: &str) -> Result<f64, String> {
    let out = std::process::Command::new("curl")
        .args(["-s", "-S", "-f", "-o", dest, "-w", "%{time_total} %{size_download}", url])
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if !out.status.success() {
        return Err(format!("curl failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let mut parts = s.split_whitespace();
    let t: f64 = parts.next().and_then(|v| v.parse().ok()).ok_or("bad curl output")?;
    Ok(t)
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = parse_args()?;
    let len = (args.size_gib * (1u64 << 30) as f64) as u64;
    let work = args.dir.join(format!("llmd-bench-pull-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let result = run(&args, len, &work).await;
    // The multi-GB files never outlive the run.
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn run(args: &Args, len: u64, work: &std::path::Path) -> Result<(), String> {
    let src = work.join("weights.bin");
    eprintln!("writing {len} bytes to {}", src.display());
    let sha = make_file(&src, len).map_err(|e| e.to_string())?;
    let hub = FakeHub::start_with_page_size(100).await;
    let file = FakeFile {
        path: "model.safetensors".into(),
        content: Content::Disk { path: src.clone(), len, sha256: sha },
        lfs: true,
    };
    hub.add_hf(
        "bench/model",
        FakeRepo::new(
            0x5a,
            vec![FakeFile::mem("config.json", r#"{"architectures": ["LlamaForCausalLM"]}"#, false), file],
        ),
    );
    let url = format!("{}/lfs/bench/model/model.safetensors", hub.lfs_url);
    // Warm the page cache so the first measurement is not a cold disk read.
    let _ = curl(&url, "/dev/null")?;
    let mut curl_s = Vec::new();
    let mut pull_s = Vec::new();
    let mut curl_disk_s = Vec::new();
    for round in 0..args.rounds {
        let t = tokio::task::spawn_blocking({
            let url = url.clone();
            move || curl(&url, "/dev/null")
        })
        .await
        .map_err(|e| e.to_string())??;
        curl_s.push(t);
        eprintln!("round {round}: curl {:.2} GB/s", gbps(len, t));
        // For context: curl writing the file to the same disk, without hashing.
        let disk_copy = work.join("curl-copy");
        let t = tokio::task::spawn_blocking({
            let (url, dest) = (url.clone(), disk_copy.to_string_lossy().into_owned());
            move || curl(&url, &dest)
        })
        .await
        .map_err(|e| e.to_string())??;
        let _ = std::fs::remove_file(&disk_copy);
        curl_disk_s.push(t);
        eprintln!("round {round}: curl to disk {:.2} GB/s", gbps(len, t));

        let models = work.join(format!("models-{round}"));
        let mut cfg = StoreConfig::new(&models);
        cfg.hf_endpoint = hub.url.clone();
        let store = Store::new(cfg).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let verbose = args.verbose;
        let m = store
            .pull(&PullParams { source: "hf:bench/model".into(), ..Default::default() }, move |p| {
                // One line a second: where the time goes (steady rate vs. stalls, the final fsync).
                if verbose {
                    eprintln!(
                        "  {:6.2}s {} {} bytes, {:.2} GB/s",
                        start.elapsed().as_secs_f64(),
                        p.phase,
                        p.done,
                        p.rate / 1e9
                    );
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        let t = start.elapsed().as_secs_f64();
        pull_s.push(t);
        eprintln!("round {round}: llmd-store pull {:.2} GB/s", gbps(m.size_bytes, t));
        let _ = std::fs::remove_dir_all(&models);
    }
    // Single-stream SHA-256 speed of this CPU: the ceiling for verifying one file.
    let sha_gbps = {
        let buf = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        let mut h = sha2::Sha256::new();
        for _ in 0..1024 {
            h.update(&buf);
        }
        let _ = h.finalize();
        gbps(1 << 30, start.elapsed().as_secs_f64())
    };
    let best_curl = curl_s.iter().cloned().fold(f64::INFINITY, f64::min);
    let best_pull = pull_s.iter().cloned().fold(f64::INFINITY, f64::min);
    let ratio = best_curl / best_pull;
    let best_disk = curl_disk_s.iter().cloned().fold(f64::INFINITY, f64::min);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mut md = String::new();
    md.push_str("# Pull throughput over loopback: llmd-store vs curl\n\n");
    md.push_str(&format!(
        "Machine: {cpus} CPUs ({cpu_model}). File: {len} bytes ({:.1} GiB) of pseudo-random data in {}, served by \
         the fake hub of `daemon/store/tests/common` (the LFS CDN endpoint, 1 MiB reads from the page cache) on 127.0.0.1.\n\n",
        len as f64 / (1u64 << 30) as f64,
        args.dir.display()
    ));
    md.push_str(
        "- curl: `curl -o /dev/null` on the LFS URL (no hashing, no disk writes).\n\
         - llmd-store: `Store::pull(\"hf:bench/model\")` end to end: revision + tree API, the `resolve` redirect, \
         streaming into `blobs/<sha256>.incomplete`, SHA-256 of every byte, `fsync`, rename, snapshot symlink.\n\
         - curl -o file: the same download written to a file next to the cache (context only: no hashing, no fsync).\n\
         - Rounds alternate curl and pull; the ratio uses the best round of each.\n\n",
    );
    md.push_str(
        "| round | curl -o /dev/null (s) | GB/s | curl -o file (s) | GB/s | llmd-store pull (s) | GB/s |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (i, ((c, d), p)) in curl_s.iter().zip(&curl_disk_s).zip(&pull_s).enumerate() {
        md.push_str(&format!(
            "| {i} | {c:.2} | {:.2} | {d:.2} | {:.2} | {p:.2} | {:.2} |\n",
            gbps(len, *c),
            gbps(len, *d),
            gbps(len, *p)
        ));
    }
    md.push_str(&format!(
        "\nSHA-256 on one core of this CPU (sha2 crate, 1 GiB in memory): {sha_gbps:.2} GB/s, the ceiling for \
         verifying a single file.\n"
    ));
    md.push_str(&format!(
        "\n**Best: curl {:.2} GB/s, llmd-store {:.2} GB/s, ratio {:.0}%** (target ≥ 70%: {}).\n\n\
         Reproduce: `bench/pull/run.sh` (release build; the file is created under {} and deleted afterwards).\n",
        gbps(len, best_curl),
        gbps(len, best_pull),
        ratio * 100.0,
        if ratio >= 0.7 { "met" } else { "NOT met" },
        args.dir.display()
    ));
    md.push_str(&format!(
        "\nAgainst `curl -o file` on the same disk (best rounds): {:.2} vs {:.2} GB/s, ratio {:.0}%.\n",
        gbps(len, best_pull),
        gbps(len, best_disk),
        best_disk / best_pull * 100.0
    ));
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    std::fs::write(&args.out, &md).map_err(|e| e.to_string())?;
    println!("{md}");
    Ok(())
}
