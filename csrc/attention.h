// Host-side interface between the op entry (bindings.cpp) and the kernels (*.cu).
//
// Plain C++ only (no ATen) so that the .cu files compile quickly: bindings.cpp checks every
// input, allocates the outputs and fills AttnParams; a launcher only picks a kernel and
// launches it on the given stream.
//
// Token layout (the contract is timesformer_kernels/layout.py):
//
//   qkv (B, L, 3·H·Dh)        row  0      1 ............................... L-1
//                                [cls] [N·T patch tokens, space- or time-major]
//   last dim, unit stride:    |<-- q: H·Dh -->|<-- k: H·Dh -->|<-- v: H·Dh -->|
//
//   row(g, p) = base + g·group_stride + p·pos_stride     (group g of a clip, position p < S)
//
// Group g of clip b attends over
//   queries  i = 0 .. Sq-1,  Sq = S + cls_query   (i = 0 is the cls token when cls_query)
//   keys     j = 0 .. Sk-1,  Sk = S + cls_key     (j = 0 is the cls token when cls_key)
// Patch outputs go to out (B, N·T, H·Dh) at row row(g, p) - base (the input's token order);
// the cls query's output of group g goes to cls_out (B, G, H·Dh). lse has the shape of out
// with H in place of H·Dh and holds the natural-log sum of exp(scale·q·k) over the keys.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace tk {

enum class DType { kHalf, kBFloat16, kFloat };

struct AttnParams {
  // qkv, read in place through its strides (in elements; the last dim has unit stride).
  const void* qkv = nullptr;
  int64_t qkv_stride_b = 0;
  int64_t qkv_stride_l = 0;

  // Geometry (layout.Groups).
  int64_t batch = 0;
  int64_t num_groups = 0;    // G
  int64_t seq_len = 0;       // S
  int64_t group_stride = 0;  // rows
  int64_t pos_stride = 0;    // rows
  int64_t length = 0;        // L = base + G·S
  int base = 0;
  bool cls_key = false;
  bool cls_query = false;
  int num_heads = 0;
  int head_dim = 0;
  float scale = 1.f;

  // Forward outputs; read again by the backward. Contiguous.
  void* out = nullptr;       // (B, G·S, H·Dh), qkv's dtype
  void* cls_out = nullptr;   // (B, G, H·Dh) or null
  float* lse = nullptr;      // (B, G·S, H)
  float* cls_lse = nullptr;  // (B, G, H) or null

  // Backward. Contiguous.
  const void* dout = nullptr;      // like out
  const void* dcls_out = nullptr;  // like cls_out
  float* delta = nullptr;          // (B, G·S, H): rowsum(dout·out) per head
  float* cls_delta = nullptr;      // (B, G, H)
  void* dqkv = nullptr;            // (B, L, 3·H·Dh), qkv's dtype; patch rows only
  float* cls_dq = nullptr;         // (B, G, H, Dh): per-group dq of the cls query, summed later
  float* cls_dkv = nullptr;        // (B, G, H, 2, Dh): per-group dk, dv of the cls key
};

struct DeviceLimits {
  int num_sms = 1;
  size_t smem_per_block_optin = 48 * 1024;
};

// Groups this short (and without a cls query) go to the CUDA-core kernels of temporal.cu, which
// hold a whole group in shared memory and pack several heads per block; longer groups go to
// the tensor-core kernels of spatial.cu (fp16/bf16) or the CUDA-core ones of spatial_fp32.cu.
// Untuned: from the arithmetic intensity, beyond ~32 keys CUDA-core softmax stops being hidden
// behind the memory traffic of the group.
constexpr int64_t kShortMaxSeq = 32;

inline bool use_short_kernels(const AttnParams& p) {
  return !p.cls_query && p.seq_len <= kShortMaxSeq;
}

// temporal.cu
cudaError_t launch_temporal_fwd(const AttnParams& p, DType dtype, const DeviceLimits& lim,
                                cudaStream_t stream);
cudaError_t launch_temporal_bwd(const AttnParams& p, DType dtype, const DeviceLimits& lim,
                                cudaStream_t stream);

// spatial.cu (fp16/bf16 on tensor cores; the rowdot pre-pass for every dtype)
cudaError_t launch_spatial_fwd(const AttnParams& p, DType dtype, const DeviceLimits& lim,
                               cudaStream_t stream);
cudaError_t launch_bwd_rowdot(const AttnParams& p, DType dtype, cudaStream_t stream);
cudaError_t launch_spatial_bwd(const AttnParams& p, DType dtype, const DeviceLimits& lim,
                               cudaStream_t stream);

// spatial_fp32.cu (fp32 on CUDA cores; the forward is temporal.cu's, which streams key tiles)
cudaError_t launch_spatial_bwd_fp32(const AttnParams& p, const DeviceLimits& lim,
                                    cudaStream_t stream);

}  // namespace tk
