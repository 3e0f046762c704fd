// Prefill attention over the paged KV cache on bf16 tensor cores (flash-attention-2 style).
// Included by llmd.cu after its common definitions (bf16, FULL_MASK); wrapped by
// src/prefill_attention.rs, whose doc states the same contract.
//
// paged_attention_bf16_* (llmd.cu) gives every query token its own block and re-reads the whole
// context per query: right for decode, wasteful for a prompt. Here one CTA takes a tile of
// BLOCK_M query rows of one sequence and one KV head, where a row is a (query token, query head)
// pair of that KV head's group: row r of a sequence with `group` query heads per KV head is token
// r / group, head kv_head * group + r % group. Each K/V tile (BLOCK_N keys gathered from the block
// table into shared memory) thus serves all heads of the group. Per K/V tile:
//   S = Q·Kᵀ (mma.sync m16n8k16 bf16, f32 accumulate) -> causal mask per row (key <= the row's
//   own position) -> online softmax in f32 (base 2) -> O += P·V (P rounded to bf16, as FA2).
// Warp w owns rows 16w..16w+15 of the tile; Q stays in registers for the whole loop. K/V tiles
// are double-buffered with cp.async; shared-memory rows are XOR-swizzled by 16-byte chunk so the
// ldmatrix reads are free of bank conflicts.
//
//   out, q:       [n_queries, n_heads, HEAD_DIM] bf16
//   k_cache, v_cache: [num_blocks, block_size, n_kv_heads, HEAD_DIM] bf16
//   block_tables: [n_seqs, max_blocks_per_seq] int32;  query_pos: [n_queries] int32
//   tiles:        [n_tiles, 4] int32 = {seq (row of block_tables), q_start (first query of the
//                 sequence in the batch), q_len (its query count), row0 (first row of the tile)}
// grid = (n_kv_heads, n_tiles), block = 128, dynamic shared memory = 4 * BLOCK_N * HEAD_DIM * 2 bytes.
// Keys are read at positions 0 ..= max position of the tile's rows (all written by the time
// attention runs); key tiles past that are zero-filled, so unwritten slots are never touched.
// Rows of the tile past q_len * group are computed as if at position 0 and not stored.
#include <stdint.h>

namespace prefill {
constexpr int BLOCK_M = 64;  // query rows per CTA (16 per warp)
constexpr int BLOCK_N = 64;  // keys per K/V tile
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills the destination when !valid (nothing is read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i; register i of lane l
// holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (transposed with .trans).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[16x8] += a[16x16] · b[16x8], bf16 inputs, f32 accumulators (PTX fragment layouts).
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as bf16x2: `lo` in the low half (the lower column of an mma fragment).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile, chunks XOR-swizzled
// by row % 8 (D / 8 >= 8 chunks per row, so the swizzle stays inside the row).
template <int D>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}
}  // namespace prefill

template <int D>
__device__ void prefill_attention_impl(bf16* __restrict__ out, const bf16* __restrict__ q,
                                       const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                       const int32_t* __restrict__ block_tables, int max_blocks_per_seq,
                                       const int32_t* __restrict__ query_pos, const int32_t* __restrict__ tiles,
                                       int n_heads, int n_kv_heads, int block_size, float scale) {
  using namespace prefill;
  static_assert(D % 64 == 0, "head_dim must be a multiple of 64 (8 swizzled chunks per row)");
  static_assert(BLOCK_M <= BLOCK_N, "the Q tile is staged in the second K buffer");
  static_assert((BLOCK_N * D / 8) % THREADS == 0, "whole 16-byte chunks per thread");
  constexpr int CHUNKS = D / 8;             // 16-byte chunks per row
  constexpr int TILE = BLOCK_N * D;         // elements of one K or V tile
  constexpr int KSTEPS = D / 16;            // k-steps of S = Q·Kᵀ
  constexpr int NT_S = BLOCK_N / 8;         // 8-key column tiles of S
  constexpr int NT_O = D / 8;               // 8-wide column tiles of O

  extern __shared__ __align__(16) unsigned char prefill_smem[];
  bf16* s_k = reinterpret_cast<bf16*>(prefill_smem);  // [2][BLOCK_N][D]
  bf16* s_v = s_k + 2 * TILE;                         // [2][BLOCK_N][D]
  bf16* s_q = s_k + TILE;                             // [BLOCK_M][D], before the loop only
  __shared__ int s_kv_len;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g8 = lane >> 2, tig = lane & 3;  // mma fragment row / column pair
  const int mi = lane >> 3, r8 = lane & 7;   // ldmatrix matrix / row served by this lane
  const int kvh = blockIdx.x;
  const int4 tile = reinterpret_cast<const int4*>(tiles)[blockIdx.y];
  const int seq = tile.x, q_start = tile.y, q_len = tile.z, row0 = tile.w;
  const int group = n_heads / n_kv_heads;
  const int rows = min(BLOCK_M, q_len * group - row0);  // rows of this tile that exist
  const int32_t* table = block_tables + (size_t)seq * max_blocks_per_seq;
  const float scale_log2 = scale * LOG2E;

  // Query row r of the tile: its token index in the batch and its offset in q/out.
  auto row_token = [&](int r) { return q_start + (row0 + r) / group; };
  auto row_offset = [&](int r) {
    return ((size_t)row_token(r) * n_heads + kvh * group + (row0 + r) % group) * D;
  };

  // Keys needed: positions 0 ..= the largest position among the tile's rows.
  if (tid == 0) s_kv_len = 1;
  __syncthreads();
  if (tid < rows) atomicMax(&s_kv_len, query_pos[row_token(tid)] + 1);

  // Q tile -> shared (rows that do not exist are zero).
#pragma unroll
  for (int i = 0; i < BLOCK_M * CHUNKS / THREADS; i++) {
    const int c = tid + i * THREADS, r = c / CHUNKS, ch = c % CHUNKS;
    const bool valid = r < rows;
    const bf16* src = valid ? q + row_offset(r) + ch * 8 : q;
    cp_async16(smem_addr(s_q + swizzle<D>(r, ch)), src, valid);
  }
  cp_async_commit();
  __syncthreads();  // s_kv_len is final
  const int kv_len = s_kv_len;
  const int n_kv_tiles = (kv_len + BLOCK_N - 1) / BLOCK_N;

  // K/V tile j -> buffer `stage`, gathered through the block table; keys >= kv_len zero-filled.
  auto load_kv = [&](int j, int stage) {
    const int n0 = j * BLOCK_N;
    bf16* dk = s_k + stage * TILE;
    bf16* dv = s_v + stage * TILE;
#pragma unroll
    for (int i = 0; i < BLOCK_N * CHUNKS / THREADS; i++) {
      const int c = tid + i * THREADS, r = c / CHUNKS, ch = c % CHUNKS;
      const int pos = n0 + r;
      const bool valid = pos < kv_len;
      size_t off = 0;
      if (valid) {
        const int64_t slot = (int64_t)table[pos / block_size] * block_size + pos % block_size;
        off = ((size_t)slot * n_kv_heads + kvh) * D + ch * 8;
      }
      const int at = swizzle<D>(r, ch);
      cp_async16(smem_addr(dk + at), k_cache + off, valid);
      cp_async16(smem_addr(dv + at), v_cache + off, valid);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  // Q fragments of this warp's 16 rows, kept in registers.
  cp_async_wait<1>();  // the Q group has landed
  __syncthreads();
  uint32_t qf[KSTEPS][4];
#pragma unroll
  for (int kk = 0; kk < KSTEPS; kk++) {
    const int r = warp * 16 + (mi & 1) * 8 + r8;
    ldmatrix_x4(qf[kk], smem_addr(s_q + swizzle<D>(r, 2 * kk + (mi >> 1))));
  }
  __syncthreads();  // s_q (second K buffer) is free for tile 1

  // Positions of the two rows this thread accumulates (g8 and g8 + 8 of the warp's 16).
  const int r_lo = warp * 16 + g8, r_hi = r_lo + 8;
  const int pos_lo = r_lo < rows ? query_pos[row_token(r_lo)] : 0;
  const int pos_hi = r_hi < rows ? query_pos[row_token(r_hi)] : 0;

  float o[NT_O][4];
#pragma unroll
  for (int t = 0; t < NT_O; t++) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  for (int j = 0; j < n_kv_tiles; j++) {
    const int stage = j & 1;
    if (j + 1 < n_kv_tiles) {
      load_kv(j + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* tk = s_k + stage * TILE;
    const bf16* tv = s_v + stage * TILE;

    // S = Q·Kᵀ for 16 rows x BLOCK_N keys.
    float s[NT_S][4];
#pragma unroll
    for (int t = 0; t < NT_S; t++) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; kk++) {
#pragma unroll
      for (int nn = 0; nn < NT_S / 2; nn++) {
        uint32_t b[4];
        const int key = nn * 16 + (mi >> 1) * 8 + r8;
        ldmatrix_x4(b, smem_addr(tk + swizzle<D>(key, 2 * kk + (mi & 1))));
        mma_16816(s[2 * nn], qf[kk], b[0], b[1]);
        mma_16816(s[2 * nn + 1], qf[kk], b[2], b[3]);
      }
    }

    // Causal mask and online softmax (rows g8 / g8 + 8; a row's 4 lanes share its statistics).
    const int n0 = j * BLOCK_N;
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int t = 0; t < NT_S; t++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int key = n0 + t * 8 + tig * 2 + e;
        s[t][e] = key <= pos_lo ? s[t][e] * scale_log2 : -INFINITY;
        s[t][2 + e] = key <= pos_hi ? s[t][2 + e] * scale_log2 : -INFINITY;
        mx_lo = fmaxf(mx_lo, s[t][e]);
        mx_hi = fmaxf(mx_hi, s[t][2 + e]);
      }
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(FULL_MASK, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(FULL_MASK, mx_hi, off));
    }
    const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
    // A row with no visible key yet keeps max -inf: use 0 as the base so nothing becomes NaN.
    const float base_lo = new_lo == -INFINITY ? 0.f : new_lo;
    const float base_hi = new_hi == -INFINITY ? 0.f : new_hi;
    const float corr_lo = exp2f(m_lo - base_lo), corr_hi = exp2f(m_hi - base_hi);
    m_lo = new_lo;
    m_hi = new_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int t = 0; t < NT_S; t++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        s[t][e] = exp2f(s[t][e] - base_lo);
        s[t][2 + e] = exp2f(s[t][2 + e] - base_hi);
        sum_lo += s[t][e];
        sum_hi += s[t][2 + e];
      }
    }
    l_lo = l_lo * corr_lo + sum_lo;
    l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
    for (int t = 0; t < NT_O; t++) {
      o[t][0] *= corr_lo;
      o[t][1] *= corr_lo;
      o[t][2] *= corr_hi;
      o[t][3] *= corr_hi;
    }

    // O += P·V: the S accumulators of two 8-key tiles form one A fragment of 16 keys.
#pragma unroll
    for (int kk = 0; kk < BLOCK_N / 16; kk++) {
      const uint32_t a[4] = {pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                             pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dd = 0; dd < D / 16; dd++) {
        uint32_t b[4];
        const int key = kk * 16 + (mi & 1) * 8 + r8;
        ldmatrix_x4_trans(b, smem_addr(tv + swizzle<D>(key, 2 * dd + (mi >> 1))));
        mma_16816(o[2 * dd], a, b[0], b[1]);
        mma_16816(o[2 * dd + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with buffer `stage` before it is refilled
  }

  // Normalise and store the rows that exist.
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_lo += __shfl_xor_sync(FULL_MASK, l_lo, off);
    l_hi += __shfl_xor_sync(FULL_MASK, l_hi, off);
  }
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f;
  const float inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  if (r_lo < rows) {
    bf16* dst = out + row_offset(r_lo) + tig * 2;
#pragma unroll
    for (int t = 0; t < NT_O; t++)
      *reinterpret_cast<uint32_t*>(dst + t * 8) = pack_bf16x2(o[t][0] * inv_lo, o[t][1] * inv_lo);
  }
  if (r_hi < rows) {
    bf16* dst = out + row_offset(r_hi) + tig * 2;
#pragma unroll
    for (int t = 0; t < NT_O; t++)
      *reinterpret_cast<uint32_t*>(dst + t * 8) = pack_bf16x2(o[t][2] * inv_hi, o[t][3] * inv_hi);
  }
}

#define DEFINE_PREFILL_ATTENTION(D)                                                                            \
  extern "C" __global__ void __launch_bounds__(prefill::THREADS) prefill_attention_bf16_d##D(                 \
      bf16* out, const bf16* q, const bf16* k_cache, const bf16* v_cache, const int32_t* block_tables,        \
      int max_blocks_per_seq, const int32_t* query_pos, const int32_t* tiles, int n_heads, int n_kv_heads,    \
      int block_size, float scale) {                                                                          \
    prefill_attention_impl<D>(out, q, k_cache, v_cache, block_tables, max_blocks_per_seq, query_pos, tiles,   \
                              n_heads, n_kv_heads, block_size, scale);                                        \
  }

DEFINE_PREFILL_ATTENTION(64)
DEFINE_PREFILL_ATTENTION(128)
