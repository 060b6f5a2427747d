"""One check of the public ops' inputs, shared by every backend, run before any kernel.

Errors name the argument (``qkv``, ``num_frames``, ``num_heads``, ``scale``, ``dtype``,
``token_order``, ``with_cls``, ``backend``) and say what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

from .backends import BACKEND_NAMES
from .layout import TOKEN_ORDERS, Groups, spatial_groups, temporal_groups

BACKENDS = ("auto", *BACKEND_NAMES)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_scale(scale, head_dim: int) -> float:
    """Default Dh^-0.5; otherwise a finite real number."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be None or a finite float, got {scale!r}")
    return float(scale)


def _check_common(qkv, num_frames, num_heads, token_order, backend):
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have rank 3 (B, L, 3*num_heads*head_dim), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype of qkv must be one of float16, bfloat16, float32, float64, got {qkv.dtype}")
    t = check_int("num_frames", num_frames)
    h = check_int("num_heads", num_heads)
    channels = qkv.shape[-1]
    if channels == 0 or channels % (3 * h) != 0:
        raise ValueError(
            f"qkv's last dim ({channels}) must be 3*num_heads*head_dim with num_heads={h}: "
            f"a positive multiple of {3 * h}")
    if qkv.shape[0] == 0:
        raise ValueError(f"qkv must hold at least one clip, got shape {tuple(qkv.shape)}")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv's last dim must have unit stride, got strides {qkv.stride()}")
    if not isinstance(token_order, str) or token_order not in TOKEN_ORDERS:
        raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {token_order!r}")
    check_backend(backend)
    return t, h, channels // (3 * h)


def _check_length(length: int, num_frames: int, with_cls: bool) -> None:
    patches = length - (1 if with_cls else 0)
    what = "1 + N*num_frames (cls token first)" if with_cls else "N*num_frames"
    if patches < num_frames or patches % num_frames != 0:
        raise ValueError(
            f"qkv has {length} tokens but num_frames={num_frames}: expected {what} tokens with N >= 1")


def check_temporal(qkv, num_frames, num_heads, scale, token_order, with_cls, backend) -> tuple[Groups, float]:
    t, h, dh = _check_common(qkv, num_frames, num_heads, token_order, backend)
    if not isinstance(with_cls, bool):
        raise TypeError(f"with_cls must be a bool, got {type(with_cls).__name__}")
    _check_length(qkv.shape[1], t, with_cls)
    groups = temporal_groups(qkv.shape[0], qkv.shape[1], t, h, dh, token_order, with_cls)
    return groups, check_scale(scale, dh)


def check_spatial(qkv, num_frames, num_heads, scale, token_order, backend) -> tuple[Groups, float]:
    t, h, dh = _check_common(qkv, num_frames, num_heads, token_order, backend)
    _check_length(qkv.shape[1], t, True)
    groups = spatial_groups(qkv.shape[0], qkv.shape[1], t, h, dh, token_order)
    return groups, check_scale(scale, dh)
