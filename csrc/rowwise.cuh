// Building blocks of the CUDA-core ("rowwise") kernels of temporal.cu and spatial_fp32.cu.
//
// One (token, head) row of Dh elements is spread over kLanes consecutive lanes, each holding one
// 16-byte vector (8 fp16/bf16 or 4 fp32 values) in fp32 registers; a dot product is kVec FMAs
// per lane plus a butterfly sum over those lanes. A block of kThreads threads therefore works on
// kUnits (token, head) rows at once. Rows are read with coalesced 16-byte loads: the heads of
// one token are contiguous in qkv, so lanes of neighbouring units read neighbouring bytes.
#pragma once

#include "layout.cuh"

namespace tk {
namespace rowwise {

constexpr int kThreads = 256;
// Keys (or queries) per shared-memory tile of the streaming loops; also the length of the
// per-lane score array of the forward, kept small so that several blocks fit on an SM.
constexpr int kTile = 16;

template <typename T, int DH>
struct Shape {
  static constexpr int kVec = Vec16<T>::kN;        // elements per lane
  static constexpr int kLanes = DH / kVec;          // lanes per (token, head) row
  static constexpr int kUnits = kThreads / kLanes;  // (token, head) rows per block
  static_assert(kLanes >= 1 && kLanes <= 32 && (32 % kLanes) == 0, "a row must sit inside one warp");
};

template <int N>
__device__ __forceinline__ float dot(const float* a, const float* b) {
  float d = 0.f;
#pragma unroll
  for (int v = 0; v < N; ++v) d = fmaf(a[v], b[v], d);
  return d;
}

template <int N>
__device__ __forceinline__ void axpy(float a, const float* x, float* y) {
#pragma unroll
  for (int v = 0; v < N; ++v) y[v] = fmaf(a, x[v], y[v]);
}

// Copies `rows` rows of `chunks` 16-byte chunks each into shared memory, row r at
// dst + r·chunks·kVec; src(r) is the global address of row r (called only for valid rows) and
// chunk_valid(c) says whether chunk c of a row exists (heads past H are zero-filled).
// Every thread of the block must call it; the caller commits and waits.
template <typename T, typename SrcFn, typename ValidFn>
__device__ __forceinline__ void load_rows_async(T* dst, int rows, int chunks, SrcFn src, ValidFn chunk_valid,
                                                const void* fallback) {
  constexpr int kVec = Vec16<T>::kN;
  for (int c = threadIdx.x; c < rows * chunks; c += kThreads) {
    const int r = c / chunks;
    const int ch = c - r * chunks;
    const bool valid = chunk_valid(ch);
    const T* s = valid ? src(r) + ch * kVec : nullptr;
    cp_async16(dst + c * kVec, s, valid, fallback);
  }
}

}  // namespace rowwise
}  // namespace tk
