"""Triton kernels of grouped attention over TimeSformer's qkv (see ``layout``).

``temporal.py`` packs many short groups (temporal attention, S <= 128, or <= 32 at head
dims above 128) into one program;
``spatial.py`` is a flash-style kernel for groups of any length with the cls query and key
(spatial attention, and temporal attention with T > 128). Both read qkv in place and write
dq/dk/dv into one gradient in qkv's layout.

Alignment: a launch specialises every pointer with ``data_ptr() % 16 == 0`` and every integer
argument divisible by 16 (strides included) as 16-divisible, which lets the compiler use
16-byte vector loads. A qkv Linear's output always qualifies (rows of 3·H·Dh elements, Dh a
multiple of 8). A view that does not (a storage offset or row stride that is not a multiple
of 16 bytes) still gives correct results, through a separately compiled variant with narrower
loads and more registers (ptxas: the temporal forward at Dh 64 goes from 96 to 255).
"""
from __future__ import annotations

import contextlib

import torch

from ..layout import Groups
from . import spatial, temporal


def _on_device(qkv: torch.Tensor):
    """Triton launches on the current CUDA device: make it qkv's (a no-op on CPU)."""
    return torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext()


def _short(groups: Groups) -> bool:
    return not groups.cls_query and groups.seq_len <= temporal.max_seq(groups.head_dim)


def attention_fwd(qkv: torch.Tensor, groups: Groups, scale: float):
    """Returns (out (B,N·T,D), cls_out (B,G,D) or None, lse (B,N·T,H) fp32, cls_lse (B,G,H) or None)."""
    with _on_device(qkv):
        if _short(groups):
            out, lse = temporal.temporal_fwd(qkv, groups, scale)
            return out, None, lse, None
        return spatial.spatial_fwd(qkv, groups, scale)


def attention_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, groups: Groups, scale: float):
    """Returns dqkv, contiguous, shape and dtype of qkv."""
    with _on_device(qkv):
        if _short(groups):
            return temporal.temporal_bwd(dout, qkv, lse, groups, scale)
        return spatial.spatial_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, groups, scale)
