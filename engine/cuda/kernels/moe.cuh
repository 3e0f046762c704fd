// Routed experts (Qwen3-MoE; DeepSeek's routing rules and shared experts). Included at the end of
// llmd.cu after prefill_attention.cuh: uses its bf16 typedef, warp helpers and the prefill:: mma,
// ldmatrix and cp.async helpers.
//
// One sparse layer on one rank: router GEMM (cuBLAS / GEMV, f32 logits [n_tokens, n_experts]) ->
// moe_route_f32 -> moe_align (group the (token, slot) pairs by expert, padded to whole
// tiles of BM rows) -> moe_gemm_gate_up_* (grouped tensor-core GEMM, SiLU·up in the epilogue) ->
// moe_gemm_down_* (grouped GEMM, routing weight in the epilogue) -> moe_sum_slots_bf16 (each
// token's slots summed in slot order). This rank's experts are stacked as
//   gate_up: [n_local, 2 * inter, hidden]  (an expert's gate rows, then its up rows)
//   down:    [n_local, hidden, inter]
// (ids from n_experts on are slices of the shared experts' MLP, on the last rank).
// Expert ids are global; expert e lives here when expert0 <= e < expert0 + n_local. A (token, slot)
// pair whose expert lives on another rank contributes nothing here (the ranks' outputs are summed).
// Every output value is a dot product in a fixed order (tensor-core k-steps of 16, in order) and the
// slot sum runs in slot order: results do not depend on the batch, the tile size or the order in
// which moe_align places a token within its expert's rows (its atomics only pick row positions).

#define MOE_MAX_EXPERTS 1024

// The warp's largest (best, best_i) over its lanes, ties to the lower index; every lane gets it.
__device__ __forceinline__ void warp_argmax(float& best, int& best_i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, best, o);
    const int oi = __shfl_xor_sync(FULL_MASK, best_i, o);
    if (ov > best || (ov == best && oi < best_i)) {
      best = ov;
      best_i = oi;
    }
  }
}

// Routing of one token, as llmd_models::models::routing::route computes it:
//   scores p = softmax(logits) or sigmoid(logits) in f32; choice c = p + bias (bias: [n_experts]
//   f32 or null); with n_group > 1 the experts form n_group equal groups in id order, ranked by
//   their best c (group_top2 = 0) or the sum of their two best (1); the best keep_group groups
//   stay and the other groups' c become 0 (they still compete, with 0). The top_k largest c in
//   descending order, ties to the lower expert id; weight = p of the chosen expert, divided by
//   (sum of the chosen weights, in the order chosen, + 1e-20) when `renormalize`, times `scaling`.
//   Then n_shared more slots: the shared-expert slices n_experts .. n_experts + n_shared - 1, weight 1
//   (DeepSeekMoE's shared experts, added unweighted).
//   logits: [n_tokens, n_experts] f32;  ids, weights: [n_tokens, top_k + n_shared] int32 / f32.
// A choice that is NaN is never taken; a token left without a valid expert gets id n_experts,
// which no rank holds (its MLP output is 0), and weight 0.
// grid = n_tokens, block = 32. n_experts <= MOE_MAX_EXPERTS, top_k <= n_experts, n_group <= 32.
// Lane l owns experts l, l + 32, ...: it alone writes their p and c; reads of other lanes'
// values come after a __syncwarp.
extern "C" __global__ void __launch_bounds__(32) moe_route_f32(int32_t* __restrict__ ids, float* __restrict__ weights,
                                                              const float* __restrict__ logits,
                                                              const float* __restrict__ bias, int n_experts,
                                                              int top_k, int n_shared, int sigmoid, int n_group,
                                                              int keep_group, int group_top2, int renormalize,
                                                              float scaling) {
  __shared__ float p[MOE_MAX_EXPERTS];
  __shared__ float c[MOE_MAX_EXPERTS];
  const int lane = threadIdx.x;
  const size_t t = blockIdx.x;
  const float* row = logits + t * n_experts;
  if (sigmoid) {
    for (int e = lane; e < n_experts; e += 32) p[e] = 1.f / (1.f + expf(-row[e]));
  } else {
    float m = -INFINITY;
    for (int e = lane; e < n_experts; e += 32) m = fmaxf(m, row[e]);
    m = warp_max(m);
    float s = 0.f;
    for (int e = lane; e < n_experts; e += 32) {
      const float v = expf(row[e] - m);
      p[e] = v;
      s += v;
    }
    s = warp_sum(s);
    for (int e = lane; e < n_experts; e += 32) p[e] = p[e] / s;
  }
  for (int e = lane; e < n_experts; e += 32) c[e] = bias != nullptr ? p[e] + bias[e] : p[e];
  __syncwarp();
  if (n_group > 1) {
    const int size = n_experts / n_group;
    float g = -INFINITY;
    if (lane < n_group) {
      float a = -INFINITY, b = -INFINITY;
      for (int e = lane * size; e < (lane + 1) * size; e++) {
        const float v = c[e];
        if (v > a) {
          b = a;
          a = v;
        } else if (v > b) {
          b = v;
        }
      }
      g = group_top2 ? a + b : a;
    }
    unsigned kept = 0;
    bool taken = lane >= n_group;
    for (int j = 0; j < keep_group; j++) {
      float best = -INFINITY;
      int best_i = 32;
      if (!taken) {
        best = g;
        best_i = lane;
      }
      warp_argmax(best, best_i);
      if (best_i < 32) {
        kept |= 1u << best_i;
        if (lane == best_i) taken = true;
      }
    }
    __syncwarp();  // every lane has read c for its group
    for (int e = lane; e < n_experts; e += 32) {
      if (!((kept >> (e / size)) & 1u)) c[e] = 0.f;
    }
  }
  int32_t* out_ids = ids + t * (top_k + n_shared);
  float* out_w = weights + t * (top_k + n_shared);
  float norm = 0.f;
  for (int j = 0; j < top_k; j++) {
    float best = -INFINITY;
    int best_i = n_experts;
    for (int e = lane; e < n_experts; e += 32) {
      const float v = c[e];  // taken experts hold NaN, which compares false
      if (v > best || (v == best && e < best_i)) {
        best = v;
        best_i = e;
      }
    }
    warp_argmax(best, best_i);
    if (best_i < n_experts && (best_i & 31) == lane) c[best_i] = NAN;
    if (lane == 0) {
      const float w = best_i < n_experts ? p[best_i] : 0.f;
      out_ids[j] = best_i;
      out_w[j] = w;
      norm += w;
    }
  }
  if (lane == 0) {
    const float d = renormalize ? norm + 1e-20f : 1.f;
    for (int j = 0; j < top_k; j++) out_w[j] = out_w[j] / d * scaling;
    for (int j = 0; j < n_shared; j++) {
      out_ids[top_k + j] = n_experts + j;
      out_w[top_k + j] = 1.f;
    }
  }
}

// Groups the (token, slot) pairs routed to this rank's experts by expert. Expert e (local) gets
// ceil(count_e / bm) consecutive m-blocks of bm rows; its pairs fill the first count_e rows of
// them (any order) and the rest hold -1.
//   ids: [pairs] int32 global expert ids;  sorted: [>= max_mblocks * bm] int32 pair index or -1;
//   block_expert: [max_mblocks] int32 local expert of each m-block;  n_mblocks: [1] int32.
// Rows past n_mblocks * bm are not written; the GEMMs skip m-blocks >= n_mblocks.
// grid = 1, block = 1024 (one thread per local expert for the scan). n_local <= MOE_MAX_EXPERTS.
extern "C" __global__ void __launch_bounds__(1024) moe_align(int32_t* __restrict__ sorted,
                                                             int32_t* __restrict__ block_expert,
                                                             int32_t* __restrict__ n_mblocks,
                                                             const int32_t* __restrict__ ids, int pairs,
                                                             int expert0, int n_local, int bm) {
  __shared__ int count[MOE_MAX_EXPERTS];
  __shared__ int row0[MOE_MAX_EXPERTS];
  __shared__ uint64_t scan_scratch[32];
  const int tid = threadIdx.x;
  for (int e = tid; e < n_local; e += blockDim.x) count[e] = 0;
  __syncthreads();
  for (int p = tid; p < pairs; p += blockDim.x) {
    const int e = ids[p] - expert0;
    if (e >= 0 && e < n_local) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  // Exclusive scan of the m-block counts over the experts, thread e holding expert e.
  const int nb = tid < n_local ? (count[tid] + bm - 1) / bm : 0;
  uint64_t total;
  const int first = (int)block_exclusive_scan_1024((uint64_t)nb, scan_scratch, &total);
  const int total_blocks = (int)total;
  if (tid < n_local) {
    row0[tid] = first * bm;
    for (int b = 0; b < nb; b++) block_expert[first + b] = tid;
    count[tid] = 0;  // from here on: the expert's next free row
  }
  if (tid == 0) *n_mblocks = total_blocks;
  const int rows = total_blocks * bm;
  for (int r = tid; r < rows; r += blockDim.x) sorted[r] = -1;
  __syncthreads();  // the -1 fill is visible before any pair overwrites its row
  for (int p = tid; p < pairs; p += blockDim.x) {
    const int e = ids[p] - expert0;
    if (e >= 0 && e < n_local) sorted[row0[e] + atomicAdd(&count[e], 1)] = p;
  }
}

namespace moe {
using prefill::cp_async16;
using prefill::cp_async_commit;
using prefill::cp_async_wait;
using prefill::ldmatrix_x4;
using prefill::mma_16816;
using prefill::smem_addr;
using prefill::swizzle;

enum class Kind { GateUp, Down };
}  // namespace moe

// Grouped expert GEMM over the m-blocks of moe_align: m-block mb (grid.x) holds bm rows of one
// local expert e = block_expert[mb]; grid.y walks BN weight rows of that expert. Per tile:
// C[bm, BN] = A[bm, K] · W_e[rows, K]ᵀ on bf16 tensor cores (mma.sync m16n8k16, f32 accumulate),
// k-steps in order, operands staged through a STAGES-deep cp.async pipeline in XOR-swizzled
// shared memory. Rows whose sorted entry is -1 are zero-filled and never stored.
//
// Kind::GateUp: K = hidden, A row r = x[sorted[r] / top_k]; W = gate_up [n_local, 2 * inter, hidden].
//   Tile column block nb covers act columns i0 = nb * BN/2 .. +BN/2: shared row j is gate row
//   i0 + 8 (j / 16) + j % 8 when j % 16 < 8, else up row inter + (same), so n8-tiles 2c and 2c+1
//   of a warp hold gate and up of the same 8 columns and the epilogue computes
//   act[r, i] = bf16(bf16(silu(bf16 g)) * bf16 u)   (the dense path's rounding), rows r < n_mblocks * bm.
// Kind::Down: K = inter, A row r = act[r]; W = down [n_local, hidden, inter], N = hidden;
//   pair_out[sorted[r], n] = bf16(bf16(c) * weights[sorted[r]]).
// grid = (max_mblocks, ceil(N_rows / BN)), block = 32 * WARPS_M * WARPS_N,
// dynamic shared memory = STAGES * (BM + BN) * BK * 2 bytes.
template <moe::Kind KIND, int BM, int BN, int BK, int STAGES, int WARPS_M, int WARPS_N>
__device__ __forceinline__ void moe_gemm_impl(bf16* __restrict__ out, const bf16* __restrict__ a,
                                              const bf16* __restrict__ w, const int32_t* __restrict__ sorted,
                                              const int32_t* __restrict__ block_expert,
                                              const int32_t* __restrict__ n_mblocks,
                                              const float* __restrict__ weights, int top_k, int k_dim,
                                              int n_out, int w_rows) {
  using namespace moe;
  static_assert(BK % 64 == 0, "rows of >= 8 swizzled 16-byte chunks");
  constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static_assert(THREADS >= BM, "one thread per row reads the m-block's pair indices");
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(MT >= 1 && NT % 2 == 0, "warp tile of whole m16 x n16 pieces");
  constexpr int A_CHUNKS = BM * BK / 8, B_CHUNKS = BN * BK / 8;
  static_assert(A_CHUNKS % THREADS == 0 || THREADS % A_CHUNKS == 0, "A chunks spread over threads");

  const int mb = blockIdx.x;
  if (mb >= *n_mblocks) return;
  extern __shared__ __align__(16) unsigned char moe_smem[];
  bf16* s_a = reinterpret_cast<bf16*>(moe_smem);  // [STAGES][BM][BK]
  bf16* s_b = s_a + STAGES * BM * BK;              // [STAGES][BN][BK]
  __shared__ int s_pair[BM];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int g8 = lane >> 2, tig = lane & 3;
  const int e = block_expert[mb];
  const int row_base = mb * BM;
  if (tid < BM) s_pair[tid] = sorted[row_base + tid];
  __syncthreads();

  // Global source of A row r (null: zero-fill) and of shared weight row j.
  auto a_row = [&](int r) -> const bf16* {
    const int p = s_pair[r];
    if (p < 0) return nullptr;
    if constexpr (KIND == Kind::GateUp) return a + (size_t)(p / top_k) * k_dim;
    else return a + (size_t)(row_base + r) * k_dim;
  };
  const bf16* w_e = w + (size_t)e * w_rows * k_dim;
  auto b_row = [&](int j) -> const bf16* {
    int n;
    if constexpr (KIND == Kind::GateUp) {
      const int i = blockIdx.y * (BN / 2) + 8 * (j / 16) + (j & 7);
      if (i >= n_out) return nullptr;
      n = (j & 8) ? n_out + i : i;
    } else {
      n = blockIdx.y * BN + j;
      if (n >= n_out) return nullptr;
    }
    return w_e + (size_t)n * k_dim;
  };

  const int k_tiles = (k_dim + BK - 1) / BK;
  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * BK;
    bf16* sa = s_a + stage * BM * BK;
    bf16* sb = s_b + stage * BN * BK;
    for (int c = tid; c < A_CHUNKS; c += THREADS) {
      const int r = c / (BK / 8), ch = c % (BK / 8);
      const bf16* src = a_row(r);
      const bool ok = src != nullptr && k0 + ch * 8 < k_dim;
      cp_async16(smem_addr(sa + swizzle<BK>(r, ch)), ok ? src + k0 + ch * 8 : a, ok);
    }
#pragma unroll
    for (int c = tid; c < B_CHUNKS; c += THREADS) {
      const int j = c / (BK / 8), ch = c % (BK / 8);
      const bf16* src = b_row(j);
      const bool ok = src != nullptr && k0 + ch * 8 < k_dim;
      cp_async16(smem_addr(sb + swizzle<BK>(j, ch)), ok ? src + k0 + ch * 8 : w, ok);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; mt++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int q = 0; q < 4; q++) acc[mt][nt][q] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; s++) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; kt++) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt has landed for every thread; stage (kt - 1) % STAGES is free
    if (kt + STAGES - 1 < k_tiles) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
    cp_async_commit();
    const bf16* sa = s_a + (kt % STAGES) * BM * BK;
    const bf16* sb = s_b + (kt % STAGES) * BN * BK;
#pragma unroll
    for (int ks = 0; ks < BK / 16; ks++) {
      uint32_t af[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; mt++) {
        const int r = warp_m * WM + mt * 16 + (lane & 15);
        ldmatrix_x4(af[mt], smem_addr(sa + swizzle<BK>(r, 2 * ks + (lane >> 4))));
      }
#pragma unroll
      for (int np = 0; np < NT / 2; np++) {
        uint32_t bf[4];
        const int j = warp_n * WN + np * 16 + ((lane >> 4) << 3) + (lane & 7);
        ldmatrix_x4(bf, smem_addr(sb + swizzle<BK>(j, 2 * ks + ((lane >> 3) & 1))));
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          mma_16816(acc[mt][2 * np], af[mt], bf[0], bf[1]);
          mma_16816(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: fragment (mt, nt) element q is row g8 (+8 for q >= 2), column 2 tig + (q & 1).
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
      const int r = warp_m * WM + mt * 16 + g8 + 8 * half;
      const int p = s_pair[r];
      if (p < 0) continue;
      if constexpr (KIND == Kind::GateUp) {
#pragma unroll
        for (int c = 0; c < NT / 2; c++) {
          const int i = blockIdx.y * (BN / 2) + (warp_n * WN + c * 16) / 2 + 2 * tig;
          if (i >= n_out) continue;
          float v[2];
#pragma unroll
          for (int q = 0; q < 2; q++) {
            const float g = __bfloat162float(__float2bfloat16(acc[mt][2 * c][2 * half + q]));
            const float u = __bfloat162float(__float2bfloat16(acc[mt][2 * c + 1][2 * half + q]));
            v[q] = __bfloat162float(__float2bfloat16(g / (1.f + __expf(-g)))) * u;
          }
          *reinterpret_cast<__nv_bfloat162*>(out + (size_t)(row_base + r) * n_out + i) =
              __floats2bfloat162_rn(v[0], v[1]);
        }
      } else {
        const float wt = weights[p];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
          const int n = blockIdx.y * BN + warp_n * WN + nt * 8 + 2 * tig;
          if (n >= n_out) continue;
          const float v0 = __bfloat162float(__float2bfloat16(acc[mt][nt][2 * half])) * wt;
          const float v1 = __bfloat162float(__float2bfloat16(acc[mt][nt][2 * half + 1])) * wt;
          *reinterpret_cast<__nv_bfloat162*>(out + (size_t)p * n_out + n) = __floats2bfloat162_rn(v0, v1);
        }
      }
    }
  }
}

// The instantiations, named moe_gemm_{gate_up,down}_m{BM}_n{BN}_k{BK}_s{STAGES}_w{WARPS_M}x{WARPS_N}
// (the table src/module.rs loads). Measured on an H200 at Qwen3-30B-A3B shapes
// (bench/results/2026-12-02-h200-moe/): with one token, 8 experts touched, the narrow 64 x 128
// tile streams 1.8 TB/s where the wide 128 x 64 one makes too few CTAs (1.1 TB/s); from two
// tokens on the wide one is faster (3.4 TB/s at 64 tokens). Larger m-blocks carry more stages
// in flight per SM (32) or more warps (128, for prefill, where the GEMMs are compute-bound).
// At most 128 registers per thread (launch bounds), so that two 8-warp CTAs fit an SM.
#define MOE_GEMM(KIND_NAME, KIND, BM, BN, BK, STAGES, WM, WN)                                              \
  extern "C" __global__ void __launch_bounds__(32 * WM * WN, 512 / (32 * WM * WN))                         \
      moe_gemm_##KIND_NAME##_m##BM##_n##BN##_k##BK##_s##STAGES##_w##WM##x##WN(                             \
          bf16* __restrict__ out, const bf16* __restrict__ a, const bf16* __restrict__ w,                  \
          const int32_t* __restrict__ sorted, const int32_t* __restrict__ block_expert,                    \
          const int32_t* __restrict__ n_mblocks, const float* __restrict__ weights, int top_k, int k_dim,   \
          int n_out, int w_rows) {                                                                         \
    moe_gemm_impl<KIND, BM, BN, BK, STAGES, WM, WN>(out, a, w, sorted, block_expert, n_mblocks, weights,  \
                                                    top_k, k_dim, n_out, w_rows);                          \
  }
#define MOE_GEMM_BOTH(BM, BN, BK, STAGES, WM, WN)                      \
  MOE_GEMM(gate_up, moe::Kind::GateUp, BM, BN, BK, STAGES, WM, WN) \
  MOE_GEMM(down, moe::Kind::Down, BM, BN, BK, STAGES, WM, WN)
MOE_GEMM_BOTH(16, 128, 64, 4, 1, 4)
MOE_GEMM_BOTH(16, 64, 128, 4, 1, 4)
MOE_GEMM_BOTH(32, 128, 64, 4, 1, 4)
MOE_GEMM_BOTH(32, 128, 64, 5, 2, 2)
MOE_GEMM_BOTH(64, 128, 64, 4, 2, 2)
MOE_GEMM_BOTH(128, 128, 64, 3, 2, 4)
#undef MOE_GEMM_BOTH
#undef MOE_GEMM

// out[t, :] = bf16(sum over slots j = 0..top_k-1, in order, whose expert ids[t * top_k + j] is one
// of this rank's [expert0, expert0 + n_local) of pair_out[t * top_k + j, :]), f32 sums; zero when
// no slot is local.  pair_out: [n_tokens * top_k, hidden] bf16;  out: [n_tokens, hidden] bf16.
// hidden % 8 == 0.  grid = (n_tokens, ceil(hidden / 8 / 128)), block = 128.
extern "C" __global__ void __launch_bounds__(128) moe_sum_slots_bf16(bf16* __restrict__ out,
                                                                    const bf16* __restrict__ pair_out,
                                                                    const int32_t* __restrict__ ids,
                                                                    int top_k, int hidden, int expert0,
                                                                    int n_local) {
  const size_t t = blockIdx.x;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;  // 8-wide chunk
  if (c * 8 >= hidden) return;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < top_k; j++) {
    const size_t p = t * top_k + j;
    const int e = ids[p] - expert0;
    if (e < 0 || e >= n_local) continue;
    const uint4 v = *reinterpret_cast<const uint4*>(pair_out + p * hidden + c * 8);
    const bf16* x = reinterpret_cast<const bf16*>(&v);
#pragma unroll
    for (int q = 0; q < 8; q++) acc[q] += __bfloat162float(x[q]);
  }
  uint4 o;
  __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
  for (int q = 0; q < 4; q++) o2[q] = __floats2bfloat162_rn(acc[2 * q], acc[2 * q + 1]);
  *reinterpret_cast<uint4*>(out + t * hidden + c * 8) = o;
}
