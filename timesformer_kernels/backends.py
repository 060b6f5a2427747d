"""Backends that explain themselves: each says why it cannot run a call, ``auto`` takes the
first that can, in a documented order.

Adding a backend is one entry in ``_BACKENDS`` (and one in ``AUTO_ORDER`` if auto may pick it).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .layout import Groups

# Head dims the Triton kernels compile for (masked to the next power of two): TimeSformer's
# 64, and the video diffusion models' 40/72/80/160 (AnimateDiff, Latte) up to 256.
TRITON_HEAD_DIMS = tuple(range(8, 257, 8))

# The order ``backend="auto"`` tries on a CUDA tensor. Until a GPU benchmark exists, per op the
# static report's issue-time model decides (benchmarks/results/static/kernels.md, "The CUDA
# extension beside the Triton kernels": at TimeSformer-base and HR, bf16, Dh 64, H100, every op's
# lower bound is lower with the Triton kernels), so the CUDA extension comes after Triton. On a
# CPU tensor ``auto`` is always "torch".
AUTO_ORDER = ("triton", "cuda", "torch")


def interpreting() -> bool:
    """Triton runs on CPU tensors when TRITON_INTERPRET=1 is set before Triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def _torch_why_not(qkv: torch.Tensor, groups: Groups) -> list[str]:
    return []


class DoesNotFit(ValueError):
    """A compiled backend's kernel has no config that fits the device (predicted before any
    launch, or a launch that ran out of resources). The message names the device, dtype,
    head dim and what does not fit."""


# Launches that ran out of resources although predicted to fit: (backend, call key) -> why.
# why_not reports them, so ``auto`` passes that backend over for such calls from then on.
_failed: dict[tuple, str] = {}


def _call_key(qkv: torch.Tensor, groups: Groups) -> tuple:
    """What decides the kernels and configs of a call (not its batch or group count)."""
    from .devices import float32_matmul_precision

    return (str(qkv.device), qkv.dtype, float32_matmul_precision(), groups.head_dim, groups.seq_len,
            groups.cls_key, groups.cls_query)


def note_failure(name: str, qkv: torch.Tensor, groups: Groups, error: DoesNotFit) -> None:
    """Remember that backend ``name`` could not launch this kind of call on this device."""
    _failed[(name, *_call_key(qkv, groups))] = str(error)


def _triton_why_not(qkv: torch.Tensor, groups: Groups) -> list[str]:
    reasons = []
    if not triton_available():
        reasons.append("triton is not installed (pip install triton)")
    if qkv.device.type == "cpu" and not interpreting():
        reasons.append("a CPU tensor needs TRITON_INTERPRET=1 (set before importing triton)")
    elif qkv.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {qkv.device.type} is not supported (cuda, or cpu with TRITON_INTERPRET=1)")
    if qkv.dtype == torch.float64 and qkv.device.type != "cpu":
        reasons.append("dtype float64 runs only under the interpreter (use backend='torch' on GPU)")
    if groups.head_dim not in TRITON_HEAD_DIMS:
        reasons.append(f"head_dim {groups.head_dim} is not a multiple of 8 in [8, 256]")
    if not reasons:
        from . import triton as kernels

        reasons += kernels.why_not(qkv, groups)
    return reasons


def _cuda_why_not(qkv: torch.Tensor, groups: Groups) -> list[str]:
    from . import cuda

    return cuda.why_not(qkv, groups)


_BACKENDS = {"torch": _torch_why_not, "triton": _triton_why_not, "cuda": _cuda_why_not}
BACKEND_NAMES = tuple(_BACKENDS)


def why_not(name: str, qkv: torch.Tensor, groups: Groups) -> list[str]:
    """Reasons backend ``name`` cannot run this call; empty when it can."""
    failed = _failed.get((name, *_call_key(qkv, groups))) if _failed else None
    return _BACKENDS[name](qkv, groups) + ([f"a launch on this device failed: {failed}"] if failed else [])


def choose(backend: str, qkv: torch.Tensor, groups: Groups) -> str:
    """Resolve ``backend`` ("auto" or a name) to one that can run, or raise naming every reason."""
    if backend != "auto":
        reasons = why_not(backend, qkv, groups)
        if reasons:
            raise ValueError(f"backend={backend!r} cannot run this call: " + "; ".join(reasons))
        return backend
    if qkv.device.type != "cuda":
        return "torch"
    tried = []
    for name in AUTO_ORDER:
        reasons = why_not(name, qkv, groups)
        if not reasons:
            return name
        tried.append(f"{name}: " + "; ".join(reasons))
    raise ValueError("backend='auto' found no backend for this call: " + " | ".join(tried))
