//! The CUDA module built from `kernels/` (nvcc at build time, embedded as a fatbin) and the
//! handles of every kernel in it, loaded once per GPU into [`Kernels`]; also what was compiled
//! (paged-attention variants, prefill head sizes and tile shape), which the launch wrappers in
//! `kernels.rs`, `moe.rs`, `prefill_attention.rs` and `allreduce.rs` check against. Nothing here
//! launches: this is the ground the wrappers stand on.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::error::CudaError;

#[cfg(llmd_cuda_kernels)]
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llmd_kernels.fatbin"));
#[cfg(not(llmd_cuda_kernels))]
static FATBIN: &[u8] = &[];

/// Head dims (as values per lane = head_dim / 32) and GQA group caps compiled for paged attention.
const ATTENTION_VARIANTS: &[(usize, &[usize])] =
    &[(1, &[1, 2, 4, 8, 16]), (2, &[1, 2, 4, 8, 16]), (3, &[1, 2, 4, 8]), (4, &[1, 2, 4, 8, 16]), (8, &[1, 2, 4, 8])];

/// Launch shape of the tensor-core prefill attention kernel (`prefill::` in the kernel).
pub mod prefill {
    /// Query rows per CTA (`prefill::BLOCK_M` in the kernel).
    pub const BLOCK_M: usize = 64;
    /// Keys per K/V tile (`prefill::BLOCK_N`).
    pub const BLOCK_N: usize = 64;
    /// Threads per CTA (4 warps of 16 query rows).
    pub const THREADS: u32 = 128;
    /// Largest GQA group (query heads per KV head) served; bounds the tiles a step can need.
    pub const MAX_GROUP: usize = 16;
    /// Head sizes compiled.
    pub const HEAD_DIMS: [usize; 2] = [64, 128];

    /// Dynamic shared memory of one CTA: two stages of a K and a V tile.
    pub fn smem_bytes(head_dim: usize) -> usize {
        2 * 2 * BLOCK_N * head_dim * 2
    }
}

/// Every kernel of the module, as function handles of one GPU's context.
pub struct Kernels {
    pub(crate) embedding: CudaFunction,
    pub(crate) add_rmsnorm: CudaFunction,
    pub(crate) qkv_rope_cache: CudaFunction,
    pub(crate) attention: HashMap<(usize, usize), CudaFunction>,
    pub(crate) attention_merge: CudaFunction,
    pub(crate) silu_mul: CudaFunction,
    pub(crate) add_bias: CudaFunction,
    pub(crate) gather_rows: CudaFunction,
    pub(crate) pick: CudaFunction,
    pub(crate) f32_to_bf16: CudaFunction,
    pub(crate) f16_to_bf16: CudaFunction,
    /// Skinny GEMMs by row count 1..=GEMV_MAX_T, then by warps per output row (1, 2, 4):
    /// (bf16 output, f32 output).
    pub(crate) gemv: Vec<[(CudaFunction, CudaFunction); 3]>,
    /// Routed experts (Qwen3-MoE).
    pub(crate) moe: MoeKernels,
    /// Tensor-core prefill attention (head_dim 64 and 128).
    pub(crate) prefill: PrefillKernels,
    /// Peer-memory all-reduce fused with residual add + RMSNorm (`allreduce.rs`).
    pub(crate) allreduce: CudaFunction,
}

/// Most rows of `x` the GEMV kernels take; larger batches go to cuBLAS. Measured faster than
/// cuBLAS at 1 row and slower from 4 (bench/results/2026-11-21-h100-cuda-runner.md, run 3).
pub const GEMV_MAX_T: usize = 2;

impl Kernels {
    /// Loads the embedded module into `ctx` and resolves every kernel in it; fails with
    /// [`CudaError::NoKernels`] when the crate was built without nvcc.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Kernels, CudaError> {
        if FATBIN.is_empty() {
            return Err(CudaError::NoKernels);
        }
        let module = ctx.load_module(Ptx::from_binary(FATBIN.to_vec()))?;
        let f = |name: &str| module.load_function(name);
        let mut attention = HashMap::new();
        for (epl, groups) in ATTENTION_VARIANTS {
            for g in *groups {
                attention.insert((*epl, *g), f(&format!("paged_attention_bf16_d{epl}_g{g}"))?);
            }
        }
        Ok(Kernels {
            embedding: f("embedding_bf16")?,
            add_rmsnorm: f("add_rmsnorm_bf16")?,
            qkv_rope_cache: f("qkv_rope_cache_bf16")?,
            attention,
            attention_merge: f("attention_merge_bf16")?,
            silu_mul: f("silu_mul_bf16")?,
            add_bias: f("add_bias_bf16")?,
            gather_rows: f("gather_rows_bf16")?,
            pick: f("pick_tokens_f32")?,
            f32_to_bf16: f("f32_to_bf16")?,
            f16_to_bf16: f("f16_to_bf16")?,
            gemv: (1..=GEMV_MAX_T)
                .map(|t| {
                    let pair = |s: usize| -> Result<_, cudarc::driver::DriverError> {
                        Ok((f(&format!("gemv_bf16_t{t}_s{s}"))?, f(&format!("gemv_f32_t{t}_s{s}"))?))
                    };
                    Ok([pair(1)?, pair(2)?, pair(4)?])
                })
                .collect::<Result<_, cudarc::driver::DriverError>>()?,
            moe: MoeKernels::load(&module)?,
            prefill: PrefillKernels::load(&module)?,
            allreduce: f("allreduce_add_rmsnorm_bf16")?,
        })
    }

    /// The attention variant for `head_dim` and GQA group size, if compiled.
    pub(crate) fn attention_for(&self, head_dim: usize, group: usize) -> Option<&CudaFunction> {
        if !head_dim.is_multiple_of(32) {
            return None;
        }
        let epl = head_dim / 32;
        let (_, groups) = ATTENTION_VARIANTS.iter().find(|(e, _)| *e == epl)?;
        let cap = groups.iter().copied().find(|g| *g >= group)?;
        self.attention.get(&(epl, cap))
    }

    /// Whether paged attention supports this head size and GQA group.
    pub fn supports_attention(&self, head_dim: usize, group: usize) -> bool {
        self.attention_for(head_dim, group).is_some()
    }
}

/// Tile shapes of the grouped expert GEMMs (`MOE_GEMM_BOTH` in `kernels/moe.cuh`).
pub mod moe_gemm {
    /// One compiled tile shape.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Tile {
        /// Rows per m-block (tokens of one expert).
        pub block_m: usize,
        /// Weight rows per CTA.
        pub block_n: usize,
        /// k per pipeline stage.
        pub block_k: usize,
        pub stages: usize,
        /// Warps along m and along n.
        pub warps: (usize, usize),
    }

    const fn tile(block_m: usize, block_n: usize, block_k: usize, stages: usize, warps: (usize, usize)) -> Tile {
        Tile { block_m, block_n, block_k, stages, warps }
    }

    /// 16-row m-blocks in 128 x 64 weight tiles (decode from two tokens on).
    pub const M16_WIDE: Tile = tile(16, 128, 64, 4, (1, 4));
    /// 16-row m-blocks in 64 x 128 weight tiles (twice the CTAs, for steps touching few experts).
    pub const M16_NARROW: Tile = tile(16, 64, 128, 4, (1, 4));
    pub const M32: Tile = tile(32, 128, 64, 5, (2, 2));
    pub const M64: Tile = tile(64, 128, 64, 4, (2, 2));
    /// Prefill: 8 warps on a 128 x 128 tile.
    pub const M128: Tile = tile(128, 128, 64, 3, (2, 4));

    /// Every compiled shape, in the kernel file's order.
    pub const TILES: [Tile; 6] = [M16_WIDE, M16_NARROW, tile(32, 128, 64, 4, (1, 4)), M32, M64, M128];

    impl Tile {
        /// Dynamic shared memory of one CTA: its stages of an A and a weight tile.
        pub fn smem_bytes(&self) -> usize {
            self.stages * (self.block_m + self.block_n) * self.block_k * 2
        }

        /// Threads per CTA.
        pub fn threads(&self) -> u32 {
            (32 * self.warps.0 * self.warps.1) as u32
        }

        /// The kernel's name for `kind` ("gate_up" or "down").
        pub fn kernel_name(&self, kind: &str) -> String {
            format!(
                "moe_gemm_{kind}_m{}_n{}_k{}_s{}_w{}x{}",
                self.block_m, self.block_n, self.block_k, self.stages, self.warps.0, self.warps.1
            )
        }
    }
}

/// The routed-expert kernels (`kernels/moe.cuh`).
pub struct MoeKernels {
    pub(crate) route: CudaFunction,
    pub(crate) align: CudaFunction,
    /// Grouped GEMMs by tile shape ([`moe_gemm::TILES`]): (gate/up + SiLU·up, down), or the
    /// driver's refusal of their shared memory.
    pub(crate) gemm: Vec<Result<(CudaFunction, CudaFunction), String>>,
    pub(crate) sum_slots: CudaFunction,
}

impl MoeKernels {
    pub fn load(module: &Arc<CudaModule>) -> Result<MoeKernels, CudaError> {
        let gemm = moe_gemm::TILES
            .iter()
            .map(|tile| -> Result<_, CudaError> {
                let bytes = tile.smem_bytes() as i32;
                let pair = (
                    module.load_function(&tile.kernel_name("gate_up"))?,
                    module.load_function(&tile.kernel_name("down"))?,
                );
                // Above the 48 KiB granted without opting in (every target GPU allows 99 KiB).
                let attr = CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
                Ok(match pair.0.set_attribute(attr, bytes).and_then(|()| pair.1.set_attribute(attr, bytes)) {
                    Ok(()) => Ok(pair),
                    Err(e) => Err(format!("the GPU refused {bytes} bytes of shared memory for the MoE GEMM: {e}")),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(MoeKernels {
            route: module.load_function("moe_route_f32")?,
            align: module.load_function("moe_align")?,
            gemm,
            sum_slots: module.load_function("moe_sum_slots_bf16")?,
        })
    }
}

/// The tensor-core prefill attention kernels (`kernels/prefill_attention.cuh`); a head size
/// whose shared memory the GPU refuses has none.
pub struct PrefillKernels {
    d64: Option<CudaFunction>,
    d128: Option<CudaFunction>,
}

impl PrefillKernels {
    pub fn load(module: &Arc<CudaModule>) -> Result<PrefillKernels, CudaError> {
        let load = |d: usize| -> Result<Option<CudaFunction>, CudaError> {
            let f = module.load_function(&format!("prefill_attention_bf16_d{d}"))?;
            // head_dim 128 needs 64 KiB, above the 48 KiB granted without opting in (every
            // target GPU allows at least 99 KiB). A GPU that refuses keeps the paged kernel.
            let bytes = prefill::smem_bytes(d) as i32;
            match f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes) {
                Ok(()) => Ok(Some(f)),
                Err(e) => {
                    tracing::warn!(head_dim = d, error = %e, "prefill attention unavailable, using paged attention");
                    Ok(None)
                }
            }
        };
        Ok(PrefillKernels { d64: load(64)?, d128: load(128)? })
    }

    pub(crate) fn function(&self, head_dim: usize) -> Option<&CudaFunction> {
        match head_dim {
            64 => self.d64.as_ref(),
            128 => self.d128.as_ref(),
            _ => None,
        }
    }

    /// Whether the prefill kernel serves this head size and GQA group.
    pub fn supports(&self, head_dim: usize, group: usize) -> bool {
        (1..=prefill::MAX_GROUP).contains(&group) && self.function(head_dim).is_some()
    }
}
