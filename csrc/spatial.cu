// Spatial attention (and any long group) in fp16/bf16: flash-style kernels on tensor cores,
// mma.sync.m16n8k16 with fp32 accumulation and ldmatrix from padded shared memory.
// See attention.h for the token layout; a group is [cls query?] + S patch queries against
// [cls key?] + S patch keys.
//
//   spatial_fwd_kernel       block = (b, g, h, 64 queries), 4 warps × 16 query rows; key/value
//                            tiles of 64 double-buffered with cp.async; online softmax in
//                            registers, P reused from the score accumulators as the A operand.
//   spatial_bwd_dkdv_kernel  block = (b, g, h, 64 keys), 4 warps × 16 key rows; streams query
//                            tiles (q, dO, lse, D); computes Sᵀ and dPᵀ so that the key rows stay
//                            in the accumulator rows.
//   spatial_bwd_dq_kernel    block = (b, g, h, 64 queries); streams key tiles.
//   bwd_rowdot_kernel        D = rowsum(dO ∘ O) per (token, head), before both backward kernels.
// No atomics: every dq/dk/dv row is owned by one block; the cls token's are per-group fp32
// partials (cls_dq, cls_dkv) summed over groups afterwards.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), used throughout:
//   A (16×16, row-major)  a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   B (16×8, k × n)       b0: (k=2t..2t+1, n=g)               b1: (k=2t+8.., n=g)
//   C (16×8 fp32)         c0,c1: (g, 2t..2t+1)                 c2,c3: (g+8, 2t..2t+1)
// so the accumulators of two neighbouring n8 blocks of S are, packed to 16 bits, exactly the A
// fragment of P for the next product.
#include <climits>

#include "layout.cuh"

namespace tk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRowsPerWarp = 16;
constexpr int kBlockRows = kWarps * kRowsPerWarp;  // rows owned by a block (queries or keys)

// Shared-memory row pitch in elements: +16 bytes so that the 8 rows read by one ldmatrix
// phase start in different banks.
template <int DH>
constexpr int pitch() {
  return DH + 8;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core primitives
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values as one 32-bit register of T, the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  __builtin_memcpy(&r, &h, 4);
  return r;
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  __builtin_memcpy(&r, &h, 4);
  return r;
}

// A fragments (16 rows × DH) of the warp's own rows of a [rows][pitch] tile.
template <int DH, typename T>
__device__ __forceinline__ void load_a_frags(uint32_t (&f)[DH / 16][4], const T* tile, int warp, int lane) {
  constexpr int LD = pitch<DH>();
#pragma unroll
  for (int kc = 0; kc < DH / 16; ++kc)
    ldmatrix_x4(f[kc], tile + (warp * kRowsPerWarp + (lane & 15)) * LD + kc * 16 + (lane >> 4) * 8);
}

// acc[n] += A · Bᵀ where A is the warp's 16×DH fragments and B is a [N][pitch] tile whose rows
// are the n index and whose columns are the DH (reduction) index: S = Q Kᵀ, dP = dO Vᵀ, ...
template <int DH, int N, typename T>
__device__ __forceinline__ void gemm_abt(float (&acc)[N / 8][4], const uint32_t (&a)[DH / 16][4], const T* tile,
                                         int lane) {
  constexpr int LD = pitch<DH>();
  const int mat = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kc = 0; kc < DH / 16; ++kc) {
#pragma unroll
    for (int nb = 0; nb < N / 8; nb += 2) {
      // matrices: (rows nb·8.., k lo), (nb·8.., k hi), (nb·8+8.., k lo), (nb·8+8.., k hi)
      uint32_t b[4];
      ldmatrix_x4(b, tile + (nb * 8 + (mat >> 1) * 8 + r) * LD + kc * 16 + (mat & 1) * 8);
      mma16816<T>(acc[nb], a[kc], b[0], b[1]);
      mma16816<T>(acc[nb + 1], a[kc], b[2], b[3]);
    }
  }
}

// acc[d] += P · B where P (16×K) is given as fp32 accumulators in C layout (converted here to A
// fragments) and B is a [K][pitch] tile with K rows and DH columns: O += P V, dV += Pᵀ dO, ...
template <int DH, int K, typename T>
__device__ __forceinline__ void gemm_pb(float (&acc)[DH / 8][4], const float (&pc)[K / 8][4], const T* tile, int lane) {
  constexpr int LD = pitch<DH>();
  const int mat = lane >> 3, r = lane & 7;
#pragma unroll
  for (int kc = 0; kc < K / 16; ++kc) {
    const uint32_t a[4] = {pack2<T>(pc[2 * kc][0], pc[2 * kc][1]), pack2<T>(pc[2 * kc][2], pc[2 * kc][3]),
                           pack2<T>(pc[2 * kc + 1][0], pc[2 * kc + 1][1]),
                           pack2<T>(pc[2 * kc + 1][2], pc[2 * kc + 1][3])};
#pragma unroll
    for (int db = 0; db < DH / 8; db += 2) {
      // transposed matrices: (k lo, cols db·8..), (k hi, db·8..), (k lo, db·8+8..), (k hi, db·8+8..)
      uint32_t b[4];
      ldmatrix_x4_trans(b, tile + (kc * 16 + (mat & 1) * 8 + r) * LD + db * 8 + (mat >> 1) * 8);
      mma16816<T>(acc[db], a, b[0], b[1]);
      mma16816<T>(acc[db + 1], a, b[2], b[3]);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int n = 0; n < N; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// Copies `ROWS` token rows of DH elements into a [ROWS][pitch] tile; rows >= valid are
// zero-filled. src(r) is the global address of row r's head slice (called for valid rows only).
template <int DH, int ROWS, typename T, typename SrcFn>
__device__ __forceinline__ void load_tile_async(T* tile, int64_t valid, SrcFn src, const void* fallback) {
  constexpr int CH = DH / 8;  // 16-byte chunks per row
  constexpr int LD = pitch<DH>();
  for (int c = threadIdx.x; c < ROWS * CH; c += kThreads) {
    const int r = c / CH, ch = c % CH;
    const bool ok = r < valid;
    cp_async16(tile + r * LD + ch * 8, ok ? src(r) + ch * 8 : nullptr, ok, fallback);
  }
}

// Writes the warp's 16 staged rows (T, [16][pitch]) with 16-byte stores; dst(r) gives the
// destination of row r or nullptr to skip it.
template <int DH, typename T, typename DstFn>
__device__ __forceinline__ void store_rows(const T* staged, int lane, DstFn dst) {
  constexpr int CH = DH / 8;
  constexpr int LD = pitch<DH>();
#pragma unroll
  for (int c = lane; c < kRowsPerWarp * CH; c += 32) {
    const int r = c / CH, ch = c % CH;
    T* d = dst(r);
    if (d != nullptr) *reinterpret_cast<uint4*>(d + ch * 8) = *reinterpret_cast<const uint4*>(staged + r * LD + ch * 8);
  }
}

// Stages the warp's 16×DH fp32 accumulators (times `mul`) as T into its rows of a [.][pitch]
// tile; the caller syncs the warp before reading them back.
template <int DH, typename T>
__device__ __forceinline__ void stage_rows(T* staged, const float (&acc)[DH / 8][4], float mul_lo, float mul_hi,
                                           int lane) {
  constexpr int LD = pitch<DH>();
  const int gr = lane >> 2, tc = lane & 3;
#pragma unroll
  for (int db = 0; db < DH / 8; ++db) {
    *reinterpret_cast<uint32_t*>(staged + gr * LD + db * 8 + 2 * tc) =
        pack2<T>(acc[db][0] * mul_lo, acc[db][1] * mul_lo);
    *reinterpret_cast<uint32_t*>(staged + (gr + 8) * LD + db * 8 + 2 * tc) =
        pack2<T>(acc[db][2] * mul_hi, acc[db][3] * mul_hi);
  }
}

// fp32 partial of the cls token: row 0 of the warp's accumulators (lanes 0..3 hold it).
template <int DH>
__device__ __forceinline__ void store_row0_f32(float* dst, const float (&acc)[DH / 8][4], float mul, int lane) {
  if (lane < 4) {
#pragma unroll
    for (int db = 0; db < DH / 8; ++db)
      *reinterpret_cast<float2*>(dst + db * 8 + 2 * lane) = make_float2(acc[db][0] * mul, acc[db][1] * mul);
  }
}

// Block index -> (tile, h, g, b), tile fastest so that blocks sharing K/V run together.
struct BlockCoords {
  int tile;
  int64_t h, g, b;
};

__device__ __forceinline__ BlockCoords block_coords(const AttnParams& p, int n_tiles) {
  int64_t w = blockIdx.x;
  BlockCoords c;
  c.tile = static_cast<int>(w % n_tiles);
  w /= n_tiles;
  c.h = w % p.num_heads;
  w /= p.num_heads;
  c.g = w % p.num_groups;
  c.b = w / p.num_groups;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <int DH>
struct FwdCfg {
  static constexpr int kBlockN = 64;  // keys per tile
  static constexpr size_t kSmem = size_t(kBlockRows + 4 * kBlockN) * pitch<DH>() * 2;  // Q + 2×(K, V)
};

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) spatial_fwd_kernel(const AttnParams p) {
  constexpr int BN = FwdCfg<DH>::kBlockN;
  constexpr int LD = pitch<DH>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [64][LD]; later the staged output
  T* sK = sQ + kBlockRows * LD;            // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                // [2][BN][LD]

  const int64_t sq = num_queries(p), sk = num_keys(p);
  const BlockCoords bc = block_coords(p, ceil_div(sq, kBlockRows));
  const int64_t b = bc.b, g = bc.g, h = bc.h;
  const int64_t q0 = int64_t(bc.tile) * kBlockRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* qkv = static_cast<const T*>(p.qkv);

  load_tile_async<DH, kBlockRows>(
      sQ, sq - q0, [&](int r) { return qkv + qkv_offset(p, b, query_token(p, b, g, q0 + r).qkv_row, 0, h, DH); },
      qkv);
  cp_async_commit();
  auto load_kv = [&](int tile, int stage) {
    const int64_t j0 = int64_t(tile) * BN;
    load_tile_async<DH, BN>(
        sK + stage * BN * LD, sk - j0,
        [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, j0 + r).qkv_row, 1, h, DH); }, qkv);
    load_tile_async<DH, BN>(
        sV + stage * BN * LD, sk - j0,
        [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, j0 + r).qkv_row, 2, h, DH); }, qkv);
  };
  load_kv(0, 0);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed
  __syncthreads();

  uint32_t qf[DH / 16][4];
  load_a_frags<DH>(qf, sQ, warp, lane);

  const float c = p.scale * kLog2e;  // scores in log2 units
  const int tc = lane & 3;
  float oacc[DH / 8][4];
  zero(oacc);
  float m[2] = {-INFINITY, -INFINITY};  // rows lane/4 and lane/4 + 8 of the warp
  float l[2] = {0.f, 0.f};              // this lane's share of the row sums

  const int n_kt = ceil_div(sk, BN);
  for (int t = 0; t < n_kt; ++t) {
    if (t + 1 < n_kt) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();  // possibly empty: keeps the group count uniform
    cp_async_wait<1>();
    __syncthreads();
    const T* k_tile = sK + (t & 1) * BN * LD;
    const T* v_tile = sV + (t & 1) * BN * LD;

    float sacc[BN / 8][4];
    zero(sacc);
    gemm_abt<DH, BN>(sacc, qf, k_tile, lane);

    const int64_t j0 = int64_t(t) * BN;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t col = j0 + nb * 8 + 2 * tc + (e & 1);
        const float s = col < sk ? sacc[nb][e] * c : -INFINITY;  // keys past the group
        sacc[nb][e] = s;
        mx[e >> 1] = fmaxf(mx[e >> 1], s);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      alpha[r] = exp2f(m[r] - mx[r]);  // 0 on the first tile; every tile has a valid key
      m[r] = mx[r];
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int db = 0; db < DH / 8; ++db) {
      oacc[db][0] *= alpha[0];
      oacc[db][1] *= alpha[0];
      oacc[db][2] *= alpha[1];
      oacc[db][3] *= alpha[1];
    }
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(sacc[nb][e] - m[e >> 1]);
        sacc[nb][e] = pe;
        l[e >> 1] += pe;
      }
    }
    gemm_pb<DH, BN>(oacc, sacc, v_tile, lane);
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  // Output staged through the warp's own rows of sQ (only this warp read them) for 16-byte
  // stores along the rows.
  T* staged = sQ + warp * kRowsPerWarp * LD;
  stage_rows<DH>(staged, oacc, 1.f / l[0], 1.f / l[1], lane);
  const int64_t row0 = q0 + warp * kRowsPerWarp;
  if (tc == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t i = row0 + (lane >> 2) + 8 * r;
      if (i < sq) {
        const TokenRef qt = query_token(p, b, g, i);
        (qt.cls ? p.cls_lse : p.lse)[stat_offset(p, qt, h)] = (m[r] + log2f(l[r])) * kLn2;
      }
    }
  }
  __syncwarp();
  store_rows<DH>(staged, lane, [&](int r) -> T* {
    const int64_t i = row0 + r;
    if (i >= sq) return nullptr;
    const TokenRef qt = query_token(p, b, g, i);
    return static_cast<T*>(qt.cls ? p.cls_out : p.out) + row_offset(p, qt, h, DH);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: dK, dV
// ---------------------------------------------------------------------------------------------

template <int DH>
struct DkdvCfg {
  // Queries per streamed tile: 32 at Dh = 128 keeps the four 16×Dh fp32 accumulators (dK, dV)
  // plus Sᵀ and dPᵀ within the register file without spills.
  static constexpr int kBlockM = DH == 128 ? 32 : 64;
  static constexpr size_t kSmem = size_t(2 * kBlockRows + 4 * kBlockM) * pitch<DH>() * 2  // K, V + 2×(Q, dO)
                                  + size_t(4) * kBlockM * sizeof(float);                  // 2×(lse, D)
};

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) spatial_bwd_dkdv_kernel(const AttnParams p) {
  constexpr int BM = DkdvCfg<DH>::kBlockM;
  constexpr int LD = pitch<DH>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [64][LD]; later the staged dK
  T* sV = sK + kBlockRows * LD;            // [64][LD]; later the staged dV
  T* sQ = sV + kBlockRows * LD;            // [2][BM][LD]
  T* sdO = sQ + 2 * BM * LD;               // [2][BM][LD]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * LD);  // [2][BM], log2 units
  float* sDelta = sLse + 2 * BM;                              // [2][BM]

  const int64_t sq = num_queries(p), sk = num_keys(p);
  const BlockCoords bc = block_coords(p, ceil_div(sk, kBlockRows));
  const int64_t b = bc.b, g = bc.g, h = bc.h;
  const int64_t j0 = int64_t(bc.tile) * kBlockRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* qkv = static_cast<const T*>(p.qkv);
  const T* dout = static_cast<const T*>(p.dout);
  const T* dcls_out = static_cast<const T*>(p.dcls_out);

  load_tile_async<DH, kBlockRows>(
      sK, sk - j0, [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, j0 + r).qkv_row, 1, h, DH); }, qkv);
  load_tile_async<DH, kBlockRows>(
      sV, sk - j0, [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, j0 + r).qkv_row, 2, h, DH); }, qkv);
  cp_async_commit();
  auto load_q = [&](int tile, int stage) {
    const int64_t i0 = int64_t(tile) * BM;
    load_tile_async<DH, BM>(
        sQ + stage * BM * LD, sq - i0,
        [&](int r) { return qkv + qkv_offset(p, b, query_token(p, b, g, i0 + r).qkv_row, 0, h, DH); }, qkv);
    load_tile_async<DH, BM>(
        sdO + stage * BM * LD, sq - i0,
        [&](int r) {
          const TokenRef qt = query_token(p, b, g, i0 + r);
          return (qt.cls ? dcls_out : dout) + row_offset(p, qt, h, DH);
        },
        qkv);
    // Queries past the group get lse = +inf, so P = exp2(s - inf) = 0 and they add nothing.
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      float lse2 = INFINITY, delta = 0.f;
      if (i0 + r < sq) {
        const TokenRef qt = query_token(p, b, g, i0 + r);
        const int64_t at = stat_offset(p, qt, h);
        lse2 = (qt.cls ? p.cls_lse : p.lse)[at] * kLog2e;
        delta = (qt.cls ? p.cls_delta : p.delta)[at];
      }
      sLse[stage * BM + r] = lse2;
      sDelta[stage * BM + r] = delta;
    }
  };
  load_q(0, 0);
  cp_async_commit();

  const float c = p.scale * kLog2e;
  const int tc = lane & 3;
  float dk[DH / 8][4], dv[DH / 8][4];
  zero(dk);
  zero(dv);

  const int n_qt = ceil_div(sq, BM);
  for (int t = 0; t < n_qt; ++t) {
    if (t + 1 < n_qt) load_q(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // K, V and tile t have landed
    __syncthreads();
    const T* q_tile = sQ + (t & 1) * BM * LD;
    const T* do_tile = sdO + (t & 1) * BM * LD;
    const float* lse_t = sLse + (t & 1) * BM;
    const float* delta_t = sDelta + (t & 1) * BM;

    // K and V fragments are re-read from shared memory each tile rather than held: at Dh = 128
    // they would cost 64 registers for a few ldmatrix per tile.
    float st[BM / 8][4], dpt[BM / 8][4];  // Sᵀ, dPᵀ: rows = this warp's keys, cols = queries
    {
      uint32_t kf[DH / 16][4];
      load_a_frags<DH>(kf, sK, warp, lane);
      zero(st);
      gemm_abt<DH, BM>(st, kf, q_tile, lane);
    }
    {
      uint32_t vf[DH / 16][4];
      load_a_frags<DH>(vf, sV, warp, lane);
      zero(dpt);
      gemm_abt<DH, BM>(dpt, vf, do_tile, lane);
    }
#pragma unroll
    for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nb * 8 + 2 * tc + (e & 1);
        const float pe = exp2f(st[nb][e] * c - lse_t[col]);
        st[nb][e] = pe;
        dpt[nb][e] = pe * (dpt[nb][e] - delta_t[col]);  // dSᵀ
      }
    }
    gemm_pb<DH, BM>(dv, st, do_tile, lane);  // dV += Pᵀ dO
    gemm_pb<DH, BM>(dk, dpt, q_tile, lane);  // dK += dSᵀ Q
    __syncthreads();
  }

  // The cls key (key 0 of the first tile) gets fp32 per-group partials instead of a dqkv row.
  const int64_t row0 = j0 + warp * kRowsPerWarp;
  if (p.cls_key && row0 == 0) {
    const TokenRef kt = key_token(p, b, g, 0);
    float* dst = p.cls_dkv + (kt.index * p.num_heads + h) * 2 * DH;
    store_row0_f32<DH>(dst, dk, p.scale, lane);
    store_row0_f32<DH>(dst + DH, dv, 1.f, lane);
  }
  // Staged through the warp's own rows of sK / sV (read only by this warp).
  T* staged_k = sK + warp * kRowsPerWarp * LD;
  T* staged_v = sV + warp * kRowsPerWarp * LD;
  stage_rows<DH>(staged_k, dk, p.scale, p.scale, lane);
  stage_rows<DH>(staged_v, dv, 1.f, 1.f, lane);
  __syncwarp();
  T* dqkv = static_cast<T*>(p.dqkv);
  auto dst_of = [&](int r, int part) -> T* {
    const int64_t j = row0 + r;
    if (j >= sk) return nullptr;
    const TokenRef kt = key_token(p, b, g, j);
    if (kt.cls) return nullptr;
    return dqkv + dqkv_offset(p, b, kt.qkv_row, part, h, DH);
  };
  store_rows<DH>(staged_k, lane, [&](int r) { return dst_of(r, 1); });
  store_rows<DH>(staged_v, lane, [&](int r) { return dst_of(r, 2); });
}

// ---------------------------------------------------------------------------------------------
// Backward: dQ
// ---------------------------------------------------------------------------------------------

template <int DH>
struct DqCfg {
  static constexpr int kBlockN = DH == 128 ? 32 : 64;  // keys per tile; 32 at Dh = 128 for registers
  static constexpr size_t kSmem = size_t(2 * kBlockRows + 4 * kBlockN) * pitch<DH>() * 2;  // Q, dO + 2×(K, V)
};

template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) spatial_bwd_dq_kernel(const AttnParams p) {
  constexpr int BN = DqCfg<DH>::kBlockN;
  constexpr int LD = pitch<DH>();
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [64][LD]; later the staged dQ
  T* sdO = sQ + kBlockRows * LD;           // [64][LD]
  T* sK = sdO + kBlockRows * LD;           // [2][BN][LD]
  T* sV = sK + 2 * BN * LD;                // [2][BN][LD]

  const int64_t sq = num_queries(p), sk = num_keys(p);
  const BlockCoords bc = block_coords(p, ceil_div(sq, kBlockRows));
  const int64_t b = bc.b, g = bc.g, h = bc.h;
  const int64_t q0 = int64_t(bc.tile) * kBlockRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* qkv = static_cast<const T*>(p.qkv);
  const T* dout = static_cast<const T*>(p.dout);
  const T* dcls_out = static_cast<const T*>(p.dcls_out);

  load_tile_async<DH, kBlockRows>(
      sQ, sq - q0, [&](int r) { return qkv + qkv_offset(p, b, query_token(p, b, g, q0 + r).qkv_row, 0, h, DH); },
      qkv);
  load_tile_async<DH, kBlockRows>(
      sdO, sq - q0,
      [&](int r) {
        const TokenRef qt = query_token(p, b, g, q0 + r);
        return (qt.cls ? dcls_out : dout) + row_offset(p, qt, h, DH);
      },
      qkv);
  cp_async_commit();
  auto load_kv = [&](int tile, int stage) {
    const int64_t j0 = int64_t(tile) * BN;
    load_tile_async<DH, BN>(
        sK + stage * BN * LD, sk - j0,
        [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, j0 + r).qkv_row, 1, h, DH); }, qkv);
    load_tile_async<DH, BN>(
        sV + stage * BN * LD, sk - j0,
        [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, j0 + r).qkv_row, 2, h, DH); }, qkv);
  };
  load_kv(0, 0);
  cp_async_commit();

  // Row statistics of this lane's two rows (lane/4 and lane/4 + 8 of the warp).
  const int64_t row0 = q0 + warp * kRowsPerWarp;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = row0 + (lane >> 2) + 8 * r;
    lse2[r] = INFINITY;  // rows past the group: P = 0
    delta[r] = 0.f;
    if (i < sq) {
      const TokenRef qt = query_token(p, b, g, i);
      const int64_t at = stat_offset(p, qt, h);
      lse2[r] = (qt.cls ? p.cls_lse : p.lse)[at] * kLog2e;
      delta[r] = (qt.cls ? p.cls_delta : p.delta)[at];
    }
  }

  cp_async_wait<1>();  // Q, dO have landed
  __syncthreads();
  uint32_t qf[DH / 16][4], dof[DH / 16][4];
  load_a_frags<DH>(qf, sQ, warp, lane);
  load_a_frags<DH>(dof, sdO, warp, lane);

  const float c = p.scale * kLog2e;
  const int tc = lane & 3;
  float dq[DH / 8][4];
  zero(dq);

  const int n_kt = ceil_div(sk, BN);
  for (int t = 0; t < n_kt; ++t) {
    if (t + 1 < n_kt) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* k_tile = sK + (t & 1) * BN * LD;
    const T* v_tile = sV + (t & 1) * BN * LD;

    float s[BN / 8][4], dp[BN / 8][4];
    zero(s);
    gemm_abt<DH, BN>(s, qf, k_tile, lane);
    zero(dp);
    gemm_abt<DH, BN>(dp, dof, v_tile, lane);
    const int64_t j0 = int64_t(t) * BN;
#pragma unroll
    for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t col = j0 + nb * 8 + 2 * tc + (e & 1);
        const float pe = col < sk ? exp2f(s[nb][e] * c - lse2[e >> 1]) : 0.f;
        s[nb][e] = pe * (dp[nb][e] - delta[e >> 1]);  // dS
      }
    }
    gemm_pb<DH, BN>(dq, s, k_tile, lane);  // dQ += dS K
    __syncthreads();
  }

  if (p.cls_query && row0 == 0) {
    const TokenRef qt = query_token(p, b, g, 0);
    store_row0_f32<DH>(p.cls_dq + (qt.index * p.num_heads + h) * DH, dq, p.scale, lane);
  }
  T* staged = sQ + warp * kRowsPerWarp * LD;
  stage_rows<DH>(staged, dq, p.scale, p.scale, lane);
  __syncwarp();
  T* dqkv = static_cast<T*>(p.dqkv);
  store_rows<DH>(staged, lane, [&](int r) -> T* {
    const int64_t i = row0 + r;
    if (i >= sq) return nullptr;
    const TokenRef qt = query_token(p, b, g, i);
    if (qt.cls) return nullptr;
    return dqkv + dqkv_offset(p, b, qt.qkv_row, 0, h, DH);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward pre-pass: D = rowsum(dO ∘ O) per (token, head), every dtype
// ---------------------------------------------------------------------------------------------

// dout and out are contiguous (rows, H·DH); item = row·H + head, one item per kLanes lanes.
template <typename T, int DH>
__global__ void __launch_bounds__(256) bwd_rowdot_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                                                         float* __restrict__ delta, const int64_t items) {
  constexpr int V = Vec16<T>::kN;
  constexpr int LANES = DH / V;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = tid / LANES;
  const int lane = static_cast<int>(tid % LANES);
  float a[V], o[V];
  float d = 0.f;
  if (item < items) {
    load16(dout + item * DH + lane * V, a);
    load16(out + item * DH + lane * V, o);
#pragma unroll
    for (int v = 0; v < V; ++v) d = fmaf(a[v], o[v], d);
  }
  d = group_sum<LANES>(d);  // every lane of the warp takes part
  if (item < items && lane == 0) delta[item] = d;
}

template <typename T, int DH>
cudaError_t rowdot(const void* dout, const void* out, float* delta, int64_t items, cudaStream_t stream) {
  constexpr int LANES = DH / Vec16<T>::kN;
  const int64_t blocks = (items * LANES + 255) / 256;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (blocks == 0) return cudaSuccess;
  bwd_rowdot_kernel<T, DH><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      static_cast<const T*>(dout), static_cast<const T*>(out), delta, items);
  return cudaGetLastError();
}

template <typename Kernel>
cudaError_t launch_mma(Kernel kernel, size_t smem, int n_tiles, const AttnParams& p, const DeviceLimits& lim,
                       cudaStream_t stream) {
  const int64_t blocks = int64_t(n_tiles) * p.num_heads * p.batch * p.num_groups;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  cudaError_t err = allow_smem(kernel, smem, lim);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_spatial_fwd(const AttnParams& p, DType dtype, const DeviceLimits& lim, cudaStream_t stream) {
  if (dtype == DType::kFloat) return cudaErrorInvalidValue;  // fp32 runs on CUDA cores (temporal.cu)
  return dispatch_dtype_dim(dtype, p.head_dim, [&](auto tag, auto dh) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int DH = decltype(dh)::value;
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      const int64_t sq = p.seq_len + (p.cls_query ? 1 : 0);
      return launch_mma(spatial_fwd_kernel<T, DH>, FwdCfg<DH>::kSmem, ceil_div(sq, kBlockRows), p, lim, stream);
    }
  });
}

cudaError_t launch_spatial_bwd(const AttnParams& p, DType dtype, const DeviceLimits& lim, cudaStream_t stream) {
  if (dtype == DType::kFloat) return cudaErrorInvalidValue;  // see spatial_fp32.cu
  return dispatch_dtype_dim(dtype, p.head_dim, [&](auto tag, auto dh) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int DH = decltype(dh)::value;
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      const int64_t sq = p.seq_len + (p.cls_query ? 1 : 0);
      const int64_t sk = p.seq_len + (p.cls_key ? 1 : 0);
      cudaError_t err =
          launch_mma(spatial_bwd_dkdv_kernel<T, DH>, DkdvCfg<DH>::kSmem, ceil_div(sk, kBlockRows), p, lim, stream);
      if (err != cudaSuccess) return err;
      return launch_mma(spatial_bwd_dq_kernel<T, DH>, DqCfg<DH>::kSmem, ceil_div(sq, kBlockRows), p, lim, stream);
    }
  });
}

cudaError_t launch_bwd_rowdot(const AttnParams& p, DType dtype, cudaStream_t stream) {
  return dispatch_dtype_dim(dtype, p.head_dim, [&](auto tag, auto dh) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int DH = decltype(dh)::value;
    cudaError_t err = rowdot<T, DH>(p.dout, p.out, p.delta, p.batch * p.num_groups * p.seq_len * p.num_heads, stream);
    if (err != cudaSuccess || !p.cls_query) return err;
    return rowdot<T, DH>(p.dcls_out, p.cls_out, p.cls_delta, p.batch * p.num_groups * p.num_heads, stream);
  });
}

}  // namespace tk
