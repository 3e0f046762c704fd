// One-shot all-reduce over peer memory (NVLink or PCIe P2P) fused with the residual add and RMSNorm
// that follow every all-reduce of a tensor-parallel decoder. Included at the end of llmd.cu: uses its
// bf16 typedef and block_sum.
//
// Every rank calls the kernel at the same point of the same step with the same grid. Rank r's input
// for this call site lives in a buffer the other ranks can read directly (peer access enabled between
// the contexts). Each block owns one token row:
//   1. arrival: thread p < world stores this block's call number into rank p's flag slot
//      [block][rank] (release, system scope), then waits until its own slot [block][p] reached it
//      (acquire): every rank's input row is then complete;
//   2. sum of the world input rows in rank order 0..world-1 in f32 (every rank gets the same bits),
//      rounded to bf16 as the single-GPU output projection would be;
//   3. residual = bf16(residual + sum) (or = sum when add_residual is 0: the embedding), then
//      out = weight * bf16(residual * rsqrt(mean(residual^2) + eps)), as add_rmsnorm_bf16.
//
// No barrier at the end: call sites rotate over three input buffers (attention output, MLP output,
// embedding), and a rank rewrites a buffer only two calls later, after the next call's arrival step,
// which peers pass only once they started that call, i.e. once their kernel of this call (and so
// every read of this buffer) finished in stream order.
//
// Flags: per rank, u32 [AR_MAX_BLOCKS][AR_MAX_RANKS] arrival slots followed by u32 [AR_MAX_BLOCKS]
// call counters (this rank's own). Counters advance the same way on every rank since all ranks launch
// the same grids in the same order. Comparisons are wrap-safe.
//
// grid = rows (at most AR_MAX_BLOCKS and at most the SM count, so all blocks are resident at once and
// the spin cannot wait on a block that is not scheduled), block = hidden / 8 rounded up to 32 (<= 1024).

#define AR_MAX_RANKS 8
#define AR_MAX_BLOCKS 128

__device__ __forceinline__ void ar_store_release(unsigned int* p, unsigned int v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned int ar_load_acquire(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

extern "C" __global__ void __launch_bounds__(1024)
    allreduce_add_rmsnorm_bf16(const unsigned long long* __restrict__ peer_in,
                               const unsigned long long* __restrict__ peer_flags, unsigned int* __restrict__ own_flags,
                               int rank, int world, bf16* __restrict__ residual, bf16* __restrict__ out,
                               const bf16* __restrict__ weight, int hidden, float eps, int add_residual) {
  const int row = blockIdx.x;
  __shared__ unsigned int call;
  if (threadIdx.x == 0) {
    unsigned int* counter = own_flags + AR_MAX_BLOCKS * AR_MAX_RANKS + row;
    call = *counter + 1;
    *counter = call;
  }
  __syncthreads();
  if (threadIdx.x < world) {
    const int p = threadIdx.x;
    unsigned int* theirs = reinterpret_cast<unsigned int*>(peer_flags[p]) + row * AR_MAX_RANKS + rank;
    ar_store_release(theirs, call);
    const unsigned int* mine = own_flags + row * AR_MAX_RANKS + p;
    while ((int)(ar_load_acquire(mine) - call) < 0) {
    }
  }
  __syncthreads();

  const int vecs = hidden / 8;
  const int i = threadIdx.x;
  const size_t at = (size_t)row * vecs + i;
  float r[8];
  float sumsq = 0.f;
  if (i < vecs) {
    float s[8];
#pragma unroll
    for (int e = 0; e < 8; e++) s[e] = 0.f;
    for (int p = 0; p < world; p++) {
      // L2-only load: the row lives in another GPU's memory and was written after this SM's L1
      // may have seen the same address in an earlier call.
      uint4 v = __ldcg(reinterpret_cast<const uint4*>(peer_in[p]) + at);
      const bf16* x = reinterpret_cast<const bf16*>(&v);
#pragma unroll
      for (int e = 0; e < 8; e++) s[e] += __bfloat162float(x[e]);
    }
    uint4 res_v = reinterpret_cast<const uint4*>(residual)[at];
    const bf16* res = reinterpret_cast<const bf16*>(&res_v);
    uint4 new_v;
    bf16* nr = reinterpret_cast<bf16*>(&new_v);
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const float x = __bfloat162float(__float2bfloat16(s[e]));
      nr[e] = add_residual ? __float2bfloat16(__bfloat162float(res[e]) + x) : __float2bfloat16(x);
      r[e] = __bfloat162float(nr[e]);
      sumsq += r[e] * r[e];
    }
    reinterpret_cast<uint4*>(residual)[at] = new_v;
  }
  const float inv = rsqrtf(block_sum(sumsq) / (float)hidden + eps);
  if (i < vecs) {
    uint4 w_v = reinterpret_cast<const uint4*>(weight)[i];
    const bf16* w = reinterpret_cast<const bf16*>(&w_v);
    uint4 o_v;
    bf16* o = reinterpret_cast<bf16*>(&o_v);
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const float normed = __bfloat162float(__float2bfloat16(r[e] * inv));
      o[e] = __float2bfloat16(normed * __bfloat162float(w[e]));
    }
    reinterpret_cast<uint4*>(out)[at] = o_v;
  }
}
