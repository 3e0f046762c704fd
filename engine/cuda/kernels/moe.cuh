// Routed experts (Qwen3-MoE). Included at the end of llmd.cu: uses its bf16 typedef and warp helpers.
//
// One sparse layer on one rank: router GEMM (cuBLAS / GEMV, f32 logits [n_tokens, n_experts]) ->
// moe_topk_softmax_f32 -> moe_gate_up_silu_bf16 -> moe_down_sum_bf16. This rank's experts are
// stacked as
//   gate_up: [n_local, 2 * inter, hidden]  (an expert's gate rows, then its up rows)
//   down:    [n_local, hidden, inter]
// Expert ids are global; expert e lives here when expert0 <= e < expert0 + n_local. A (token, slot)
// pair whose expert lives on another rank contributes nothing here (the ranks' outputs are summed).
// Every output value is written by one thread in a fixed order (no atomics): results are
// deterministic and independent of the batch.

#define MOE_MAX_EXPERTS 1024

// Dot product of 8 bf16 pairs packed in 16-byte words, in f32.
__device__ __forceinline__ float bf16x8_dot(uint4 a, uint4 b) {
  const bf16* x = reinterpret_cast<const bf16*>(&a);
  const bf16* y = reinterpret_cast<const bf16*>(&b);
  float s = 0.f;
#pragma unroll
  for (int e = 0; e < 8; e++) s += __bfloat162float(x[e]) * __bfloat162float(y[e]);
  return s;
}

// Routing of one token, as the CPU reference (engine/models/src/models/qwen3_moe.rs) computes it:
// p = softmax(logits) in f32; the top_k largest p in descending order, ties to the lower expert id;
// weights = p / (sum of the chosen p, in the order chosen) when `renormalize`, else p.
//   logits: [n_tokens, n_experts] f32;  ids: [n_tokens, top_k] int32;  weights: [n_tokens, top_k] f32.
// A token whose probabilities are NaN gets id n_experts, which no rank holds (its MLP output is 0).
// grid = n_tokens, block = 32. n_experts <= MOE_MAX_EXPERTS, top_k <= n_experts.
// Lane l owns experts l, l + 32, ...: it alone writes and reads their p, so no barrier is needed.
extern "C" __global__ void __launch_bounds__(32) moe_topk_softmax_f32(int32_t* __restrict__ ids,
                                                                     float* __restrict__ weights,
                                                                     const float* __restrict__ logits,
                                                                     int n_experts, int top_k, int renormalize) {
  __shared__ float p[MOE_MAX_EXPERTS];
  const int lane = threadIdx.x;
  const size_t t = blockIdx.x;
  const float* row = logits + t * n_experts;
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
  int32_t* out_ids = ids + t * top_k;
  float* out_w = weights + t * top_k;
  float norm = 0.f;
  for (int j = 0; j < top_k; j++) {
    float best = -1.f;  // probabilities are >= 0; taken experts hold -2
    int best_i = n_experts;
    for (int e = lane; e < n_experts; e += 32) {
      if (p[e] > best) {  // strict: the lowest id of this lane wins ties
        best = p[e];
        best_i = e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(FULL_MASK, best, o);
      const int oi = __shfl_xor_sync(FULL_MASK, best_i, o);
      if (ov > best || (ov == best && oi < best_i)) {
        best = ov;
        best_i = oi;
      }
    }
    if (best_i < n_experts && (best_i & 31) == lane) p[best_i] = -2.f;
    if (lane == 0) {
      out_ids[j] = best_i;
      out_w[j] = best;
      norm += best;
    }
  }
  if (lane == 0 && renormalize) {
    for (int j = 0; j < top_k; j++) out_w[j] = out_w[j] / norm;
  }
}

// First half of the expert MLP, per (token, slot) pair p = t * top_k + j with local expert
// e = ids[p] - expert0:
//   act[p, i] = bf16(bf16(silu(g)) * u),  g = bf16(x[t] . gate_up[e, i]),  u = bf16(x[t] . gate_up[e, inter + i])
// (the rounding of the dense path: gate/up GEMM output in bf16, then silu_mul_bf16).
// Pairs of other ranks are skipped and their act rows left as they were.
//   x: [n_tokens, hidden] bf16;  ids: [n_tokens * top_k] int32;  gate_up: [n_local, 2 * inter, hidden] bf16;
//   act: [n_tokens * top_k, inter] bf16.  hidden % 8 == 0.
// grid = (n_tokens * top_k, ceil(inter / warps)), block = 32 * warps; warp w of block (p, b) computes
// i = b * warps + w, streaming the expert's two rows with 16-byte loads (x comes from L1/L2).
extern "C" __global__ void __launch_bounds__(256) moe_gate_up_silu_bf16(bf16* __restrict__ act,
                                                                       const bf16* __restrict__ x,
                                                                       const int32_t* __restrict__ ids,
                                                                       const bf16* __restrict__ gate_up, int top_k,
                                                                       int hidden, int inter, int expert0,
                                                                       int n_local) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const size_t p = blockIdx.x;
  const int i = blockIdx.y * warps + warp;
  const int e = ids[p] - expert0;
  if (i >= inter || e < 0 || e >= n_local) return;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (p / top_k) * hidden);
  const uint4* gr = reinterpret_cast<const uint4*>(gate_up + ((size_t)e * 2 * inter + i) * hidden);
  const uint4* ur = reinterpret_cast<const uint4*>(gate_up + ((size_t)e * 2 * inter + inter + i) * hidden);
  float g = 0.f, u = 0.f;
#pragma unroll 4
  for (int c = lane; c < hidden / 8; c += 32) {
    const uint4 xv = xr[c];
    g += bf16x8_dot(xv, gr[c]);
    u += bf16x8_dot(xv, ur[c]);
  }
  g = warp_sum(g);
  u = warp_sum(u);
  if (lane == 0) {
    g = __bfloat162float(__float2bfloat16(g));
    u = __bfloat162float(__float2bfloat16(u));
    const float sg = __bfloat162float(__float2bfloat16(g / (1.f + __expf(-g))));
    act[p * inter + i] = __float2bfloat16(sg * u);
  }
}

// Second half of the expert MLP fused with the weighted sum over the slots of each token:
//   out[t, h] = bf16(sum over j = 0..top_k-1 with a local expert e_j = ids[t * top_k + j] - expert0 of
//                    weights[t * top_k + j] * (act[t * top_k + j] . down[e_j, h]))
// in f32, slots in order; zero when no slot of the token is local.
//   act: [n_tokens * top_k, inter] bf16;  ids: [n_tokens * top_k] int32;  weights: [n_tokens * top_k] f32;
//   down: [n_local, hidden, inter] bf16;  out: [n_tokens, hidden] bf16.  inter % 8 == 0.
// grid = (n_tokens, ceil(hidden / warps)), block = 32 * warps; warp w of block (t, b) computes
// h = b * warps + w.
extern "C" __global__ void __launch_bounds__(256) moe_down_sum_bf16(bf16* __restrict__ out,
                                                                   const bf16* __restrict__ act,
                                                                   const int32_t* __restrict__ ids,
                                                                   const float* __restrict__ weights,
                                                                   const bf16* __restrict__ down, int top_k,
                                                                   int hidden, int inter, int expert0, int n_local) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const size_t t = blockIdx.x;
  const int h = blockIdx.y * warps + warp;
  if (h >= hidden) return;
  float acc = 0.f;
  for (int j = 0; j < top_k; j++) {
    const size_t p = t * top_k + j;
    const int e = ids[p] - expert0;
    if (e < 0 || e >= n_local) continue;
    const uint4* ar = reinterpret_cast<const uint4*>(act + p * inter);
    const uint4* wr = reinterpret_cast<const uint4*>(down + ((size_t)e * hidden + h) * inter);
    float d = 0.f;
#pragma unroll 4
    for (int c = lane; c < inter / 8; c += 32) d += bf16x8_dot(ar[c], wr[c]);
    acc += weights[p] * warp_sum(d);
  }
  if (lane == 0) out[t * hidden + h] = __float2bfloat16(acc);
}
