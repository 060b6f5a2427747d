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

# The order ``backend="auto"`` tries on a CUDA tensor. The CUDA extension comes after Triton
# until a GPU benchmark shows it faster per op and shape: no GPU measurement has been made yet
# (see benchmarks/results/). On a CPU tensor ``auto`` is always "torch".
AUTO_ORDER = ("triton", "cuda", "torch")


def interpreting() -> bool:
    """Triton runs on CPU tensors when TRITON_INTERPRET=1 is set before Triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def _torch_why_not(qkv: torch.Tensor, groups: Groups) -> list[str]:
    return []


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
    return reasons


def _cuda_why_not(qkv: torch.Tensor, groups: Groups) -> list[str]:
    from . import cuda

    return cuda.why_not(qkv, groups)


_BACKENDS = {"torch": _torch_why_not, "triton": _triton_why_not, "cuda": _cuda_why_not}
BACKEND_NAMES = tuple(_BACKENDS)


def why_not(name: str, qkv: torch.Tensor, groups: Groups) -> list[str]:
    """Reasons backend ``name`` cannot run this call; empty when it can."""
    return _BACKENDS[name](qkv, groups)


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
