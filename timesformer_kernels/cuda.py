"""CUDA C++ backend: the ops of ``csrc/`` (extension ``timesformer_kernels._C``).

The extension registers ``torch.ops.timesformer_kernels.cuda_attention_fwd`` and
``cuda_attention_bwd``; this module imports it lazily and mirrors the interface of
``timesformer_kernels.triton`` (same signatures and return conventions). Kernels
(see ``csrc/bindings.cpp``):

* short groups without a cls query (temporal attention, S <= 32): CUDA cores, a whole group
  and several heads per block, one fused backward pass;
* longer groups in fp16/bf16 (spatial attention): flash-style tensor-core kernels
  (``mma.sync``), backward split into dK/dV and dQ kernels;
* longer groups in fp32: CUDA-core kernels.

Built for sm_80 (runs on sm_80..sm_89) and sm_90a (H100/H200), head dims 64 and 128.
"""
from __future__ import annotations

import importlib

import torch

from .layout import Groups

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
build_hint = "rebuild with CUDA_HOME=/usr/local/cuda TK_BUILD_CUDA=1 pip install --no-build-isolation -e ."

_ext = None
_load_error: str | None = None


def _load():
    """The extension module, or None (the reason is kept in _load_error)."""
    global _ext, _load_error
    if _ext is None and _load_error is None:
        try:
            _ext = importlib.import_module("timesformer_kernels._C")
        except (ImportError, OSError) as e:
            _load_error = f"{type(e).__name__}: {e}"
    return _ext


def available() -> bool:
    """True when the compiled extension imports (a GPU is not needed for this)."""
    return _load() is not None


def load_error() -> str | None:
    """Why the extension did not import, or None."""
    _load()
    return _load_error


def _built_for(capability: tuple[int, int]) -> bool:
    major, minor = capability
    return major == 8 or (major, minor) == (9, 0)


def why_not(qkv, groups: Groups) -> list[str]:
    """Reasons this backend cannot run ``qkv`` with ``groups`` (empty when it can); the shape
    checks shared by every backend have already run (``validation``)."""
    reasons = []
    if not available():
        reasons.append(f"the CUDA extension timesformer_kernels._C is not built or does not import "
                       f"({_load_error}); {build_hint}")
    if torch.version.hip is not None:
        reasons.append("this is ROCm: the CUDA extension is built by nvcc for NVIDIA GPUs (sm_80, sm_90a) only")
    elif qkv.device.type != "cuda":
        reasons.append(f"qkv is on {qkv.device}, the CUDA backend needs a CUDA tensor")
    elif not _built_for(cap := torch.cuda.get_device_capability(qkv.device)):
        major, minor = cap
        reasons.append(f"device {qkv.device} is sm_{major}{minor}; the extension is built for sm_80..sm_89 "
                       f"and sm_90 only")
    if qkv.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {qkv.dtype} is not supported (float16, bfloat16, float32)")
    if groups.head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head_dim {groups.head_dim} is not supported (64 or 128)")
    return reasons


def _ops():
    if _load() is None:
        raise RuntimeError(f"timesformer_kernels CUDA backend is not available ({_load_error}); {build_hint}")
    return torch.ops.timesformer_kernels


def _geometry(groups: Groups):
    return (groups.num_groups, groups.seq_len, groups.group_stride, groups.pos_stride, groups.base,
            groups.cls_key, groups.cls_query, groups.num_heads)


def attention_fwd(qkv: torch.Tensor, groups: Groups, scale: float):
    """Returns (out (B,N·T,D), cls_out (B,G,D) or None, lse (B,N·T,H) fp32, cls_lse (B,G,H) or None)."""
    out, cls_out, lse, cls_lse = _ops().cuda_attention_fwd(qkv, *_geometry(groups), float(scale))
    if not groups.cls_query:
        cls_out = cls_lse = None
    return out, cls_out, lse, cls_lse


def attention_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, groups: Groups, scale: float):
    """Returns dqkv, contiguous, shape and dtype of qkv (dcls_out None reads as zeros)."""
    if not groups.cls_query:
        dcls_out = cls_out = cls_lse = None
    return _ops().cuda_attention_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, *_geometry(groups),
                                     float(scale))
