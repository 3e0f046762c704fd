// llmd CUDA kernels: everything a dense decoder layer needs besides the GEMMs (cuBLAS).
//
// Conventions (shared with src/kernels.rs, whose safe wrappers document the same shapes):
// - activations are bf16, row-major, one row per token;
// - the paged KV cache of one layer is two arrays [num_blocks, block_size, n_kv_heads, head_dim]
//   (K and V); a token's slot is block_id * block_size + offset;
// - arithmetic is done in f32 and rounded to bf16 once per stored value.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

typedef __nv_bfloat16 bf16;

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). All threads get the result.
__device__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float x = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
    x = warp_sum(x);
    if (lane == 0) total = x;
  }
  __syncthreads();
  return total;
}

// Block-wide exclusive prefix sum of one value per thread, in thread order (deterministic), for
// blocks of exactly 1024 threads (32 warps; scratch holds 32 values). *total receives the block's
// sum. All threads must call it. Used by token picking and moe_align.
__device__ uint64_t block_exclusive_scan_1024(uint64_t v, uint64_t* scratch, uint64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t y = __shfl_up_sync(FULL_MASK, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    uint64_t w = scratch[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t y = __shfl_up_sync(FULL_MASK, w, o);
      if (lane >= o) w += y;
    }
    scratch[lane] = w;
  }
  __syncthreads();
  const uint64_t before = (warp > 0 ? scratch[warp - 1] : 0) + x - v;
  *total = scratch[31];
  __syncthreads();
  return before;
}

// Vocabulary-parallel embedding: out[t, :] = table[ids[t] - lo, :] when lo <= ids[t] < lo + rows,
// zeros otherwise (the ranks' outputs are then summed). One GPU: lo = 0, rows = vocab.
// table: [rows, hidden].  grid = n_tokens, block = 256.
extern "C" __global__ void embedding_bf16(bf16* __restrict__ out, const bf16* __restrict__ table,
                                          const uint32_t* __restrict__ ids, int hidden, uint32_t lo, uint32_t rows) {
  const size_t t = blockIdx.x;
  bf16* o = out + t * hidden;
  const uint32_t id = ids[t];
  if (id < lo || id >= lo + rows) {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __float2bfloat16(0.f);
    return;
  }
  const bf16* row = table + (size_t)(id - lo) * hidden;
  if ((hidden & 7) == 0) {
    const uint4* src = reinterpret_cast<const uint4*>(row);
    uint4* dst = reinterpret_cast<uint4*>(o);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) dst[i] = src[i];
  } else {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = row[i];
  }
}

// Fused residual add + RMSNorm, as HF computes it:
//   if x != null: residual[t] = bf16(residual[t] + x[t])
//   out[t] = weight * bf16(residual[t] * rsqrt(mean(residual[t]^2) + eps))
// grid = n_tokens, block = 256..1024 (multiple of 32).
extern "C" __global__ void add_rmsnorm_bf16(bf16* __restrict__ out, bf16* __restrict__ residual,
                                            const bf16* __restrict__ x, const bf16* __restrict__ weight,
                                            int hidden, float eps) {
  const size_t base = (size_t)blockIdx.x * hidden;
  float sumsq = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float r = __bfloat162float(residual[base + i]);
    if (x != nullptr) {
      bf16 s = __float2bfloat16(r + __bfloat162float(x[base + i]));
      residual[base + i] = s;
      r = __bfloat162float(s);
    }
    sumsq += r * r;
  }
  const float inv = rsqrtf(block_sum(sumsq) / (float)hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float normed = __bfloat162float(__float2bfloat16(__bfloat162float(residual[base + i]) * inv));
    out[base + i] = __float2bfloat16(normed * __bfloat162float(weight[i]));
  }
}

// Applies the optional per-head RMSNorm (Qwen3 q_norm/k_norm) and rotary embedding (HF rotate_half
// layout) to one head of `head_dim` values held by a warp as pairs (p, p + head_dim/2).
template <int MAX_PAIRS>
__device__ __forceinline__ void norm_rope_head(float (&x1)[MAX_PAIRS], float (&x2)[MAX_PAIRS], int half,
                                               const bf16* __restrict__ norm_w, float eps,
                                               const float* __restrict__ cos_sin_row, bool rotate) {
  const int lane = threadIdx.x & 31;
  if (norm_w != nullptr) {
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < MAX_PAIRS; k++) {
      int p = lane + 32 * k;
      if (p < half) ss += x1[k] * x1[k] + x2[k] * x2[k];
    }
    float inv = rsqrtf(warp_sum(ss) / (float)(2 * half) + eps);
#pragma unroll
    for (int k = 0; k < MAX_PAIRS; k++) {
      int p = lane + 32 * k;
      if (p < half) {
        x1[k] = __bfloat162float(__float2bfloat16(x1[k] * inv)) * __bfloat162float(norm_w[p]);
        x2[k] = __bfloat162float(__float2bfloat16(x2[k] * inv)) * __bfloat162float(norm_w[p + half]);
        x1[k] = __bfloat162float(__float2bfloat16(x1[k]));
        x2[k] = __bfloat162float(__float2bfloat16(x2[k]));
      }
    }
  }
  if (rotate) {
#pragma unroll
    for (int k = 0; k < MAX_PAIRS; k++) {
      int p = lane + 32 * k;
      if (p < half) {
        float c = cos_sin_row[p], s = cos_sin_row[half + p];
        float a = x1[k], b = x2[k];
        x1[k] = a * c - b * s;
        x2[k] = b * c + a * s;
      }
    }
  }
}

// QKV post-processing fused with the KV-cache write.
//   qkv:      [n_tokens, (n_heads + 2*n_kv_heads) * head_dim]  output of the fused QKV GEMM
//   bias:     [(n_heads + 2*n_kv_heads) * head_dim] or null     (Qwen2)
//   q_norm_w, k_norm_w: [head_dim] or null                     (Qwen3)
//   cos_sin:  [max_positions, head_dim] f32: cos in [0, head_dim/2), sin in [head_dim/2, head_dim)
//   positions:[n_tokens] int32;  slots: [n_tokens] int64 (block * block_size + offset)
//   q_out:    [n_tokens, n_heads, head_dim]
//   k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim]
// grid = n_tokens, block = 32 * warps; warp w handles heads w, w + warps, ... (q heads, then k, then v).
// head_dim must be even and at most 256.
extern "C" __global__ void qkv_rope_cache_bf16(const bf16* __restrict__ qkv, const bf16* __restrict__ bias,
                                               const bf16* __restrict__ q_norm_w, const bf16* __restrict__ k_norm_w,
                                               float eps, const float* __restrict__ cos_sin,
                                               const int32_t* __restrict__ positions, const int64_t* __restrict__ slots,
                                               bf16* __restrict__ q_out, bf16* __restrict__ k_cache,
                                               bf16* __restrict__ v_cache, int n_heads, int n_kv_heads, int head_dim) {
  constexpr int MAX_PAIRS = 4;  // head_dim <= 256
  const int t = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int half = head_dim / 2;
  const int total_heads = n_heads + 2 * n_kv_heads;
  const size_t row = (size_t)t * total_heads * head_dim;
  const float* cs = cos_sin + (size_t)positions[t] * head_dim;
  const int64_t slot = slots[t];
  for (int h = warp; h < total_heads; h += warps) {
    const size_t off = (size_t)h * head_dim;
    float x1[MAX_PAIRS], x2[MAX_PAIRS];
#pragma unroll
    for (int k = 0; k < MAX_PAIRS; k++) {
      int p = lane + 32 * k;
      x1[k] = 0.f;
      x2[k] = 0.f;
      if (p < half) {
        x1[k] = __bfloat162float(qkv[row + off + p]);
        x2[k] = __bfloat162float(qkv[row + off + p + half]);
        if (bias != nullptr) {
          x1[k] = __bfloat162float(__float2bfloat16(x1[k] + __bfloat162float(bias[off + p])));
          x2[k] = __bfloat162float(__float2bfloat16(x2[k] + __bfloat162float(bias[off + p + half])));
        }
      }
    }
    bf16* dst;
    if (h < n_heads) {
      norm_rope_head<MAX_PAIRS>(x1, x2, half, q_norm_w, eps, cs, true);
      dst = q_out + ((size_t)t * n_heads + h) * head_dim;
    } else if (h < n_heads + n_kv_heads) {
      norm_rope_head<MAX_PAIRS>(x1, x2, half, k_norm_w, eps, cs, true);
      if (slot < 0) continue;
      dst = k_cache + ((size_t)slot * n_kv_heads + (h - n_heads)) * head_dim;
    } else {
      if (slot < 0) continue;
      dst = v_cache + ((size_t)slot * n_kv_heads + (h - n_heads - n_kv_heads)) * head_dim;
    }
#pragma unroll
    for (int k = 0; k < MAX_PAIRS; k++) {
      int p = lane + 32 * k;
      if (p < half) {
        dst[p] = __float2bfloat16(x1[k]);
        dst[p + half] = __float2bfloat16(x2[k]);
      }
    }
  }
}

// Paged attention, split along the context (flash-decoding), GQA-aware: one block serves all
// query heads of one KV head for one query token and one split of its context.
//   q:            [n_queries, n_heads, head_dim]
//   k_cache, v_cache: [num_blocks, block_size, n_kv_heads, head_dim]
//   block_tables: [n_seqs, max_blocks_per_seq] int32;  query_seq: [n_queries] int32 (row of block_tables)
//   query_pos:    [n_queries] int32: the query attends to positions 0..=query_pos (causal)
//   part_acc:     [n_queries, n_heads, n_splits, head_dim] f32 (unnormalised)
//   part_ml:      [n_queries, n_heads, n_splits, 2] f32 (running max, running sum)
// grid = (n_queries, n_kv_heads, n_splits), block = 128 (4 warps; warps stride over tokens).
// EPL = head_dim / 32 values per lane; GROUP_MAX >= n_heads / n_kv_heads.
// out[0..N) = the N bf16 at p as floats (zeros when !valid), in one vector load where N allows
// (p is N-element aligned: a lane's slice of a head).
template <int N>
__device__ __forceinline__ void load_bf16_row(float* out, const bf16* p, bool valid) {
  if constexpr (N == 2 || N == 4 || N == 8) {
    using Vec = typename std::conditional<N == 2, uint32_t, typename std::conditional<N == 4, uint2, uint4>::type>::type;
    Vec raw{};
    if (valid) raw = *reinterpret_cast<const Vec*>(p);
    const bf16* b = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
    for (int e = 0; e < N; e++) out[e] = __bfloat162float(b[e]);
  } else {
#pragma unroll
    for (int e = 0; e < N; e++) out[e] = valid ? __bfloat162float(p[e]) : 0.f;
  }
}

template <int EPL, int GROUP_MAX>
__device__ void paged_attention_impl(const bf16* __restrict__ q, const bf16* __restrict__ k_cache,
                                     const bf16* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                                     int max_blocks_per_seq, const int32_t* __restrict__ query_seq,
                                     const int32_t* __restrict__ query_pos, float* __restrict__ part_acc,
                                     float* __restrict__ part_ml, int n_heads, int n_kv_heads, int block_size,
                                     int split_len, float scale) {
  constexpr int HEAD_DIM = EPL * 32;
  constexpr int WARPS = 4;
  const int qi = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int group = n_heads / n_kv_heads;
  const int ctx = query_pos[qi] + 1;
  const int begin = split * split_len;
  const int end = min(ctx, begin + split_len);
  const int32_t* table = block_tables + (size_t)query_seq[qi] * max_blocks_per_seq;
  // A split past this query's context (the plan covers the longest one): the merge stops
  // before it, so nothing is written.
  if (begin >= end) return;

  float qv[GROUP_MAX][EPL];
#pragma unroll
  for (int g = 0; g < GROUP_MAX; g++) {
#pragma unroll
    for (int e = 0; e < EPL; e++) {
      qv[g][e] = 0.f;
      if (g < group) {
        int h = kvh * group + g;
        qv[g][e] = __bfloat162float(q[((size_t)qi * n_heads + h) * HEAD_DIM + lane * EPL + e]) * scale;
      }
    }
  }
  float m[GROUP_MAX], l[GROUP_MAX], acc[GROUP_MAX][EPL];
#pragma unroll
  for (int g = 0; g < GROUP_MAX; g++) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; e++) acc[g][e] = 0.f;
  }

  // Each warp takes UNROLL positions per iteration and issues all their block-table and K/V
  // loads before using any: the loop is latency-bound (table -> K/V -> score), and one position
  // at a time left each block waiting ~1 us per key (measured 75 us per layer at batch 1).
  constexpr int UNROLL = 4;
  for (int pos0 = begin + warp; pos0 < end; pos0 += WARPS * UNROLL) {
    int64_t slot[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; j++) {
      const int pos = pos0 + j * WARPS;
      slot[j] = pos < end ? (int64_t)table[pos / block_size] * block_size + pos % block_size : -1;
    }
    float kv[UNROLL][EPL], vv[UNROLL][EPL];
#pragma unroll
    for (int j = 0; j < UNROLL; j++) {
      const size_t base = ((size_t)(slot[j] < 0 ? 0 : slot[j]) * n_kv_heads + kvh) * HEAD_DIM + lane * EPL;
      load_bf16_row<EPL>(kv[j], k_cache + base, slot[j] >= 0);
      load_bf16_row<EPL>(vv[j], v_cache + base, slot[j] >= 0);
    }
#pragma unroll
    for (int j = 0; j < UNROLL; j++) {
      if (slot[j] < 0) continue;
#pragma unroll
      for (int g = 0; g < GROUP_MAX; g++) {
        if (g < group) {
          float s = 0.f;
#pragma unroll
          for (int e = 0; e < EPL; e++) s += qv[g][e] * kv[j][e];
          s = warp_sum(s);
          float m_new = fmaxf(m[g], s);
          float corr = __expf(m[g] - m_new);
          float p = __expf(s - m_new);
          l[g] = l[g] * corr + p;
#pragma unroll
          for (int e = 0; e < EPL; e++) acc[g][e] = acc[g][e] * corr + p * vv[j][e];
          m[g] = m_new;
        }
      }
    }
  }

  // Combine the 4 warps through shared memory.
  __shared__ float sm_ml[WARPS][GROUP_MAX][2];
  __shared__ float sm_acc[WARPS][GROUP_MAX][HEAD_DIM];
#pragma unroll
  for (int g = 0; g < GROUP_MAX; g++) {
    if (g < group) {
      if (lane == 0) {
        sm_ml[warp][g][0] = m[g];
        sm_ml[warp][g][1] = l[g];
      }
#pragma unroll
      for (int e = 0; e < EPL; e++) sm_acc[warp][g][lane * EPL + e] = acc[g][e];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < group * HEAD_DIM; idx += blockDim.x) {
    const int g = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float mm = -INFINITY;
    for (int w = 0; w < WARPS; w++) mm = fmaxf(mm, sm_ml[w][g][0]);
    float ll = 0.f, a = 0.f;
    if (mm != -INFINITY) {
      for (int w = 0; w < WARPS; w++) {
        float c = __expf(sm_ml[w][g][0] - mm);
        ll += sm_ml[w][g][1] * c;
        a += sm_acc[w][g][d] * c;
      }
    }
    const int h = kvh * group + g;
    const size_t pidx = ((size_t)qi * n_heads + h) * n_splits + split;
    part_acc[pidx * HEAD_DIM + d] = a;
    if (d == 0) {
      part_ml[pidx * 2] = mm;
      part_ml[pidx * 2 + 1] = ll;
    }
  }
}

#define DEFINE_PAGED_ATTENTION(EPL, GROUP)                                                                      \
  extern "C" __global__ void __launch_bounds__(128) paged_attention_bf16_d##EPL##_g##GROUP(                    \
      const bf16* q, const bf16* k_cache, const bf16* v_cache, const int32_t* block_tables,                     \
      int max_blocks_per_seq, const int32_t* query_seq, const int32_t* query_pos, float* part_acc,              \
      float* part_ml, int n_heads, int n_kv_heads, int block_size, int split_len, float scale) {                \
    paged_attention_impl<EPL, GROUP>(q, k_cache, v_cache, block_tables, max_blocks_per_seq, query_seq,          \
                                     query_pos, part_acc, part_ml, n_heads, n_kv_heads, block_size, split_len, \
                                     scale);                                                                    \
  }

// head_dim 32/64/96/128/256 (EPL 1,2,3,4,8) x GQA group up to 1, 2, 4, 8, 16.
DEFINE_PAGED_ATTENTION(1, 1)
DEFINE_PAGED_ATTENTION(1, 2)
DEFINE_PAGED_ATTENTION(1, 4)
DEFINE_PAGED_ATTENTION(1, 8)
DEFINE_PAGED_ATTENTION(1, 16)
DEFINE_PAGED_ATTENTION(2, 1)
DEFINE_PAGED_ATTENTION(2, 2)
DEFINE_PAGED_ATTENTION(2, 4)
DEFINE_PAGED_ATTENTION(2, 8)
DEFINE_PAGED_ATTENTION(2, 16)
DEFINE_PAGED_ATTENTION(3, 1)
DEFINE_PAGED_ATTENTION(3, 2)
DEFINE_PAGED_ATTENTION(3, 4)
DEFINE_PAGED_ATTENTION(3, 8)
DEFINE_PAGED_ATTENTION(4, 1)
DEFINE_PAGED_ATTENTION(4, 2)
DEFINE_PAGED_ATTENTION(4, 4)
DEFINE_PAGED_ATTENTION(4, 8)
DEFINE_PAGED_ATTENTION(4, 16)
DEFINE_PAGED_ATTENTION(8, 1)
DEFINE_PAGED_ATTENTION(8, 2)
DEFINE_PAGED_ATTENTION(8, 4)
DEFINE_PAGED_ATTENTION(8, 8)

// Merges the splits of paged_attention: out[qi, h, :] = sum_s acc_s * e^(m_s - M) / sum_s l_s * e^(m_s - M)
// over the splits that hold part of the query's context (the first ceil((query_pos + 1) / split_len)).
//   out: [n_queries, n_heads, head_dim] bf16.  grid = (n_queries, n_heads), block = head_dim (<= 256... 1024).
extern "C" __global__ void attention_merge_bf16(bf16* __restrict__ out, const float* __restrict__ part_acc,
                                                const float* __restrict__ part_ml,
                                                const int32_t* __restrict__ query_pos, int n_heads, int n_splits,
                                                int split_len, int head_dim) {
  const int qi = blockIdx.x, h = blockIdx.y;
  const size_t pbase = ((size_t)qi * n_heads + h) * n_splits;
  const int ctx = max(query_pos[qi] + 1, 0);
  const int active = min(n_splits, (ctx + split_len - 1) / split_len);
  float mm = -INFINITY;
  for (int s = 0; s < active; s++) mm = fmaxf(mm, part_ml[(pbase + s) * 2]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float ll = 0.f, a = 0.f;
    for (int s = 0; s < active; s++) {
      float ms = part_ml[(pbase + s) * 2];
      if (ms == -INFINITY) continue;
      float c = __expf(ms - mm);
      ll += part_ml[(pbase + s) * 2 + 1] * c;
      a += part_acc[(pbase + s) * head_dim + d] * c;
    }
    out[((size_t)qi * n_heads + h) * head_dim + d] = __float2bfloat16(ll > 0.f ? a / ll : 0.f);
  }
}

// Prefill attention on tensor cores: tiles of query rows per (sequence, KV head).
#include "prefill_attention.cuh"

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i], gate_up = [n_tokens, 2 * inter].
// grid = (ceil(inter / 256), n_tokens), block = 256.
extern "C" __global__ void silu_mul_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate_up, int inter) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= inter) return;
  const size_t t = blockIdx.y;
  float g = __bfloat162float(gate_up[t * 2 * inter + i]);
  float u = __bfloat162float(gate_up[t * 2 * inter + inter + i]);
  float s = __bfloat162float(__float2bfloat16(g / (1.f + __expf(-g))));
  out[t * inter + i] = __float2bfloat16(s * u);
}

// y[t, i] += b[i] (o_proj and MLP biases), y = [n_tokens, n], rounded once to bf16 as
// transformers' bias add after the bf16 matmul.  grid = (ceil(n / 256), n_tokens), block = 256.
extern "C" __global__ void add_bias_bf16(bf16* __restrict__ y, const bf16* __restrict__ b, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const size_t t = blockIdx.y;
  y[t * n + i] = __float2bfloat16(__bfloat162float(y[t * n + i]) + __bfloat162float(b[i]));
}

// Gathers rows: out[r, :] = x[rows[r], :].  grid = n_rows, block = 256.
extern "C" __global__ void gather_rows_bf16(bf16* __restrict__ out, const bf16* __restrict__ x,
                                            const int32_t* __restrict__ rows, int width) {
  const size_t r = blockIdx.x;
  const bf16* src = x + (size_t)rows[r] * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) out[r * width + i] = src[i];
}

// Token picking (greedy, sampling, penalties): the rule of llmd_models::pick.
#include "pick.cuh"


// Converts f32 to bf16 (weights of f32 checkpoints, staged through the device).  grid-stride.
extern "C" __global__ void f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ x, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16(x[i]);
}

// Converts f16 to bf16.  grid-stride.
extern "C" __global__ void f16_to_bf16(bf16* __restrict__ out, const __half* __restrict__ x, size_t n) {
  for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    out[i] = __float2bfloat16(__half2float(x[i]));
}

// Skinny GEMM for decode: y[t, n] = sum_k x[t, k] * w[n, k] for T rows of x (instantiated for T = 1, 2:
// measured faster than cuBLAS at one row and slower from four, bench/results/2026-11-21-h100-cuda-runner.md).
// Bandwidth-bound on w: each warp streams whole rows of w with 16-byte loads (8 bf16 per lane,
// 256 values per warp iteration), x is re-read from L1/L2 (it is tiny). K must be a multiple of 8.
//   x: bf16 [T, K]; w: bf16 [N, K]; y: [T, N] bf16 (OutT = bf16) or f32 (OutT = float).
// SPLIT warps share ROWS rows, each streaming every SPLIT-th 512-byte piece of them, and add their
// sums through shared memory: with few rows and long ones (70B's QKV at TP=4: 2,560 rows of 8,192)
// one warp per row leaves a long serial chain of loads per warp and part of the GPU idle.
// grid = ceil(N / (warps / SPLIT * ROWS)), block = 32 * warps (8); each warp group computes ROWS rows.
template <typename OutT, int T, int ROWS, int SPLIT>
__device__ void gemv_impl(OutT* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w, int n, int k) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int sub = warp % SPLIT;
  const int row0 = (blockIdx.x * (warps / SPLIT) + warp / SPLIT) * ROWS;
  if (SPLIT == 1 && row0 >= n) return;
  float acc[ROWS][T];
#pragma unroll
  for (int r = 0; r < ROWS; r++)
#pragma unroll
    for (int t = 0; t < T; t++) acc[r][t] = 0.f;
  const int chunks = row0 < n ? k / 8 : 0;  // 16-byte chunks per row
#pragma unroll 4
  for (int c = lane + 32 * sub; c < chunks; c += 32 * SPLIT) {
    float xv[T][8];
#pragma unroll
    for (int t = 0; t < T; t++) {
      uint4 raw = reinterpret_cast<const uint4*>(x + (size_t)t * k)[c];
      const bf16* xb = reinterpret_cast<const bf16*>(&raw);
#pragma unroll
      for (int e = 0; e < 8; e++) xv[t][e] = __bfloat162float(xb[e]);
    }
#pragma unroll
    for (int r = 0; r < ROWS; r++) {
      const int row = row0 + r;
      if (row < n) {
        uint4 raw = reinterpret_cast<const uint4*>(w + (size_t)row * k)[c];
        const bf16* wb = reinterpret_cast<const bf16*>(&raw);
        float wv[8];
#pragma unroll
        for (int e = 0; e < 8; e++) wv[e] = __bfloat162float(wb[e]);
#pragma unroll
        for (int t = 0; t < T; t++) {
#pragma unroll
          for (int e = 0; e < 8; e++) acc[r][t] += xv[t][e] * wv[e];
        }
      }
    }
  }
  __shared__ float part[SPLIT > 1 ? 8 : 1][ROWS][T];
#pragma unroll
  for (int r = 0; r < ROWS; r++) {
#pragma unroll
    for (int t = 0; t < T; t++) {
      float v = warp_sum(acc[r][t]);
      const int row = row0 + r;
      if constexpr (SPLIT > 1) {
        if (lane == 0) part[warp][r][t] = v;
      } else if (lane == 0 && row < n) {
        if constexpr (sizeof(OutT) == 4) {
          y[(size_t)t * n + row] = v;
        } else {
          y[(size_t)t * n + row] = __float2bfloat16(v);
        }
      }
    }
  }
  if constexpr (SPLIT > 1) {
    __syncthreads();
    if (sub == 0 && lane < ROWS * T) {
      const int r = lane / T, t = lane % T, row = row0 + r;
      if (row < n) {
        float v = 0.f;
#pragma unroll
        for (int s = 0; s < SPLIT; s++) v += part[warp + s][r][t];
        if constexpr (sizeof(OutT) == 4) {
          y[(size_t)t * n + row] = v;
        } else {
          y[(size_t)t * n + row] = __float2bfloat16(v);
        }
      }
    }
  }
}

// One row per warp group for T <= 3 (more blocks in flight), two for larger T (x re-reads halve).
// 256 threads: SPLIT is 1, 2 or 4 (see gemv_impl).
#define DEFINE_GEMV(NAME, OUT, T, SPLIT)                                                                    \
  extern "C" __global__ void __launch_bounds__(256) NAME##_t##T##_s##SPLIT(OUT* y, const bf16* x, const bf16* w, \
                                                                          int n, int k) {                  \
    gemv_impl<OUT, T, (T <= 3 ? 1 : 2), SPLIT>(y, x, w, n, k);                                              \
  }
#define DEFINE_GEMV_SPLITS(NAME, OUT, T) \
  DEFINE_GEMV(NAME, OUT, T, 1)           \
  DEFINE_GEMV(NAME, OUT, T, 2)           \
  DEFINE_GEMV(NAME, OUT, T, 4)
DEFINE_GEMV_SPLITS(gemv_bf16, bf16, 1)
DEFINE_GEMV_SPLITS(gemv_bf16, bf16, 2)
DEFINE_GEMV_SPLITS(gemv_f32, float, 1)
DEFINE_GEMV_SPLITS(gemv_f32, float, 2)

// Routed experts (Qwen3-MoE).
#include "moe.cuh"
#include "allreduce.cuh"
