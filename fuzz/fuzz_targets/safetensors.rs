//! Safetensors headers and the shard index through the real loader
//! (`llmd_models::loader::Checkpoint`), on temp files holding the fuzz bytes.
//!
//! First byte even: the rest is one `model.safetensors`, opened with `open_files`.
//! First byte odd: the rest is `index JSON \0 shard bytes`, written as
//! `model.safetensors.index.json` + `model-00001-of-00001.safetensors` and opened with
//! `open_dir` (the path the daemon takes for sharded checkpoints).
//! A header length of up to 2^64-1 must be refused before it is allocated (libFuzzer's
//! -rss_limit_mb / -malloc_limit_mb turn an unbounded allocation into a crash); every tensor
//! the header lists must be readable, or refused, without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llmd_models::loader::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let opened = if mode & 1 == 0 {
        let path = dir.path().join("model.safetensors");
        std::fs::write(&path, rest).expect("write shard");
        Checkpoint::open_files(&[path])
    } else {
        let (index, shard) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        std::fs::write(dir.path().join("model.safetensors.index.json"), index).expect("write index");
        std::fs::write(dir.path().join("model-00001-of-00001.safetensors"), shard).expect("write shard");
        Checkpoint::open_dir(dir.path())
    };
    let Ok(ckpt) = opened else { return };
    let _ = (ckpt.num_elements(), ckpt.data_bytes(), ckpt.dominant_dtype());
    for name in ckpt.names() {
        let shape = ckpt.shape(name).expect("listed tensor has a shape").to_vec();
        let _ = ckpt.raw(name, &shape);
        // Converting to f32 allocates 4 bytes per element: only for small tensors.
        let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if elems.is_some_and(|e| e <= 1 << 16) {
            let _ = ckpt.load_f32(name, &shape);
        }
        // A wrong expected shape must be an error.
        let mut wrong = shape.clone();
        wrong.push(3);
        assert!(ckpt.raw(name, &wrong).is_err(), "raw accepted shape {wrong:?} for {name} of shape {shape:?}");
    }
});
