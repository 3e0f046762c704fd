//! Memory-mapped safetensors checkpoints: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`.
//!
//! Files are mapped, their headers checked (length first, so a hostile header cannot make us
//! allocate or parse unbounded data), and each tensor is converted from the mapping straight
//! into an f32 candle tensor on the CPU: one copy, never a read into an intermediate buffer.
//! The CPU backend computes in f32, so bf16/f16 weights are widened once at load rather than
//! per matmul (a per-matmul conversion would touch every weight byte again on every step).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::ModelError;
use crate::spec::{WeightSpec, WeightStorage};

/// Upper bound on a safetensors JSON header. Real headers are a few hundred KiB even for
/// thousands of tensors; anything larger is corrupt or hostile.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the file's data section.
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    /// Offset of the data section (8 + header length).
    data_start: usize,
}

/// An opened checkpoint: mapped files and a name → tensor index. Cheap to query; tensor data
/// is read only by [`Checkpoint::load_f32`].
pub struct Checkpoint {
    files: Vec<MappedFile>,
    tensors: HashMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files.iter().map(|m| &m.path).collect::<Vec<_>>())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn st_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Safetensors { path: path.to_path_buf(), message: message.into() }
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl Checkpoint {
    /// Opens the weights of an HF model folder: `model.safetensors.index.json` with its shards
    /// if present, else `model.safetensors`, else every `*.safetensors` file in the folder.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|source| ModelError::Io { path: index.clone(), source })?;
            let idx: ShardIndex = serde_json::from_str(&text).map_err(|e| ModelError::Config {
                file: index.display().to_string(),
                message: format!("`weight_map`: {e}"),
            })?;
            let mut shards = BTreeSet::new();
            for shard in idx.weight_map.values() {
                // Shard names are plain file names; refuse paths that would leave the folder.
                if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
                    return Err(ModelError::Config {
                        file: index.display().to_string(),
                        message: format!("`weight_map` names shard `{shard}` outside the model folder"),
                    });
                }
                shards.insert(shard.clone());
            }
            let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            let ckpt = Self::open_files(&paths)?;
            for (name, shard) in &idx.weight_map {
                let entry = ckpt.tensors.get(name).ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
                if ckpt.files[entry.file].path.file_name().and_then(|f| f.to_str()) != Some(shard.as_str()) {
                    return Err(st_err(
                        &ckpt.files[entry.file].path,
                        format!("tensor `{name}` is listed in shard `{shard}` by the index but found here"),
                    ));
                }
            }
            return Ok(ckpt);
        }
        let single = dir.join("model.safetensors");
        if single.exists() {
            return Self::open_files(&[single]);
        }
        let mut paths = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
        for entry in rd {
            let entry = entry.map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
            let p = entry.path();
            if p.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                paths.push(p);
            }
        }
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::Io {
                path: single,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors weights in the folder"),
            });
        }
        Self::open_files(&paths)
    }

    /// Maps and indexes the given safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, ModelError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|source| ModelError::Io { path: path.clone(), source })?;
            // SAFETY: the mapping is read-only and private to this process. Model files are
            // not expected to change while served; if one is truncated underneath us the
            // kernel raises SIGBUS, the same contract every mmap-based loader has.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io { path: path.clone(), source })?;
            let len = mmap.len() as u64;
            if len < 8 {
                return Err(st_err(path, format!("file is {len} bytes, shorter than the 8-byte header length")));
            }
            let mut n_bytes = [0u8; 8];
            n_bytes.copy_from_slice(&mmap[..8]);
            let header_len = u64::from_le_bytes(n_bytes);
            if header_len > MAX_HEADER_BYTES {
                return Err(st_err(
                    path,
                    format!("header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes"),
                ));
            }
            if header_len > len - 8 {
                return Err(st_err(
                    path,
                    format!("header length {header_len} runs past the end of the {len}-byte file (truncated?)"),
                ));
            }
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| st_err(path, format!("{e:?} (header or data section corrupt or truncated)")))?;
            let data_start = 8 + n;
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                if tensors.contains_key(&name) {
                    return Err(st_err(path, format!("tensor `{name}` appears in more than one file")));
                }
                tensors
                    .insert(name, TensorEntry { file: fi, dtype: info.dtype, shape: info.shape.clone(), start, end });
            }
            files.push(MappedFile { path: path.clone(), mmap, data_start });
        }
        Ok(Checkpoint { files, tensors })
    }

    /// Number of tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Shape of a tensor as stored.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Total number of elements over all tensors (the parameter count).
    pub fn num_elements(&self) -> u64 {
        self.tensors.values().map(|e| e.shape.iter().product::<usize>() as u64).sum()
    }

    /// Bytes of tensor data on disk.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|e| (e.end - e.start) as u64).sum()
    }

    /// The dtype most of the weight bytes are stored in, as transformers names it
    /// (`bfloat16`, `float16`, `float32`).
    pub fn dominant_dtype(&self) -> String {
        let mut by: HashMap<String, u64> = HashMap::new();
        for e in self.tensors.values() {
            *by.entry(torch_dtype_name(e.dtype)).or_default() += (e.end - e.start) as u64;
        }
        by.into_iter().max_by_key(|(_, b)| *b).map(|(d, _)| d).unwrap_or_else(|| "float32".to_string())
    }

    /// Reads tensor `name`, checks its shape against `expected` and converts it to an f32
    /// tensor on the CPU.
    /// How tensor `name` is stored: [`ModelError::MissingTensor`] when absent,
    /// [`ModelError::UnsupportedDtype`] for a dtype no [`WeightStorage`] describes.
    pub fn storage(&self, name: &str) -> Result<WeightStorage, ModelError> {
        let entry = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        match entry.dtype {
            Dtype::F32 => Ok(WeightStorage::Float(llmd_options::Dtype::Float32)),
            Dtype::F16 => Ok(WeightStorage::Float(llmd_options::Dtype::Float16)),
            Dtype::BF16 => Ok(WeightStorage::Float(llmd_options::Dtype::BFloat16)),
            other => Err(ModelError::UnsupportedDtype { name: name.to_string(), dtype: dtype_name(other) }),
        }
    }

    /// The stored bytes of tensor `name` after checking its shape against `expected`, its dtype
    /// (f32, f16 or bf16) and its byte length. Backends that keep the checkpoint's precision
    /// (the GPU) upload these bytes directly.
    pub fn raw(&self, name: &str, expected: &[usize]) -> Result<RawTensor<'_>, ModelError> {
        let entry = self.tensors.get(name).ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        if entry.shape != expected {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: entry.shape.clone(),
            });
        }
        let file = &self.files[entry.file];
        let bytes = &file.mmap[file.data_start + entry.start..file.data_start + entry.end];
        let numel: usize = entry.shape.iter().product();
        let elem = match entry.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            other => {
                return Err(ModelError::UnsupportedDtype { name: name.to_string(), dtype: dtype_name(other) });
            }
        };
        if bytes.len() != numel * elem {
            return Err(st_err(
                &file.path,
                format!(
                    "tensor `{name}` has {} data bytes, expected {} for shape {:?}",
                    bytes.len(),
                    numel * elem,
                    entry.shape
                ),
            ));
        }
        Ok(RawTensor { dtype: entry.dtype, shape: &entry.shape, bytes })
    }

    /// Loads tensor `name` as an f32 CPU tensor, checking its shape against `expected`.
    pub fn load_f32(&self, name: &str, expected: &[usize]) -> Result<Tensor, ModelError> {
        let raw = self.raw(name, expected)?;
        let bytes = raw.bytes;
        let data: Vec<f32> = match raw.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        Ok(Tensor::from_vec(data, raw.shape, &Device::Cpu)?)
    }
}

/// A tensor's bytes inside the memory map, as stored (little-endian f32, f16 or bf16).
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

fn torch_dtype_name(d: Dtype) -> String {
    match d {
        Dtype::F32 => "float32".into(),
        Dtype::F16 => "float16".into(),
        Dtype::BF16 => "bfloat16".into(),
        other => dtype_name(other).to_lowercase(),
    }
}

/// A view of a [`Checkpoint`] under a name prefix, counting loaded tensors for the progress
/// callback: `weights.pp("model").pp("layers.0").get("input_layernorm.weight", &[h])`.
pub struct Weights<'a> {
    ckpt: &'a Checkpoint,
    prefix: String,
    progress: &'a std::cell::RefCell<Progress<'a>>,
}

impl std::fmt::Debug for Weights<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights").field("prefix", &self.prefix).finish()
    }
}

/// Counts tensors loaded out of the checkpoint's total and reports each step.
pub struct Progress<'a> {
    done: usize,
    total: usize,
    callback: &'a mut dyn FnMut(usize, usize),
}

impl<'a> Progress<'a> {
    /// A counter over `total` tensors reporting to `callback(done, total)`.
    pub fn new(total: usize, callback: &'a mut dyn FnMut(usize, usize)) -> Self {
        Progress { done: 0, total, callback }
    }

    fn step(&mut self) {
        self.done = (self.done + 1).min(self.total);
        (self.callback)(self.done, self.total);
    }

    /// Reports completion (tensors the model does not use are never loaded, so the count
    /// may stop short of the total).
    pub fn finish(&mut self) {
        self.done = self.total;
        (self.callback)(self.total, self.total);
    }
}

impl<'a> Weights<'a> {
    /// The root view of `ckpt`.
    pub fn new(ckpt: &'a Checkpoint, progress: &'a std::cell::RefCell<Progress<'a>>) -> Self {
        Weights { ckpt, prefix: String::new(), progress }
    }

    /// A view one level down: names are prefixed with `name.`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Weights<'a> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Weights { ckpt: self.ckpt, prefix, progress: self.progress }
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// The checkpoint this view reads.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.ckpt
    }

    /// This view's name prefix (empty at the root).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.full(name))
    }

    /// Loads the tensor `spec` names (a full checkpoint name, whatever this view's prefix) as
    /// f32, checking the spec's shape.
    pub fn load(&self, spec: &WeightSpec) -> Result<Tensor, ModelError> {
        let t = self.ckpt.load_f32(&spec.name, &spec.shape)?;
        self.progress.borrow_mut().step();
        Ok(t)
    }

    /// Loads `name` under this prefix as f32 with the expected shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let t = self.ckpt.load_f32(&self.full(name), shape)?;
        self.progress.borrow_mut().step();
        Ok(t)
    }
}
