// Temporal attention on CUDA cores: many short groups (S <= kShortMaxSeq keys, no cls query,
// optional cls key), memory-bound. See attention.h for the layout and rowwise.cuh for how a
// (token, head) row is spread over lanes.
//
//   temporal_fwd_kernel  one block = one group, a chunk of heads, a block of queries; keys are
//                        streamed through shared memory in tiles of rowwise::kTile, so the same
//                        kernel also serves groups of any length (it is the fp32 forward of
//                        spatial attention).
//   temporal_bwd_kernel  one block = one whole group and a chunk of heads in shared memory;
//                        dq, dk and dv in one pass over qkv (short groups only).
#include <algorithm>
#include <climits>

#include "rowwise.cuh"

namespace tk {
namespace {

using rowwise::kThreads;
using rowwise::kTile;

// Forward. Block work item = (b, g, head chunk, query block), query block fastest. Unit u of
// the block is (query u / hc_size, head u % hc_size), so neighbouring units are neighbouring
// heads of one token: their q and out vectors are contiguous in memory.
template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) temporal_fwd_kernel(const AttnParams p, const int hc_size, const int n_hc,
                                                                const int qb_size, const int n_qb, const int kb) {
  using Sh = rowwise::Shape<T, DH>;
  constexpr int V = Sh::kVec;
  constexpr int LANES = Sh::kLanes;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int row_elems = hc_size * DH;  // one key row of the head chunk
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kb * row_elems;

  int64_t w = blockIdx.x;
  const int qb = static_cast<int>(w % n_qb);
  w /= n_qb;
  const int hc = static_cast<int>(w % n_hc);
  w /= n_hc;
  const int64_t g = w % p.num_groups;
  const int64_t b = w / p.num_groups;

  const int unit = threadIdx.x / LANES;
  const int lane = threadIdx.x % LANES;
  const int hl = unit % hc_size;
  const int ql = unit / hc_size;
  const int64_t h0 = int64_t(hc) * hc_size;
  const int64_t h = h0 + hl;
  const int64_t i = int64_t(qb) * qb_size + ql;
  const int64_t sq = num_queries(p);
  const int64_t sk = num_keys(p);
  // Inactive lanes still run every shuffle below (full-warp masks) on zeros; they only skip
  // global loads and stores.
  const bool active = ql < qb_size && i < sq && h < p.num_heads;
  const T* qkv = static_cast<const T*>(p.qkv);

  // q is not touched until the first key tile has landed, so its load overlaps the tile's.
  float q[V];
  TokenRef qt{0, 0, false};
  if (active) {
    qt = query_token(p, b, g, i);
    load16(qkv + qkv_offset(p, b, qt.qkv_row, 0, h, DH) + lane * V, q);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v) q[v] = 0.f;
  }
  const float c = p.scale * kLog2e;  // scores in log2 units: exp2 is one instruction

  float o[V];
#pragma unroll
  for (int v = 0; v < V; ++v) o[v] = 0.f;
  float m = -INFINITY, l = 0.f;

  const int chunks = hc_size * Sh::kLanes;  // 16-byte chunks of one key row (k or v)
  auto head_valid = [&](int ch) { return h0 + ch / LANES < p.num_heads; };
  for (int64_t k0 = 0; k0 < sk; k0 += kb) {
    const int nk = static_cast<int>(min(int64_t(kb), sk - k0));
    __syncthreads();  // the previous tile has been consumed
    rowwise::load_rows_async(
        sK, nk, chunks,
        [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, k0 + r).qkv_row, 1, h0, DH); }, head_valid,
        qkv);
    rowwise::load_rows_async(
        sV, nk, chunks,
        [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, k0 + r).qkv_row, 2, h0, DH); }, head_valid,
        qkv);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // Scores of the whole tile first, so that the running output is rescaled once per tile.
    float s[kTile];
    float tile_max = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) {
      s[jj] = -INFINITY;
      if (jj < nk) {
        float kf[V];
        load16_smem(sK + jj * row_elems + hl * DH + lane * V, kf);
        s[jj] = group_sum<LANES>(rowwise::dot<V>(q, kf)) * c;
        tile_max = fmaxf(tile_max, s[jj]);
      }
    }
    const float m_new = fmaxf(m, tile_max);
    const float alpha = exp2f(m - m_new);  // 0 on the first tile (m = -inf)
    l *= alpha;
#pragma unroll
    for (int v = 0; v < V; ++v) o[v] *= alpha;
#pragma unroll
    for (int jj = 0; jj < kTile; ++jj) {
      if (jj < nk) {
        const float pj = exp2f(s[jj] - m_new);
        float vf[V];
        load16_smem(sV + jj * row_elems + hl * DH + lane * V, vf);
        l += pj;
        rowwise::axpy<V>(pj, vf, o);
      }
    }
    m = m_new;
  }

  if (active) {
    const float inv = 1.f / l;
#pragma unroll
    for (int v = 0; v < V; ++v) o[v] *= inv;
    T* dst = static_cast<T*>(qt.cls ? p.cls_out : p.out);
    store16(dst + row_offset(p, qt, h, DH) + lane * V, o);
    if (lane == 0) (qt.cls ? p.cls_lse : p.lse)[stat_offset(p, qt, h)] = (m + log2f(l)) * kLn2;
  }
}

// Fused backward of short groups. Block = (b, g, head chunk); q, dO, k, v of the whole group sit
// in shared memory, and so do P and dS (Sq×Sk per head) so that the key pass needs no dot
// products:
//   pass 1, unit = (query i, head): D_i = dO_i·o_i, P_ij = exp(s_ij - lse_i),
//           dS_ij = P_ij (dO_i·v_j - D_i), dq_i = scale Σ_j dS_ij k_j
//   pass 2, unit = (key j, head):   dv_j = Σ_i P_ij dO_i,  dk_j = scale Σ_i dS_ij q_i
// Every global read of the block (q, dO, o, k, v, lse) is issued before the first wait.
// The cls token's gradients are written per group (fp32) and summed over groups afterwards.
template <typename T, int DH>
__global__ void __launch_bounds__(kThreads) temporal_bwd_kernel(const AttnParams p, const int hc_size, const int n_hc) {
  using Sh = rowwise::Shape<T, DH>;
  constexpr int V = Sh::kVec;
  constexpr int LANES = Sh::kLanes;
  constexpr int UNITS = Sh::kUnits;
  const int sq = static_cast<int>(num_queries(p));
  const int sk = static_cast<int>(num_keys(p));
  const int row_elems = hc_size * DH;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [sq][hc_size·DH]
  T* sdO = sQ + sq * row_elems;            // [sq][hc_size·DH]
  T* sO = sdO + sq * row_elems;            // [sq][hc_size·DH]
  T* sK = sO + sq * row_elems;             // [sk][hc_size·DH]
  T* sV = sK + sk * row_elems;             // [sk][hc_size·DH]
  float* sP = reinterpret_cast<float*>(sV + sk * row_elems);  // [hc_size][sq][sk]
  float* sdS = sP + hc_size * sq * sk;                        // [hc_size][sq][sk]
  float* sLse = sdS + hc_size * sq * sk;                      // [hc_size][sq], log2 units

  int64_t w = blockIdx.x;
  const int hc = static_cast<int>(w % n_hc);
  w /= n_hc;
  const int64_t g = w % p.num_groups;
  const int64_t b = w / p.num_groups;
  const int64_t h0 = int64_t(hc) * hc_size;
  const T* qkv = static_cast<const T*>(p.qkv);
  const T* dout = static_cast<const T*>(p.dout);
  const T* dcls_out = static_cast<const T*>(p.dcls_out);
  const T* out = static_cast<const T*>(p.out);
  const T* cls_out = static_cast<const T*>(p.cls_out);
  T* dqkv = static_cast<T*>(p.dqkv);

  const int chunks = hc_size * LANES;
  auto head_valid = [&](int ch) { return h0 + ch / LANES < p.num_heads; };
  rowwise::load_rows_async(
      sQ, sq, chunks, [&](int r) { return qkv + qkv_offset(p, b, query_token(p, b, g, r).qkv_row, 0, h0, DH); },
      head_valid, qkv);
  rowwise::load_rows_async(
      sdO, sq, chunks,
      [&](int r) {
        const TokenRef t = query_token(p, b, g, r);
        return (t.cls ? dcls_out : dout) + row_offset(p, t, h0, DH);
      },
      head_valid, qkv);
  rowwise::load_rows_async(
      sO, sq, chunks,
      [&](int r) {
        const TokenRef t = query_token(p, b, g, r);
        return (t.cls ? cls_out : out) + row_offset(p, t, h0, DH);
      },
      head_valid, qkv);
  rowwise::load_rows_async(
      sK, sk, chunks, [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, r).qkv_row, 1, h0, DH); },
      head_valid, qkv);
  rowwise::load_rows_async(
      sV, sk, chunks, [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, r).qkv_row, 2, h0, DH); },
      head_valid, qkv);
  cp_async_commit();
  // lse of absent heads: +inf, so that their P is 0 (never stored either).
  for (int x = threadIdx.x; x < hc_size * sq; x += kThreads) {
    const int hl = x / sq, i = x - hl * sq;
    float lse2 = INFINITY;
    if (h0 + hl < p.num_heads) {
      const TokenRef qt = query_token(p, b, g, i);
      lse2 = (qt.cls ? p.cls_lse : p.lse)[stat_offset(p, qt, h0 + hl)] * kLog2e;
    }
    sLse[x] = lse2;
  }

  const int unit = threadIdx.x / LANES;
  const int lane = threadIdx.x % LANES;
  const float c = p.scale * kLog2e;

  cp_async_wait<0>();
  __syncthreads();

  // Pass 1: queries. The loop bound is uniform so that whole warps run the shuffles together.
  for (int u0 = 0; u0 < sq * hc_size; u0 += UNITS) {
    const int u = u0 + unit;
    const int i = min(u / hc_size, sq - 1);  // clamped: shared-memory reads stay in range
    const int hl = u % hc_size;
    const int64_t h = h0 + hl;
    const bool active = u < sq * hc_size && h < p.num_heads;

    float qf[V], dof[V], of[V];
    load16_smem(sQ + i * row_elems + hl * DH + lane * V, qf);
    load16_smem(sdO + i * row_elems + hl * DH + lane * V, dof);
    load16_smem(sO + i * row_elems + hl * DH + lane * V, of);
    const float lse2 = active ? sLse[hl * sq + i] : INFINITY;  // inactive units: P = 0
    const float delta = group_sum<LANES>(rowwise::dot<V>(dof, of));

    float dq[V];
#pragma unroll
    for (int v = 0; v < V; ++v) dq[v] = 0.f;
    float* p_row = sP + (hl * sq + i) * sk;
    float* ds_row = sdS + (hl * sq + i) * sk;
    for (int j = 0; j < sk; ++j) {
      float kf[V], vf[V];
      load16_smem(sK + j * row_elems + hl * DH + lane * V, kf);
      load16_smem(sV + j * row_elems + hl * DH + lane * V, vf);
      const float s = group_sum<LANES>(rowwise::dot<V>(qf, kf));
      const float dp = group_sum<LANES>(rowwise::dot<V>(dof, vf));
      const float pj = exp2f(s * c - lse2);
      const float ds = pj * (dp - delta);
      if (active && lane == 0) {
        p_row[j] = pj;
        ds_row[j] = ds;
      }
      rowwise::axpy<V>(ds, kf, dq);
    }
    if (active) {
      const TokenRef qt = query_token(p, b, g, i);
#pragma unroll
      for (int v = 0; v < V; ++v) dq[v] *= p.scale;
      if (qt.cls)
        store_f32<V>(p.cls_dq + (qt.index * p.num_heads + h) * DH + lane * V, dq);
      else
        store16(dqkv + dqkv_offset(p, b, qt.qkv_row, 0, h, DH) + lane * V, dq);
    }
  }
  __syncthreads();

  // Pass 2: keys (no shuffles, so inactive units may simply skip).
  for (int u = unit; u < sk * hc_size; u += UNITS) {
    const int j = u / hc_size;
    const int hl = u % hc_size;
    const int64_t h = h0 + hl;
    if (h >= p.num_heads) continue;
    float dk[V], dv[V];
#pragma unroll
    for (int v = 0; v < V; ++v) dk[v] = dv[v] = 0.f;
    for (int i = 0; i < sq; ++i) {
      float qf[V], dof[V];
      load16_smem(sQ + i * row_elems + hl * DH + lane * V, qf);
      load16_smem(sdO + i * row_elems + hl * DH + lane * V, dof);
      const int at = (hl * sq + i) * sk + j;
      rowwise::axpy<V>(sP[at], dof, dv);
      rowwise::axpy<V>(sdS[at], qf, dk);
    }
#pragma unroll
    for (int v = 0; v < V; ++v) dk[v] *= p.scale;
    const TokenRef kt = key_token(p, b, g, j);
    if (kt.cls) {
      float* dst = p.cls_dkv + (kt.index * p.num_heads + h) * 2 * DH + lane * V;
      store_f32<V>(dst, dk);
      store_f32<V>(dst + DH, dv);
    } else {
      store16(dqkv + dqkv_offset(p, b, kt.qkv_row, 1, h, DH) + lane * V, dk);
      store16(dqkv + dqkv_offset(p, b, kt.qkv_row, 2, h, DH) + lane * V, dv);
    }
  }
}

}  // namespace

cudaError_t launch_temporal_fwd(const AttnParams& p, DType dtype, const DeviceLimits& lim, cudaStream_t stream) {
  return dispatch_dtype_dim(dtype, p.head_dim, [&](auto tag, auto dh) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int DH = decltype(dh)::value;
    using Sh = rowwise::Shape<T, DH>;
    const int64_t sq = p.seq_len + (p.cls_query ? 1 : 0);
    const int64_t sk = p.seq_len + (p.cls_key ? 1 : 0);
    // Short groups: as many heads per block as fill its units, so that a block reads long
    // contiguous runs of each token row. Long groups (fp32 spatial): one head, a block of queries.
    const int hc = sq <= Sh::kUnits ? static_cast<int>(std::min<int64_t>(p.num_heads, Sh::kUnits / sq)) : 1;
    const int qb = Sh::kUnits / hc;
    const int n_hc = ceil_div(p.num_heads, hc);
    const int n_qb = ceil_div(sq, qb);
    const int kb = static_cast<int>(std::min<int64_t>(kTile, sk));
    const size_t smem = size_t(2) * kb * hc * DH * sizeof(T);
    const int64_t blocks = int64_t(n_qb) * n_hc * p.batch * p.num_groups;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    auto kernel = temporal_fwd_kernel<T, DH>;
    cudaError_t err = allow_smem(kernel, smem, lim);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, hc, n_hc, qb, n_qb, kb);
    return cudaGetLastError();
  });
}

cudaError_t launch_temporal_bwd(const AttnParams& p, DType dtype, const DeviceLimits& lim, cudaStream_t stream) {
  return dispatch_dtype_dim(dtype, p.head_dim, [&](auto tag, auto dh) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int DH = decltype(dh)::value;
    using Sh = rowwise::Shape<T, DH>;
    const int64_t sq = p.seq_len + (p.cls_query ? 1 : 0);
    const int64_t sk = p.seq_len + (p.cls_key ? 1 : 0);
    auto smem_of = [&](int64_t hc) {
      return size_t(hc) * DH * sizeof(T) * size_t(3 * sq + 2 * sk) + size_t(hc) * sq * (2 * sk + 1) * sizeof(float);
    };
    // Enough heads to give every unit a query, within a budget that leaves room for two blocks
    // per SM; one head always fits for S <= kShortMaxSeq (92 KB at fp32, Dh = 128).
    int64_t hc = std::max<int64_t>(1, std::min<int64_t>(p.num_heads, Sh::kUnits / std::max<int64_t>(sq, 1)));
    const size_t budget = std::min<size_t>(lim.smem_per_block_optin, 96 * 1024);
    while (hc > 1 && smem_of(hc) > budget) --hc;
    const size_t smem = smem_of(hc);
    const int n_hc = ceil_div(p.num_heads, hc);
    const int64_t blocks = int64_t(n_hc) * p.batch * p.num_groups;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    auto kernel = temporal_bwd_kernel<T, DH>;
    cudaError_t err = allow_smem(kernel, smem, lim);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, static_cast<int>(hc), n_hc);
    return cudaGetLastError();
  });
}

}  // namespace tk
