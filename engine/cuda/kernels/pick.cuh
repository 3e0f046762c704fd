// Token picking on the GPU: the rule of llmd_models::pick (engine/models/src/pick.rs),
// followed bit for bit so a seeded request gives the same token as the host rule would for the
// same logits. One block of PICK_THREADS per row. Probabilities are p = exp(x/T - max/T) in
// f32 with integer weights w = floor(p * 2^32); "by probability" compares the bits of p. All
// sums are integers (exact in any order), thresholds come from 8-bit radix selection in shared
// memory, and the final draw walks the ids in order (each thread owns one contiguous chunk).

#define PICK_THREADS 1024
#define PICK_WARPS (PICK_THREADS / 32)

// Mirrors llmd-cuda's PickParams (#[repr(C)], 40 bytes).
struct PickParams {
  uint32_t width;
  float temperature;
  uint32_t top_k;
  float top_p;
  float min_p;
  uint32_t adjust_start;
  uint32_t adjust_count;
  uint32_t pad;
  double uniform;
};
static_assert(sizeof(PickParams) == 40, "PickParams layout");

// Mirrors llmd_models::pick::LogitAdjust (#[repr(C)], 12 bytes).
struct PickAdjust {
  uint32_t token;
  float divide_positive;
  float subtract;
};
static_assert(sizeof(PickAdjust) == 12, "PickAdjust layout");

struct PickRow {
  float* logits;  // row base for one shard; shards > 1 use `stride`/`n_rows` addressing
  int stride, shards, n_rows, row;
  __device__ __forceinline__ size_t at(uint32_t i) const {
    if (shards == 1) return i;
    const uint32_t k = i / (uint32_t)stride;
    return ((size_t)k * n_rows) * stride + (i - k * (uint32_t)stride);
  }
  // NaN reads as -inf (the host rule turns NaN into -inf first).
  __device__ __forceinline__ float load(uint32_t i) const {
    const float x = logits[at(i)];
    return x != x ? -INFINITY : x;
  }
};

__device__ __forceinline__ float pick_prob(float x, float inv_t, float m) {
  // Explicit roundings: no FMA contraction, so the host rule computes the same bits.
  const float p = expf(__fsub_rn(__fmul_rn(x, inv_t), m));
  return p != p ? 0.f : p;
}

__device__ __forceinline__ uint64_t pick_weight(float p) { return (uint64_t)(p * 4294967296.0f); }

// Histogram updates, aggregated per warp first: the probabilities of one row share a few
// exponents, so most lanes hit the same bin and plain shared atomics would serialise (measured
// 1.6 ms per top-p row on an H100). `bin` 256 means "not counted"; all 32 lanes must call.
__device__ __forceinline__ void pick_hist_count(uint32_t* hist, uint32_t bin) {
  const unsigned peers = __match_any_sync(FULL_MASK, bin);
  if (bin < 256 && (threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], (uint32_t)__popc(peers));
}

__device__ __forceinline__ void pick_hist_sum(uint64_t* hist, uint32_t bin, uint64_t w) {
  const unsigned peers = __match_any_sync(FULL_MASK, bin);
  // w <= 2^32: 16-bit halves keep the sums of up to 32 lanes inside 32 bits. Each group of
  // peers reduces with its own mask (all lanes of a mask run this same call).
  const uint32_t lo = __reduce_add_sync(peers, (uint32_t)(w & 0xffffu));
  const uint32_t hi = __reduce_add_sync(peers, (uint32_t)(w >> 16));
  if (bin < 256 && (threadIdx.x & 31) == __ffs(peers) - 1)
    atomicAdd((unsigned long long*)&hist[bin], (unsigned long long)(((uint64_t)hi << 16) + lo));
}

// Loads per thread in flight: one block serves a whole row, so one SM's memory parallelism
// bounds each pass; eight independent loads per thread keep it busy.
#define PICK_ILP 8

// Calls f(i, x) for the ids of this thread, coalesced across the block. Every thread makes the
// same number of calls (ids past width read as -inf), so warp intrinsics inside f are safe.
// Radix selection step: walks a 256-bin histogram from the top bin down to the bin holding the
// rem-th largest (by count or by weight); returns that bin and, in *left, how much of rem falls
// inside it. Bin 0 takes whatever is left.
template <typename H>
__device__ __forceinline__ int pick_bin_walk(const H* hist, uint64_t rem, uint64_t* left) {
  int b = 255;
  for (; b > 0; --b) {
    if (hist[b] >= rem) break;
    rem -= hist[b];
  }
  *left = rem;
  return b;
}

template <typename F>
__device__ __forceinline__ void pick_sweep(const PickRow& r, uint32_t width, F&& f) {
  for (uint32_t i0 = 0; i0 < width; i0 += PICK_ILP * PICK_THREADS) {
    float x[PICK_ILP];
#pragma unroll
    for (int j = 0; j < PICK_ILP; ++j) {
      const uint32_t i = i0 + j * PICK_THREADS + threadIdx.x;
      x[j] = i < width ? r.load(i) : -INFINITY;
    }
#pragma unroll
    for (int j = 0; j < PICK_ILP; ++j) f(i0 + j * PICK_THREADS + threadIdx.x, x[j]);
  }
}

// Calls f(i, x) for this thread's contiguous chunk [lo, hi) in id order, loading ahead; stops
// when f returns true.
template <typename F>
__device__ __forceinline__ void pick_chunk(const PickRow& r, uint32_t lo, uint32_t hi, F&& f) {
  for (uint32_t i0 = lo; i0 < hi; i0 += PICK_ILP) {
    float x[PICK_ILP];
#pragma unroll
    for (int j = 0; j < PICK_ILP; ++j) x[j] = i0 + j < hi ? r.load(i0 + j) : -INFINITY;
#pragma unroll
    for (int j = 0; j < PICK_ILP; ++j)
      if (i0 + j < hi && f(i0 + j, x[j])) return;
  }
}

// Argmax over ids [0, width): ties to the lowest id; all -inf gives 0.
__device__ uint32_t pick_argmax(const PickRow& r, uint32_t width, float* sv, uint32_t* si) {
  float best = -INFINITY;
  uint32_t bi = 0xffffffffu;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) {
    const float x = r.load(i);
    if (bi == 0xffffffffu || x > best) {
      best = x;
      bi = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, best, o);
    const uint32_t oi = __shfl_xor_sync(FULL_MASK, bi, o);
    if (oi != 0xffffffffu && (bi == 0xffffffffu || ov > best || (ov == best && oi < bi))) {
      best = ov;
      bi = oi;
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sv[warp] = best;
    si[warp] = bi;
  }
  __syncthreads();
  if (warp == 0) {
    best = sv[lane];
    bi = si[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(FULL_MASK, best, o);
      const uint32_t oi = __shfl_xor_sync(FULL_MASK, bi, o);
      if (oi != 0xffffffffu && (bi == 0xffffffffu || ov > best || (ov == best && oi < bi))) {
        best = ov;
        bi = oi;
      }
    }
    if (lane == 0) si[0] = bi;
  }
  __syncthreads();
  const uint32_t result = si[0];
  __syncthreads();
  return result == 0xffffffffu ? 0 : result;
}

// out[r] = the token picked from row r of the logits (f32, [shards, n_rows, stride] with the
// row's ids i at shard i / stride; one shard is plain [n_rows, stride]). Rows with width 0
// get 0xffffffff. Adjustments are applied in place (the logits are scratch).
// grid = n_rows, block = PICK_THREADS.
extern "C" __global__ void __launch_bounds__(PICK_THREADS)
    pick_tokens_f32(uint32_t* __restrict__ out, float* __restrict__ logits, int stride, int shards, int n_rows,
                    const PickParams* __restrict__ params, const PickAdjust* __restrict__ adjust) {
  __shared__ uint64_t scratch[PICK_WARPS];
  __shared__ float sv[PICK_WARPS];
  __shared__ uint32_t si[PICK_WARPS];
  __shared__ uint32_t hist32[256];
  __shared__ uint64_t hist64[256];
  __shared__ uint32_t s_prefix;
  __shared__ uint64_t s_rem;
  __shared__ int s_active;

  const PickParams P = params[blockIdx.x];
  const uint32_t width = P.width;
  if (width == 0) {
    if (threadIdx.x == 0) out[blockIdx.x] = 0xffffffffu;
    return;
  }
  PickRow r;
  r.stride = stride;
  r.shards = shards;
  r.n_rows = n_rows;
  r.row = blockIdx.x;
  r.logits = logits + (size_t)blockIdx.x * stride;

  // 1. Penalties and masks (one entry per token: no two threads write one logit).
  for (uint32_t a = threadIdx.x; a < P.adjust_count; a += blockDim.x) {
    const PickAdjust A = adjust[P.adjust_start + a];
    if (A.token >= width) continue;
    float* x = r.logits + r.at(A.token);
    float v = *x;
    if (v != v) v = -INFINITY;
    v = v > 0.f ? __fdiv_rn(v, A.divide_positive) : __fmul_rn(v, A.divide_positive);
    v = __fsub_rn(v, A.subtract);
    *x = v != v ? -INFINITY : v;
  }
  __syncthreads();

  // 2. Greedy, or nothing finite to sample from: the argmax.
  const float inv_t = P.temperature == 0.f ? 0.f : __fdiv_rn(1.f, P.temperature);
  float m = -INFINITY;
  if (P.temperature != 0.f) {
    pick_sweep(r, width, [&](uint32_t, float x) { m = fmaxf(m, __fmul_rn(x, inv_t)); });
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) sv[threadIdx.x >> 5] = m;
    __syncthreads();
    m = sv[0];
    for (int w = 1; w < PICK_WARPS; ++w) m = fmaxf(m, sv[w]);
    __syncthreads();
  }
  if (P.temperature == 0.f || !isfinite(m)) {
    const uint32_t best = pick_argmax(r, width, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = best;
    return;
  }

  // The current candidate set: w > 0 and (no threshold, or key > v, or key == v among the
  // first n_eq such ids).
  bool thr = false;
  uint32_t v = 0;
  uint64_t n_eq = 0;

  // 3. top-k: the k-th largest key by radix selection over its four bytes.
  if (P.top_k > 0 && P.top_k < width) {
    uint32_t prefix = 0, mask = 0;
    uint64_t rem = P.top_k;
    int active = 1;
    for (int d = 3; d >= 0 && active; --d) {
      for (int b = threadIdx.x; b < 256; b += blockDim.x) hist32[b] = 0;
      __syncthreads();
      pick_sweep(r, width, [&](uint32_t, float x) {
        const float p = pick_prob(x, inv_t, m);
        const uint32_t key = __float_as_uint(p);
        const bool in = pick_weight(p) > 0 && (key & mask) == prefix;
        pick_hist_count(hist32, in ? (key >> (8 * d)) & 255 : 256u);
      });
      __syncthreads();
      if (threadIdx.x == 0) {
        if (d == 3) {
          uint64_t count = 0;
          for (int b = 0; b < 256; ++b) count += hist32[b];
          s_active = count > P.top_k;
        }
        if (s_active) {
          uint64_t left;
          const int b = pick_bin_walk(hist32, rem, &left);
          s_prefix = prefix | ((uint32_t)b << (8 * d));
          s_rem = left;
        }
      }
      __syncthreads();
      active = s_active;
      prefix = s_prefix;
      rem = s_rem;
      mask |= 255u << (8 * d);
      __syncthreads();
    }
    if (active) {
      thr = true;
      v = prefix;
      n_eq = rem;
    }
  }

  // 4. top-p over the current set: the shortest prefix by probability reaching the target.
  if (P.top_p < 1.f) {
    uint64_t part = 0;
    pick_sweep(r, width, [&](uint32_t, float x) {
      const float p = pick_prob(x, inv_t, m);
      const uint64_t w = pick_weight(p);
      if (w > 0 && (!thr || __float_as_uint(p) > v)) part += w;
    });
    uint64_t total;
    block_exclusive_scan_1024(part, scratch, &total);
    if (thr) total += n_eq * pick_weight(__uint_as_float(v));
    uint64_t target = (uint64_t)((double)P.top_p * (double)total);
    if (target < 1) target = 1;
    uint32_t prefix = 0, mask = 0;
    uint64_t rem = target;
    for (int d = 3; d >= 0; --d) {
      for (int b = threadIdx.x; b < 256; b += blockDim.x) hist64[b] = 0;
      __syncthreads();
      pick_sweep(r, width, [&](uint32_t, float x) {
        const float p = pick_prob(x, inv_t, m);
        const uint64_t w = pick_weight(p);
        const uint32_t key = __float_as_uint(p);
        const bool in = w > 0 && (!thr || key > v) && (key & mask) == prefix;
        pick_hist_sum(hist64, in ? (key >> (8 * d)) & 255 : 256u, in ? w : 0);
      });
      __syncthreads();
      if (threadIdx.x == 0) {
        // The tied ids at the top-k boundary count n_eq times, whatever their position.
        if (thr && (v & mask) == prefix) hist64[(v >> (8 * d)) & 255] += n_eq * pick_weight(__uint_as_float(v));
        uint64_t left;
        const int b = pick_bin_walk(hist64, rem, &left);
        s_prefix = prefix | ((uint32_t)b << (8 * d));
        s_rem = left;
      }
      __syncthreads();
      prefix = s_prefix;
      rem = s_rem;
      mask |= 255u << (8 * d);
      __syncthreads();
    }
    const uint64_t wv = pick_weight(__uint_as_float(prefix));
    uint64_t need = wv > 0 ? (rem + wv - 1) / wv : 1;
    if (thr && prefix == v && need > n_eq) need = n_eq;
    thr = true;
    v = prefix;
    n_eq = need;
  }

  // 5. min-p and the draw, in id order: each thread owns ids [lo, hi).
  const float min_p = P.min_p;
  const uint32_t chunk = (width + PICK_THREADS - 1) / PICK_THREADS;
  const uint32_t lo = min(threadIdx.x * chunk, width), hi = min(lo + chunk, width);
  uint64_t sum_gt = 0, eq_cnt = 0;
  pick_chunk(r, lo, hi, [&](uint32_t, float x) {
    const float p = pick_prob(x, inv_t, m);
    const uint64_t w = pick_weight(p);
    if (w == 0) return false;
    const uint32_t key = __float_as_uint(p);
    if (thr && key == v) {
      ++eq_cnt;
    } else if ((!thr || key > v) && p >= min_p) {
      sum_gt += w;
    }
    return false;
  });
  uint64_t eq_all;
  const uint64_t eq_base = block_exclusive_scan_1024(eq_cnt, scratch, &eq_all);
  uint64_t incl = 0;
  if (thr && n_eq > eq_base) incl = min(n_eq - eq_base, eq_cnt);
  const float pv = __uint_as_float(v);
  const uint64_t mine = sum_gt + (thr && pv >= min_p ? incl * pick_weight(pv) : 0);
  uint64_t total;
  const uint64_t base = block_exclusive_scan_1024(mine, scratch, &total);
  if (total == 0) {
    const uint32_t best = pick_argmax(r, width, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = best;
    return;
  }
  uint64_t target = (uint64_t)(P.uniform * (double)total);
  if (target > total - 1) target = total - 1;
  if (mine > 0 && base <= target && target < base + mine) {
    uint64_t cum = base, seen = eq_base;
    pick_chunk(r, lo, hi, [&](uint32_t i, float x) {
      const float p = pick_prob(x, inv_t, m);
      const uint64_t w = pick_weight(p);
      if (w == 0) return false;
      const uint32_t key = __float_as_uint(p);
      bool in;
      if (thr && key == v) {
        in = seen < n_eq;
        ++seen;
      } else {
        in = !thr || key > v;
      }
      if (in && p >= min_p) {
        cum += w;
        if (cum > target) {
          out[blockIdx.x] = i;
          return true;
        }
      }
      return false;
    });
  }
}
