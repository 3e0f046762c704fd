//! GPU placement for `llmctl load --tp N [--gpus ...]`: estimate what a model needs per GPU
//! before loading it, pick the GPUs, and refuse with the numbers when it cannot fit, rather
//! than failing half-way through the load.

use std::fmt;

use llmd_proto::messages::{GpuInfo, GpuReport};

const GIB: f64 = (1u64 << 30) as f64;

/// Fixed per-GPU headroom on top of weights and KV cache: the CUDA context (~0.5 GiB on
/// Hopper), cuBLAS/NCCL workspaces and the activations of one prefill chunk.
pub const ACTIVATION_MARGIN_BASE_BYTES: u64 = 1 << 30;

/// Extra headroom as a fraction of the per-GPU weights, in percent: logits and MLP
/// activations grow with hidden size and vocabulary, which grow with the model.
pub const ACTIVATION_MARGIN_WEIGHT_PCT: u64 = 5;

/// What a model needs on each GPU it is placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// This GPU's share of the weights (`weight_bytes / tp`, rounded up).
    pub weights_per_gpu: u64,
    /// KV cache for one sequence of `max_model_len` tokens, this GPU's heads only.
    pub kv_per_gpu: u64,
    /// Headroom for activations and workspaces; see [`ACTIVATION_MARGIN_BASE_BYTES`].
    pub activation_margin: u64,
    /// The context length the KV figure is for.
    pub max_model_len: u32,
    /// Tensor-parallel size the figures are split over.
    pub tp: u32,
}

impl MemoryEstimate {
    /// Total bytes needed on each GPU.
    pub fn per_gpu_bytes(&self) -> u64 {
        self.weights_per_gpu.saturating_add(self.kv_per_gpu).saturating_add(self.activation_margin)
    }
}

impl fmt::Display for MemoryEstimate {
    /// "17.2 GiB per GPU (weights 15.0 GiB + KV for max_model_len 8192: 2.2 GiB + activations 1.0 GiB)"
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} per GPU (weights {} + KV for max_model_len {}: {} + activations {})",
            gib(self.per_gpu_bytes()),
            gib(self.weights_per_gpu),
            self.max_model_len,
            gib(self.kv_per_gpu),
            gib(self.activation_margin)
        )
    }
}

/// Formats bytes as GiB with one decimal: "9.8 GiB".
pub fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

/// Estimates per-GPU memory for a model split over `tp` GPUs: its weight share, the KV cache
/// of one full-length sequence, and the activation margin (1 GiB + 5 % of the weight share).
///
/// KV bytes per token = 2 (K and V) × `num_layers` × KV heads on this GPU × `head_dim` ×
/// `kv_dtype_bytes`. KV heads are split over the tensor-parallel ranks; when there are fewer
/// heads than ranks each rank still holds one (they are replicated). `tp = 0` counts as 1.
pub fn estimate_memory(
    weight_bytes: u64,
    num_layers: u32,
    num_kv_heads: u32,
    head_dim: u32,
    kv_dtype_bytes: u32,
    max_model_len: u32,
    tp: u32,
) -> MemoryEstimate {
    let tp = tp.max(1);
    let weights_per_gpu = weight_bytes.div_ceil(u64::from(tp));
    let heads_per_gpu = u64::from(num_kv_heads.div_ceil(tp).max(1));
    let kv_per_token = 2 * u64::from(num_layers) * heads_per_gpu * u64::from(head_dim) * u64::from(kv_dtype_bytes);
    let kv_per_gpu = kv_per_token.saturating_mul(u64::from(max_model_len));
    let activation_margin = ACTIVATION_MARGIN_BASE_BYTES + weights_per_gpu / 100 * ACTIVATION_MARGIN_WEIGHT_PCT;
    MemoryEstimate { weights_per_gpu, kv_per_gpu, activation_margin, max_model_len, tp }
}

/// Why a model cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// NVML is unavailable or lists no GPU.
    #[error("no GPUs to place on: {0}")]
    NoGpus(String),
    /// `tp` was 0.
    #[error("tp must be at least 1")]
    ZeroTp,
    /// Fewer GPUs than `tp`.
    #[error("tp {tp} needs {tp} GPUs, this host has {available}")]
    NotEnoughGpus { tp: u32, available: u32 },
    /// `--gpus` names an index NVML does not list.
    #[error("GPU {index} does not exist (GPUs: {available})")]
    UnknownGpu { index: u32, available: String },
    /// `--gpus` names an index twice.
    #[error("GPU {0} is listed twice in --gpus")]
    DuplicateGpu(u32),
    /// `--gpus` lists a different number of GPUs than `tp`.
    #[error("--gpus lists {given} GPUs but tp is {tp}")]
    CountMismatch { given: u32, tp: u32 },
    /// The model does not fit: `need` describes the estimate, `gpu` is the tightest GPU.
    #[error("model needs {need}, GPU {gpu} has {} free{detail}", gib(*.free_bytes))]
    DoesNotFit { need: String, gpu: u32, free_bytes: u64, detail: String },
}

/// Picks the GPUs for a model needing `need_per_gpu_bytes` on each of `tp` GPUs: the given
/// `gpus` (validated: they exist, are distinct and number `tp`; order kept, it is the rank
/// order), or the `tp` GPUs with the most free memory, returned in index order.
pub fn place(
    report: &GpuReport,
    tp: u32,
    gpus: Option<&[u32]>,
    need_per_gpu_bytes: u64,
) -> Result<Vec<u32>, PlacementError> {
    place_inner(report, tp, gpus, need_per_gpu_bytes, &gib(need_per_gpu_bytes))
}

/// [`place`] with the need taken from `estimate`, so a refusal explains the figure:
/// "model needs 17.2 GiB per GPU (weights 15.0 GiB + KV ...), GPU 1 has 9.8 GiB free".
pub fn place_estimate(
    report: &GpuReport,
    gpus: Option<&[u32]>,
    estimate: &MemoryEstimate,
) -> Result<Vec<u32>, PlacementError> {
    place_inner(report, estimate.tp, gpus, estimate.per_gpu_bytes(), &estimate.to_string())
}

fn place_inner(
    report: &GpuReport,
    tp: u32,
    gpus: Option<&[u32]>,
    need: u64,
    need_text: &str,
) -> Result<Vec<u32>, PlacementError> {
    if let Some(reason) = &report.unavailable {
        return Err(PlacementError::NoGpus(reason.clone()));
    }
    if report.gpus.is_empty() {
        return Err(PlacementError::NoGpus("NVML lists no GPU".into()));
    }
    if tp == 0 {
        return Err(PlacementError::ZeroTp);
    }
    let find = |index: u32| report.gpus.iter().find(|g| g.index == index);
    let chosen: Vec<&GpuInfo> = match gpus {
        Some(list) => {
            if list.len() != tp as usize {
                return Err(PlacementError::CountMismatch { given: list.len() as u32, tp });
            }
            let mut chosen = Vec::with_capacity(list.len());
            for (i, &index) in list.iter().enumerate() {
                if list[..i].contains(&index) {
                    return Err(PlacementError::DuplicateGpu(index));
                }
                let gpu = find(index).ok_or_else(|| PlacementError::UnknownGpu {
                    index,
                    available: report.gpus.iter().map(|g| g.index.to_string()).collect::<Vec<_>>().join(", "),
                })?;
                chosen.push(gpu);
            }
            chosen
        }
        None => {
            if report.gpus.len() < tp as usize {
                return Err(PlacementError::NotEnoughGpus { tp, available: report.gpus.len() as u32 });
            }
            let mut by_free: Vec<&GpuInfo> = report.gpus.iter().collect();
            // Most free first; ties go to the lower index so placement is deterministic.
            by_free.sort_by(|a, b| b.memory_free_bytes.cmp(&a.memory_free_bytes).then(a.index.cmp(&b.index)));
            by_free.truncate(tp as usize);
            by_free.sort_by_key(|g| g.index);
            by_free
        }
    };
    if let Some(tightest) = chosen.iter().filter(|g| g.memory_free_bytes < need).min_by_key(|g| g.memory_free_bytes) {
        let fitting = report.gpus.iter().filter(|g| g.memory_free_bytes >= need).count();
        let detail = if gpus.is_some() {
            String::new()
        } else {
            format!(" ({fitting} of {} GPUs have enough free, tp {tp} needs {tp})", report.gpus.len())
        };
        return Err(PlacementError::DoesNotFit {
            need: need_text.to_string(),
            gpu: tightest.index,
            free_bytes: tightest.memory_free_bytes,
            detail,
        });
    }
    Ok(chosen.iter().map(|g| g.index).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn report(free_gib: &[f64]) -> GpuReport {
        GpuReport {
            gpus: free_gib
                .iter()
                .enumerate()
                .map(|(i, f)| GpuInfo {
                    index: i as u32,
                    memory_free_bytes: (f * G as f64) as u64,
                    memory_total_bytes: 80 * G,
                    ..GpuInfo::default()
                })
                .collect(),
            ..GpuReport::default()
        }
    }

    #[test]
    fn estimate_llama_8b_like() {
        // 32 layers, 8 KV heads × 128, bf16 KV, 8192 tokens: 2·32·8·128·2 = 128 KiB per token.
        let e = estimate_memory(16 * G, 32, 8, 128, 2, 8192, 1);
        assert_eq!(e.weights_per_gpu, 16 * G);
        assert_eq!(e.kv_per_gpu, 131_072 * 8192);
        assert_eq!(e.kv_per_gpu, G);
        assert_eq!(e.activation_margin, G + 16 * G / 100 * 5);
        assert_eq!(e.per_gpu_bytes(), 16 * G + G + e.activation_margin);
    }

    #[test]
    fn estimate_splits_weights_and_heads_over_tp() {
        let e = estimate_memory(140 * G + 1, 80, 8, 128, 2, 4096, 4);
        assert_eq!(e.weights_per_gpu, 35 * G + 1, "rounded up");
        // 8 KV heads over 4 ranks: 2 heads each.
        assert_eq!(e.kv_per_gpu, 2 * 80 * 2 * 128 * 2 * 4096);
        assert_eq!(e.tp, 4);
    }

    #[test]
    fn estimate_replicates_kv_heads_when_fewer_than_ranks() {
        let tp8 = estimate_memory(8 * G, 32, 4, 128, 2, 1000, 8);
        let tp4 = estimate_memory(8 * G, 32, 4, 128, 2, 1000, 4);
        assert_eq!(tp8.kv_per_gpu, tp4.kv_per_gpu, "one head per rank at least");
        assert_eq!(estimate_memory(G, 1, 1, 1, 1, 1, 0).tp, 1);
    }

    #[test]
    fn estimate_display() {
        let e = MemoryEstimate {
            weights_per_gpu: 15 * G,
            kv_per_gpu: (2.2 * G as f64) as u64,
            activation_margin: G,
            max_model_len: 8192,
            tp: 1,
        };
        assert_eq!(
            e.to_string(),
            "18.2 GiB per GPU (weights 15.0 GiB + KV for max_model_len 8192: 2.2 GiB + activations 1.0 GiB)"
        );
    }

    #[test]
    fn picks_most_free_in_index_order() {
        let r = report(&[10.0, 70.0, 30.0, 70.0]);
        assert_eq!(place(&r, 2, None, 20 * G).unwrap(), vec![1, 3]);
        assert_eq!(place(&r, 3, None, 20 * G).unwrap(), vec![1, 2, 3]);
        assert_eq!(place(&r, 1, None, 20 * G).unwrap(), vec![1], "tie goes to the lower index");
    }

    #[test]
    fn refuses_with_numbers_when_auto_pick_does_not_fit() {
        let r = report(&[9.8, 70.0]);
        let err = place(&r, 2, None, 20 * G).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model needs 20.0 GiB, GPU 0 has 9.8 GiB free (1 of 2 GPUs have enough free, tp 2 needs 2)"
        );
    }

    #[test]
    fn refusal_explains_the_estimate() {
        let r = report(&[9.8, 9.9]);
        let e = MemoryEstimate {
            weights_per_gpu: 15 * G,
            kv_per_gpu: (2.2 * G as f64) as u64,
            activation_margin: 0,
            max_model_len: 8192,
            tp: 1,
        };
        let err = place_estimate(&r, Some(&[0]), &e).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model needs 17.2 GiB per GPU (weights 15.0 GiB + KV for max_model_len 8192: 2.2 GiB + activations 0.0 GiB), GPU 0 has 9.8 GiB free"
        );
        assert_eq!(place_estimate(&report(&[20.0]), None, &e).unwrap(), vec![0]);
    }

    #[test]
    fn explicit_gpus_are_validated_and_keep_their_order() {
        let r = report(&[40.0, 40.0, 40.0]);
        assert_eq!(place(&r, 2, Some(&[2, 0]), G).unwrap(), vec![2, 0]);
        assert_eq!(place(&r, 2, Some(&[0]), G).unwrap_err(), PlacementError::CountMismatch { given: 1, tp: 2 });
        assert_eq!(place(&r, 2, Some(&[1, 1]), G).unwrap_err(), PlacementError::DuplicateGpu(1));
        assert_eq!(place(&r, 2, Some(&[0, 5]), G).unwrap_err().to_string(), "GPU 5 does not exist (GPUs: 0, 1, 2)");
        assert_eq!(
            place(&report(&[40.0, 5.0]), 2, Some(&[0, 1]), 10 * G).unwrap_err().to_string(),
            "model needs 10.0 GiB, GPU 1 has 5.0 GiB free"
        );
    }

    #[test]
    fn refuses_without_gpus_or_with_too_few() {
        let unavailable = GpuReport { unavailable: Some("no driver".into()), ..GpuReport::default() };
        assert_eq!(place(&unavailable, 1, None, 1).unwrap_err().to_string(), "no GPUs to place on: no driver");
        assert_eq!(
            place(&GpuReport::default(), 1, None, 1).unwrap_err(),
            PlacementError::NoGpus("NVML lists no GPU".into())
        );
        assert_eq!(place(&report(&[1.0]), 0, None, 1).unwrap_err(), PlacementError::ZeroTp);
        assert_eq!(
            place(&report(&[80.0, 80.0]), 4, None, 1).unwrap_err().to_string(),
            "tp 4 needs 4 GPUs, this host has 2"
        );
    }
}
