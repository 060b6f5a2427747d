// Entry of the CUDA backend: checks every input (so that a bad call never launches a kernel),
// allocates the outputs, picks the kernels, and registers the two ops in the
// `timesformer_kernels` namespace (shared with the Python side, hence a FRAGMENT).
//
//   cuda_attention_fwd(qkv, geometry..., scale) -> [out, cls_out, lse, cls_lse]
//   cuda_attention_bwd(dout, dcls_out?, qkv, out, cls_out?, lse, cls_lse?, geometry..., scale) -> dqkv
//
// Shapes and semantics: timesformer_kernels/layout.py and triton/__init__.py; the layout
// diagram is in attention.h. Kernel choice (same for every call of a given geometry and dtype):
//   short groups (S <= kShortMaxSeq, no cls query)  temporal.cu (CUDA cores), every dtype
//   long groups, fp16/bf16                           spatial.cu (tensor cores)
//   long groups, fp32                                temporal.cu forward + spatial_fp32.cu backward
#include <Python.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

// Per-operator headers instead of <ATen/ATen.h>: a third of the compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "attention.h"

namespace tk {
namespace {

struct Geometry {
  int64_t num_groups, seq_len, group_stride, pos_stride, base;
  bool cls_key, cls_query;
  int64_t num_heads;
  double scale;
};

const char* kOpFwd = "cuda_attention_fwd";
const char* kOpBwd = "cuda_attention_bwd";

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat;
  }
}

// Checks qkv's metadata and the geometry against it; returns the head dim. The device is checked
// separately (check_devices) after all metadata, so that a CPU call reports the first real
// problem of its arguments.
int64_t check_qkv(const char* op, const at::Tensor& qkv, const Geometry& geo) {
  TORCH_CHECK(qkv.defined(), op, ": qkv must be a tensor");
  TORCH_CHECK(qkv.dim() == 3, op, ": qkv must have rank 3 (B, L, 3*num_heads*head_dim), got shape ", qkv.sizes());
  const auto st = qkv.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, op,
              ": qkv must be float16, bfloat16 or float32, got ", st);
  TORCH_CHECK(qkv.stride(2) == 1, op, ": qkv's last dim must have unit stride, got strides ", qkv.strides());
  TORCH_CHECK(geo.num_heads >= 1, op, ": num_heads must be >= 1, got ", geo.num_heads);
  const int64_t channels = qkv.size(2);
  TORCH_CHECK(channels > 0 && channels % (3 * geo.num_heads) == 0, op, ": qkv's last dim (", channels,
              ") must be 3*num_heads*head_dim with num_heads=", geo.num_heads);
  const int64_t head_dim = channels / (3 * geo.num_heads);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, op, ": head_dim of qkv (last dim ", channels, " / (3*num_heads=",
              3 * geo.num_heads, ")) must be 64 or 128, got ", head_dim);
  TORCH_CHECK(qkv.size(0) >= 1, op, ": qkv must hold at least one clip, got shape ", qkv.sizes());
  TORCH_CHECK(geo.num_groups >= 1, op, ": num_groups must be >= 1, got ", geo.num_groups);
  TORCH_CHECK(geo.seq_len >= 1, op, ": seq_len must be >= 1, got ", geo.seq_len);
  TORCH_CHECK(geo.base == 0 || geo.base == 1, op, ": base must be 0 or 1, got ", geo.base);
  TORCH_CHECK(!(geo.cls_key || geo.cls_query) || geo.base == 1, op,
              ": cls_key/cls_query need the cls token at row 0 (base=1), got base=", geo.base);
  TORCH_CHECK(qkv.size(1) == geo.base + geo.num_groups * geo.seq_len, op, ": qkv has ", qkv.size(1),
              " tokens but base + num_groups*seq_len = ", geo.base, " + ", geo.num_groups, "*", geo.seq_len);
  // Exactly the two token orders of layout.py, so that the groups cover every patch row once.
  const bool order_a = geo.group_stride == geo.seq_len && geo.pos_stride == 1;
  const bool order_b = geo.group_stride == 1 && geo.pos_stride == geo.num_groups;
  TORCH_CHECK(order_a || order_b, op, ": (group_stride, pos_stride) must be (seq_len, 1) or (1, num_groups), got (",
              geo.group_stride, ", ", geo.pos_stride, ") with seq_len=", geo.seq_len, ", num_groups=", geo.num_groups);
  TORCH_CHECK(std::isfinite(geo.scale), op, ": scale must be finite, got ", geo.scale);
  return head_dim;
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& qkv) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == qkv.device(), op, ": ", name, " is on ", t.device(), " but qkv is on ", qkv.device());
}

int device_attr(cudaDeviceAttr attr, int device) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attr, device);
  TORCH_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute failed: ", cudaGetErrorString(err));
  return value;
}

// Reads the limits of the current device (set by the guard) and checks that our code runs on it.
DeviceLimits device_limits(const char* op) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  TORCH_CHECK(err == cudaSuccess, op, ": cudaGetDevice failed: ", cudaGetErrorString(err));
  const int major = device_attr(cudaDevAttrComputeCapabilityMajor, device);
  const int minor = device_attr(cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major == 8 || (major == 9 && minor == 0), op,
              ": the CUDA extension is built for sm_80..sm_89 (sm_80 code) and sm_90 (sm_90a code), "
              "this device is sm_", major, minor);
  DeviceLimits lim;
  lim.num_sms = device_attr(cudaDevAttrMultiProcessorCount, device);
  lim.smem_per_block_optin = static_cast<size_t>(device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return lim;
}

// 16-byte vector loads need 16-byte aligned rows: otherwise work on an aligned copy.
at::Tensor aligned(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.size(d) == 1 || t.stride(d) % vec == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Contiguous and aligned (outputs of our forward already are).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

AttnParams make_params(const at::Tensor& qkv, const Geometry& geo, int64_t head_dim) {
  AttnParams p;
  p.qkv = qkv.data_ptr();
  p.qkv_stride_b = qkv.stride(0);
  p.qkv_stride_l = qkv.stride(1);
  p.batch = qkv.size(0);
  p.num_groups = geo.num_groups;
  p.seq_len = geo.seq_len;
  p.group_stride = geo.group_stride;
  p.pos_stride = geo.pos_stride;
  p.length = qkv.size(1);
  p.base = static_cast<int>(geo.base);
  p.cls_key = geo.cls_key;
  p.cls_query = geo.cls_query;
  p.num_heads = static_cast<int>(geo.num_heads);
  p.head_dim = static_cast<int>(head_dim);
  p.scale = static_cast<float>(geo.scale);
  return p;
}

void check_launch(const char* op, const char* what, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": launching the ", what, " kernels failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> attention_fwd(const at::Tensor& qkv_in, int64_t num_groups, int64_t seq_len,
                                      int64_t group_stride, int64_t pos_stride, int64_t base, bool cls_key,
                                      bool cls_query, int64_t num_heads, double scale) {
  const Geometry geo{num_groups, seq_len, group_stride, pos_stride, base, cls_key, cls_query, num_heads, scale};
  const int64_t head_dim = check_qkv(kOpFwd, qkv_in, geo);
  TORCH_CHECK(qkv_in.is_cuda(), kOpFwd, ": qkv must be a CUDA tensor, got device ", qkv_in.device());
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const DeviceLimits lim = device_limits(kOpFwd);

  const at::Tensor qkv = aligned(qkv_in);
  const int64_t batch = qkv.size(0), dim = num_heads * head_dim, patches = num_groups * seq_len;
  const auto f32 = qkv.options().dtype(at::kFloat);
  at::Tensor out = at::empty({batch, patches, dim}, qkv.options());
  at::Tensor lse = at::empty({batch, patches, num_heads}, f32);
  at::Tensor cls_out = cls_query ? at::empty({batch, num_groups, dim}, qkv.options()) : at::empty({0}, qkv.options());
  at::Tensor cls_lse = cls_query ? at::empty({batch, num_groups, num_heads}, f32) : at::empty({0}, f32);

  AttnParams p = make_params(qkv, geo, head_dim);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (cls_query) {
    p.cls_out = cls_out.data_ptr();
    p.cls_lse = cls_lse.data_ptr<float>();
  }
  const DType dtype = dtype_of(qkv);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (use_short_kernels(p) || dtype == DType::kFloat)
    check_launch(kOpFwd, "temporal forward", launch_temporal_fwd(p, dtype, lim, stream));
  else
    check_launch(kOpFwd, "spatial forward", launch_spatial_fwd(p, dtype, lim, stream));
  return {out, cls_out, lse, cls_lse};
}

at::Tensor attention_bwd(const at::Tensor& dout_in, const std::optional<at::Tensor>& dcls_out_in,
                         const at::Tensor& qkv_in, const at::Tensor& out_in, const std::optional<at::Tensor>& cls_out_in,
                         const at::Tensor& lse_in, const std::optional<at::Tensor>& cls_lse_in, int64_t num_groups,
                         int64_t seq_len, int64_t group_stride, int64_t pos_stride, int64_t base, bool cls_key,
                         bool cls_query, int64_t num_heads, double scale) {
  const char* op = kOpBwd;
  const Geometry geo{num_groups, seq_len, group_stride, pos_stride, base, cls_key, cls_query, num_heads, scale};
  const int64_t head_dim = check_qkv(op, qkv_in, geo);
  const int64_t batch = qkv_in.size(0), dim = num_heads * head_dim, patches = num_groups * seq_len;
  const auto dtype_t = qkv_in.scalar_type();
  check_tensor(op, "dout", dout_in, {batch, patches, dim}, dtype_t);
  check_tensor(op, "out", out_in, {batch, patches, dim}, dtype_t);
  check_tensor(op, "lse", lse_in, {batch, patches, num_heads}, at::kFloat);
  const bool has_dcls = dcls_out_in.has_value() && dcls_out_in->defined();
  if (cls_query) {
    TORCH_CHECK(cls_out_in.has_value() && cls_out_in->defined(), op, ": cls_out is required when cls_query");
    TORCH_CHECK(cls_lse_in.has_value() && cls_lse_in->defined(), op, ": cls_lse is required when cls_query");
    check_tensor(op, "cls_out", *cls_out_in, {batch, num_groups, dim}, dtype_t);
    check_tensor(op, "cls_lse", *cls_lse_in, {batch, num_groups, num_heads}, at::kFloat);
    if (has_dcls) check_tensor(op, "dcls_out", *dcls_out_in, {batch, num_groups, dim}, dtype_t);
  }
  TORCH_CHECK(qkv_in.is_cuda(), op, ": qkv must be a CUDA tensor, got device ", qkv_in.device());
  check_device(op, "dout", dout_in, qkv_in);
  check_device(op, "out", out_in, qkv_in);
  check_device(op, "lse", lse_in, qkv_in);
  if (cls_query) {
    check_device(op, "cls_out", *cls_out_in, qkv_in);
    check_device(op, "cls_lse", *cls_lse_in, qkv_in);
    if (has_dcls) check_device(op, "dcls_out", *dcls_out_in, qkv_in);
  }
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const DeviceLimits lim = device_limits(op);

  const at::Tensor qkv = aligned(qkv_in);
  const at::Tensor dout = dense(dout_in), out = dense(out_in), lse = lse_in.contiguous();
  const auto f32 = qkv.options().dtype(at::kFloat);
  at::Tensor cls_out, cls_lse, dcls_out;
  if (cls_query) {
    cls_out = dense(*cls_out_in);
    cls_lse = cls_lse_in->contiguous();
    // No gradient for cls_out (it was not used) reads as zeros.
    dcls_out = has_dcls ? dense(*dcls_out_in) : at::zeros({batch, num_groups, dim}, qkv.options());
  }

  at::Tensor dqkv = at::empty({batch, qkv.size(1), 3 * dim}, qkv.options());
  at::Tensor cls_dq = cls_query ? at::empty({batch, num_groups, num_heads, head_dim}, f32) : at::Tensor();
  at::Tensor cls_dkv = cls_key ? at::empty({batch, num_groups, num_heads, 2, head_dim}, f32) : at::Tensor();

  AttnParams p = make_params(qkv, geo, head_dim);
  p.out = const_cast<void*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dqkv = dqkv.data_ptr();
  if (cls_query) {
    p.cls_out = cls_out.data_ptr();
    p.cls_lse = cls_lse.data_ptr<float>();
    p.dcls_out = dcls_out.data_ptr();
    p.cls_dq = cls_dq.data_ptr<float>();
  }
  if (cls_key) p.cls_dkv = cls_dkv.data_ptr<float>();

  const DType dtype = dtype_of(qkv);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (use_short_kernels(p)) {
    check_launch(op, "temporal backward", launch_temporal_bwd(p, dtype, lim, stream));
  } else {
    at::Tensor delta = at::empty({batch, patches, num_heads}, f32);
    at::Tensor cls_delta = cls_query ? at::empty({batch, num_groups, num_heads}, f32) : at::Tensor();
    p.delta = delta.data_ptr<float>();
    if (cls_query) p.cls_delta = cls_delta.data_ptr<float>();
    check_launch(op, "backward row-dot", launch_bwd_rowdot(p, dtype, stream));
    if (dtype == DType::kFloat)
      check_launch(op, "spatial fp32 backward", launch_spatial_bwd_fp32(p, lim, stream));
    else
      check_launch(op, "spatial backward", launch_spatial_bwd(p, dtype, lim, stream));
  }

  // Row 0 (the cls token): sums over the G groups of each clip of the per-group partials, in a
  // fixed order (no atomics), or zeros where the cls token took no part.
  if (base == 1) {
    at::Tensor row0 = dqkv.select(1, 0);  // (B, 3·D)
    if (cls_query)
      row0.narrow(1, 0, dim).copy_(cls_dq.sum(1).reshape({batch, dim}));
    else
      row0.narrow(1, 0, dim).zero_();
    if (cls_key)
      row0.narrow(1, dim, 2 * dim).copy_(cls_dkv.sum(1).permute({0, 2, 1, 3}).reshape({batch, 2 * dim}));
    else
      row0.narrow(1, dim, 2 * dim).zero_();
  }
  return dqkv;
}

}  // namespace
}  // namespace tk

TORCH_LIBRARY_FRAGMENT(timesformer_kernels, m) {
  m.def(
      "cuda_attention_fwd(Tensor qkv, int num_groups, int seq_len, int group_stride, int pos_stride, int base, "
      "bool cls_key, bool cls_query, int num_heads, float scale) -> Tensor[]");
  m.def(
      "cuda_attention_bwd(Tensor dout, Tensor? dcls_out, Tensor qkv, Tensor out, Tensor? cls_out, Tensor lse, "
      "Tensor? cls_lse, int num_groups, int seq_len, int group_stride, int pos_stride, int base, bool cls_key, "
      "bool cls_query, int num_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(timesformer_kernels, CUDA, m) {
  m.impl("cuda_attention_fwd", &tk::attention_fwd);
  m.impl("cuda_attention_bwd", &tk::attention_bwd);
}

// The same entry on CPU only checks the arguments and reports what is wrong (a CPU qkv, or any
// metadata problem found first) instead of the dispatcher's generic "no CPU kernel" error.
TORCH_LIBRARY_IMPL(timesformer_kernels, CPU, m) {
  m.impl("cuda_attention_fwd", &tk::attention_fwd);
  m.impl("cuda_attention_bwd", &tk::attention_bwd);
}

// A plain extension module: importing it runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "CUDA kernels of timesformer_kernels (ops in torch.ops.timesformer_kernels)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
