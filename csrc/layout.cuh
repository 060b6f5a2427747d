// Device-side index maths and small helpers shared by every kernel.
//
// The token-index formula lives here once (see attention.h for the layout diagram):
//   qkv row of position p of group g:  base + g·group_stride + p·pos_stride
//   query i of a group: the cls token (row 0) when cls_query and i == 0, else p = i - cls_query
//   key   j of a group: the cls token (row 0) when cls_key   and j == 0, else p = j - cls_key
// All offsets are int64: B·L·3·H·Dh exceeds 2^31 for large batches.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention.h"

namespace tk {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Geometry
// ---------------------------------------------------------------------------------------------

// One token of a group, seen from the tensors that hold it.
struct TokenRef {
  int64_t qkv_row;  // row in qkv / dqkv
  int64_t index;    // row of out/lse/dout/delta (b·G·S + row - base), or of cls_out/cls_lse (b·G + g)
  bool cls;
};

__device__ __forceinline__ TokenRef patch_token(const AttnParams& p, int64_t b, int64_t g, int64_t pos) {
  const int64_t row = p.base + g * p.group_stride + pos * p.pos_stride;
  return {row, b * (p.num_groups * p.seq_len) + row - p.base, false};
}

__device__ __forceinline__ TokenRef query_token(const AttnParams& p, int64_t b, int64_t g, int64_t i) {
  if (p.cls_query) {
    if (i == 0) return {0, b * p.num_groups + g, true};
    return patch_token(p, b, g, i - 1);
  }
  return patch_token(p, b, g, i);
}

__device__ __forceinline__ TokenRef key_token(const AttnParams& p, int64_t b, int64_t g, int64_t j) {
  if (p.cls_key) {
    if (j == 0) return {0, b * p.num_groups + g, true};
    return patch_token(p, b, g, j - 1);
  }
  return patch_token(p, b, g, j);
}

__device__ __forceinline__ int64_t num_queries(const AttnParams& p) { return p.seq_len + (p.cls_query ? 1 : 0); }
__device__ __forceinline__ int64_t num_keys(const AttnParams& p) { return p.seq_len + (p.cls_key ? 1 : 0); }

// part 0/1/2 = q/k/v; h = head. Element offset in qkv.
__device__ __forceinline__ int64_t qkv_offset(const AttnParams& p, int64_t b, int64_t row, int part, int64_t h,
                                              int dh) {
  return b * p.qkv_stride_b + row * p.qkv_stride_l + (part * int64_t(p.num_heads) + h) * dh;
}

// Element offset in the contiguous dqkv (B, L, 3·H·Dh).
__device__ __forceinline__ int64_t dqkv_offset(const AttnParams& p, int64_t b, int64_t row, int part, int64_t h,
                                               int dh) {
  const int64_t c3 = 3 * int64_t(p.num_heads) * dh;
  return (b * p.length + row) * c3 + (part * int64_t(p.num_heads) + h) * dh;
}

// Element offset of head h of a token in out/dout (patch) or cls_out/dcls_out (cls): both are
// contiguous with H·Dh channels, and TokenRef::index picks the row.
__device__ __forceinline__ int64_t row_offset(const AttnParams& p, const TokenRef& t, int64_t h, int dh) {
  return t.index * (int64_t(p.num_heads) * dh) + h * dh;
}

// Offset of (token, head) in lse/delta (patch) or cls_lse/cls_delta (cls).
__device__ __forceinline__ int64_t stat_offset(const AttnParams& p, const TokenRef& t, int64_t h) {
  return t.index * p.num_heads + h;
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors of T, converted to and from fp32
// ---------------------------------------------------------------------------------------------

template <typename T>
struct Vec16;  // below: float, and the 16-bit types

template <>
struct Vec16<float> {
  static constexpr int kN = 4;
  static __device__ __forceinline__ void to_float(const uint4& v, float* f) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 from_float(const float* f) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

// The two 16-bit types differ only in their pair type and its conversions.
template <typename T>
struct Pair16;
template <>
struct Pair16<__half> {
  using type = __half2;
  static __device__ __forceinline__ float2 to_float2(const type& h) { return __half22float2(h); }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2half2_rn(a, b); }
};
template <>
struct Pair16<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ float2 to_float2(const type& h) { return __bfloat1622float2(h); }
  static __device__ __forceinline__ type from_floats(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

template <typename T>
struct Vec16 {  // __half and __nv_bfloat16: four pairs per 16 bytes
  static constexpr int kN = 8;
  using P = Pair16<T>;
  static __device__ __forceinline__ void to_float(const uint4& v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      typename P::type h;
      __builtin_memcpy(&h, &w[i], 4);
      const float2 x = P::to_float2(h);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  static __device__ __forceinline__ uint4 from_float(const float* f) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const typename P::type h = P::from_floats(f[2 * i], f[2 * i + 1]);
      __builtin_memcpy(&w[i], &h, 4);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Read-only global load (inputs are never written by the kernel that reads them).
template <typename T>
__device__ __forceinline__ void load16(const T* ptr, float* f) {
  Vec16<T>::to_float(__ldg(reinterpret_cast<const uint4*>(ptr)), f);
}

template <typename T>
__device__ __forceinline__ void load16_smem(const T* ptr, float* f) {
  Vec16<T>::to_float(*reinterpret_cast<const uint4*>(ptr), f);
}

template <typename T>
__device__ __forceinline__ void store16(T* ptr, const float* f) {
  *reinterpret_cast<uint4*>(ptr) = Vec16<T>::from_float(f);
}

// fp32 partials of the cls token (no rounding to T before the sum over groups).
template <int N>
__device__ __forceinline__ void store_f32(float* ptr, const float* f) {
  static_assert(N % 4 == 0, "16-byte stores");
#pragma unroll
  for (int i = 0; i < N; i += 4) *reinterpret_cast<float4*>(ptr + i) = make_float4(f[i], f[i + 1], f[i + 2], f[i + 3]);
}

// Sum over aligned groups of WIDTH lanes; every lane of the warp must call it.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers, zero-filled when
// the source is out of range so that padding rows read as 0 (never NaN garbage).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// `fallback` is any valid global address: with src-size 0 nothing is read from it.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid, const void* fallback) {
  const int bytes = valid ? 16 : 0;
  const void* src = valid ? gmem : fallback;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(src), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kFloat;
};
template <>
struct DTypeOf<__half> {
  static constexpr DType value = DType::kHalf;
};
template <>
struct DTypeOf<__nv_bfloat16> {
  static constexpr DType value = DType::kBFloat16;
};

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}, std::integral_constant<int, DH>{}) for the runtime dtype and head dim:
// the only instantiations are fp16, bf16, fp32 × Dh ∈ {64, 128}.
template <typename Fn>
inline cudaError_t dispatch_dtype_dim(DType dtype, int head_dim, Fn&& fn) {
  auto by_dim = [&](auto tag) -> cudaError_t {
    if (head_dim == 64) return fn(tag, std::integral_constant<int, 64>{});
    if (head_dim == 128) return fn(tag, std::integral_constant<int, 128>{});
    return cudaErrorInvalidValue;
  };
  switch (dtype) {
    case DType::kHalf: return by_dim(Tag<__half>{});
    case DType::kBFloat16: return by_dim(Tag<__nv_bfloat16>{});
    case DType::kFloat: return by_dim(Tag<float>{});
  }
  return cudaErrorInvalidValue;
}

__host__ __device__ __forceinline__ int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Sets the dynamic shared-memory limit of a kernel when it needs more than the default 48 KB.
template <typename Kernel>
inline cudaError_t allow_smem(Kernel kernel, size_t bytes, const DeviceLimits& lim) {
  if (bytes > lim.smem_per_block_optin) return cudaErrorInvalidConfiguration;
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace tk
