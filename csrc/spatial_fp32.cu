// Backward of long groups (spatial attention, and temporal attention beyond kShortMaxSeq) in
// fp32, on CUDA cores: tensor cores would round fp32 inputs to tf32 (or need a 3-pass split),
// and fp32 is the precise fallback rather than the fast path. The forward of these groups is
// temporal.cu's kernel, which already streams key tiles. Layout: attention.h; lane mapping:
// rowwise.cuh (one head per block here).
//
//   spatial_bwd_dq_fp32_kernel    unit = query row; key tiles streamed through shared memory:
//                                 dq_i = scale Σ_j P_ij (dO_i·v_j - D_i) k_j
//   spatial_bwd_dkdv_fp32_kernel  unit = key row; query tiles (q, dO, lse, D) streamed:
//                                 dv_j = Σ_i P_ij dO_i,  dk_j = scale Σ_i dS_ij q_i
// D_i = dO_i·o_i comes from the rowdot pre-pass (spatial.cu). No atomics: the cls token's
// gradients are per-group fp32 partials summed afterwards.
#include <climits>

#include "rowwise.cuh"

namespace tk {
namespace {

using rowwise::kThreads;
using rowwise::kTile;

// Block index -> (unit block, h, g, b), unit block fastest.
struct Coords {
  int blk;
  int64_t h, g, b;
};

__device__ __forceinline__ Coords coords(const AttnParams& p, int n_blk) {
  int64_t w = blockIdx.x;
  Coords c;
  c.blk = static_cast<int>(w % n_blk);
  w /= n_blk;
  c.h = w % p.num_heads;
  w /= p.num_heads;
  c.g = w % p.num_groups;
  c.b = w / p.num_groups;
  return c;
}

template <int DH>
__global__ void __launch_bounds__(kThreads) spatial_bwd_dq_fp32_kernel(const AttnParams p, const int n_blk) {
  using Sh = rowwise::Shape<float, DH>;
  constexpr int V = Sh::kVec, LANES = Sh::kLanes, UNITS = Sh::kUnits;
  __shared__ __align__(16) float sK[kTile * DH];
  __shared__ __align__(16) float sV[kTile * DH];

  const Coords bc = coords(p, n_blk);
  const int64_t b = bc.b, g = bc.g, h = bc.h;
  const int unit = threadIdx.x / LANES, lane = threadIdx.x % LANES;
  const int64_t sq = num_queries(p), sk = num_keys(p);
  const int64_t i = int64_t(bc.blk) * UNITS + unit;
  const bool active = i < sq;
  const float* qkv = static_cast<const float*>(p.qkv);
  const float* dout = static_cast<const float*>(p.dout);
  const float* dcls_out = static_cast<const float*>(p.dcls_out);

  // Inactive units keep zeros and lse2 = +inf (P = 0) and still run every shuffle.
  float q[V], dO[V], dq[V];
  float lse2 = INFINITY, delta = 0.f;
  TokenRef qt{0, 0, false};
#pragma unroll
  for (int v = 0; v < V; ++v) q[v] = dO[v] = dq[v] = 0.f;
  if (active) {
    qt = query_token(p, b, g, i);
    load16(qkv + qkv_offset(p, b, qt.qkv_row, 0, h, DH) + lane * V, q);
    load16((qt.cls ? dcls_out : dout) + row_offset(p, qt, h, DH) + lane * V, dO);
    const int64_t at = stat_offset(p, qt, h);
    lse2 = (qt.cls ? p.cls_lse : p.lse)[at] * kLog2e;
    delta = (qt.cls ? p.cls_delta : p.delta)[at];
  }
  const float c = p.scale * kLog2e;

  for (int64_t k0 = 0; k0 < sk; k0 += kTile) {
    const int nk = static_cast<int>(min(int64_t(kTile), sk - k0));
    __syncthreads();  // the previous tile has been consumed
    auto all = [](int) { return true; };
    rowwise::load_rows_async(
        sK, nk, LANES, [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, k0 + r).qkv_row, 1, h, DH); },
        all, qkv);
    rowwise::load_rows_async(
        sV, nk, LANES, [&](int r) { return qkv + qkv_offset(p, b, key_token(p, b, g, k0 + r).qkv_row, 2, h, DH); },
        all, qkv);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    for (int jj = 0; jj < nk; ++jj) {
      float kf[V], vf[V];
      load16_smem(sK + jj * DH + lane * V, kf);
      load16_smem(sV + jj * DH + lane * V, vf);
      const float s = group_sum<LANES>(rowwise::dot<V>(q, kf));
      const float dp = group_sum<LANES>(rowwise::dot<V>(dO, vf));
      const float ds = exp2f(s * c - lse2) * (dp - delta);
      rowwise::axpy<V>(ds, kf, dq);
    }
  }

  if (active) {
#pragma unroll
    for (int v = 0; v < V; ++v) dq[v] *= p.scale;
    if (qt.cls)
      store_f32<V>(p.cls_dq + (qt.index * p.num_heads + h) * DH + lane * V, dq);
    else
      store16(static_cast<float*>(p.dqkv) + dqkv_offset(p, b, qt.qkv_row, 0, h, DH) + lane * V, dq);
  }
}

template <int DH>
__global__ void __launch_bounds__(kThreads) spatial_bwd_dkdv_fp32_kernel(const AttnParams p, const int n_blk) {
  using Sh = rowwise::Shape<float, DH>;
  constexpr int V = Sh::kVec, LANES = Sh::kLanes, UNITS = Sh::kUnits;
  __shared__ __align__(16) float sQ[kTile * DH];
  __shared__ __align__(16) float sdO[kTile * DH];
  __shared__ float sLse[kTile];  // log2 units
  __shared__ float sDelta[kTile];

  const Coords bc = coords(p, n_blk);
  const int64_t b = bc.b, g = bc.g, h = bc.h;
  const int unit = threadIdx.x / LANES, lane = threadIdx.x % LANES;
  const int64_t sq = num_queries(p), sk = num_keys(p);
  const int64_t j = int64_t(bc.blk) * UNITS + unit;
  const bool active = j < sk;
  const float* qkv = static_cast<const float*>(p.qkv);
  const float* dout = static_cast<const float*>(p.dout);
  const float* dcls_out = static_cast<const float*>(p.dcls_out);

  float k[V], v_[V], dk[V], dv[V];
  TokenRef kt{0, 0, false};
#pragma unroll
  for (int v = 0; v < V; ++v) k[v] = v_[v] = dk[v] = dv[v] = 0.f;
  if (active) {
    kt = key_token(p, b, g, j);
    load16(qkv + qkv_offset(p, b, kt.qkv_row, 1, h, DH) + lane * V, k);
    load16(qkv + qkv_offset(p, b, kt.qkv_row, 2, h, DH) + lane * V, v_);
  }
  const float c = p.scale * kLog2e;

  for (int64_t i0 = 0; i0 < sq; i0 += kTile) {
    const int ni = static_cast<int>(min(int64_t(kTile), sq - i0));
    __syncthreads();
    auto all = [](int) { return true; };
    rowwise::load_rows_async(
        sQ, ni, LANES,
        [&](int r) { return qkv + qkv_offset(p, b, query_token(p, b, g, i0 + r).qkv_row, 0, h, DH); }, all, qkv);
    rowwise::load_rows_async(
        sdO, ni, LANES,
        [&](int r) {
          const TokenRef qt = query_token(p, b, g, i0 + r);
          return (qt.cls ? dcls_out : dout) + row_offset(p, qt, h, DH);
        },
        all, qkv);
    cp_async_commit();
    if (threadIdx.x < ni) {
      const TokenRef qt = query_token(p, b, g, i0 + threadIdx.x);
      const int64_t at = stat_offset(p, qt, h);
      sLse[threadIdx.x] = (qt.cls ? p.cls_lse : p.lse)[at] * kLog2e;
      sDelta[threadIdx.x] = (qt.cls ? p.cls_delta : p.delta)[at];
    }
    cp_async_wait<0>();
    __syncthreads();
    for (int ii = 0; ii < ni; ++ii) {
      float qf[V], dof[V];
      load16_smem(sQ + ii * DH + lane * V, qf);
      load16_smem(sdO + ii * DH + lane * V, dof);
      const float s = group_sum<LANES>(rowwise::dot<V>(qf, k));
      const float dp = group_sum<LANES>(rowwise::dot<V>(dof, v_));
      const float pe = exp2f(s * c - sLse[ii]);
      rowwise::axpy<V>(pe, dof, dv);
      rowwise::axpy<V>(pe * (dp - sDelta[ii]), qf, dk);
    }
  }

  if (active) {
#pragma unroll
    for (int v = 0; v < V; ++v) dk[v] *= p.scale;
    if (kt.cls) {
      float* dst = p.cls_dkv + (kt.index * p.num_heads + h) * 2 * DH + lane * V;
      store_f32<V>(dst, dk);
      store_f32<V>(dst + DH, dv);
    } else {
      float* dqkv = static_cast<float*>(p.dqkv);
      store16(dqkv + dqkv_offset(p, b, kt.qkv_row, 1, h, DH) + lane * V, dk);
      store16(dqkv + dqkv_offset(p, b, kt.qkv_row, 2, h, DH) + lane * V, dv);
    }
  }
}

template <typename Kernel>
cudaError_t launch_rowwise(Kernel kernel, int64_t units_total, int units_per_block, const AttnParams& p,
                           cudaStream_t stream) {
  const int n_blk = ceil_div(units_total, units_per_block);
  const int64_t blocks = int64_t(n_blk) * p.num_heads * p.batch * p.num_groups;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p, n_blk);
  return cudaGetLastError();
}

template <int DH>
cudaError_t bwd_fp32(const AttnParams& p, cudaStream_t stream) {
  constexpr int UNITS = rowwise::Shape<float, DH>::kUnits;
  const int64_t sq = p.seq_len + (p.cls_query ? 1 : 0);
  const int64_t sk = p.seq_len + (p.cls_key ? 1 : 0);
  cudaError_t err = launch_rowwise(spatial_bwd_dkdv_fp32_kernel<DH>, sk, UNITS, p, stream);
  if (err != cudaSuccess) return err;
  return launch_rowwise(spatial_bwd_dq_fp32_kernel<DH>, sq, UNITS, p, stream);
}

}  // namespace

cudaError_t launch_spatial_bwd_fp32(const AttnParams& p, const DeviceLimits&, cudaStream_t stream) {
  if (p.head_dim == 64) return bwd_fp32<64>(p, stream);
  if (p.head_dim == 128) return bwd_fp32<128>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace tk
