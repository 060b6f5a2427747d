"""Token layout of TimeSformer's qkv projection and the attention groups read from it.

Every backend (torch, triton, cuda) indexes qkv through the one formula below, so it is
written once here and the kernels refer to it.

qkv has shape (B, L, 3·H·Dh); the last dim is laid out (3, H, Dh) like every TimeSformer
qkv Linear, unit stride; the first two dims may have any stride::

      token row  0      1 ........................................ L-1
               [cls] [patch tokens, N·T of them, in `token_order`]
      channels  |<-- q: H·Dh -->|<-- k: H·Dh -->|<-- v: H·Dh -->|

    space_major (official, Hugging Face, mmaction2): patch (n, t) at row base + n·T + t
    time_major  (lucidrains):                        patch (n, t) at row base + t·N + n

``base`` is 1 when row 0 is the cls token, else 0. An op splits the patch tokens into
``G`` groups per clip of ``S`` tokens each; the token at position ``p`` of group ``g`` is::

    row(g, p) = base + g·group_stride + p·pos_stride

    op        groups (G)      S   space_major (gs, ps)   time_major (gs, ps)
    temporal  N patches       T   (T, 1)                 (1, N)
    spatial   T frames        N   (1, T)                 (N, 1)

The patch outputs are written to ``out`` (B, N·T, H·Dh) at row ``row(g, p) - base``, the
same token order as the input. The cls token (row 0) can join every group as an extra key
and value (``cls_key``: spatial, and temporal with ``with_cls``) and as an extra query
whose per-group output goes to ``cls_out`` (B, G, H·Dh) (``cls_query``: spatial). The
forward also saves the log-sum-exp of every query row for the backward: ``lse`` (B, N·T, H)
and ``cls_lse`` (B, G, H), in ``stats_dtype``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TOKEN_ORDERS = ("space_major", "time_major")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved log-sum-exp (lse, cls_lse): float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Groups:
    """Where the attention groups of one op sit in qkv (see the module docstring)."""

    batch: int
    num_groups: int  # G, groups per clip
    seq_len: int  # S, patch tokens per group (without cls)
    group_stride: int  # in token rows
    pos_stride: int  # in token rows
    base: int  # row of the first patch token: 1 with a cls token at row 0, else 0
    cls_key: bool  # row 0 joins every group as a key/value
    cls_query: bool  # row 0 queries every group; its outputs form cls_out (B, G, D)
    num_heads: int
    head_dim: int

    @property
    def num_patches(self) -> int:
        """N·T, the number of patch tokens per clip (rows of ``out``)."""
        return self.num_groups * self.seq_len

    def row(self, g: int, p: int) -> int:
        """qkv row of position ``p`` of group ``g`` (python reference of the formula)."""
        return self.base + g * self.group_stride + p * self.pos_stride


def temporal_groups(batch: int, length: int, num_frames: int, num_heads: int, head_dim: int,
                    token_order: str, with_cls: bool) -> Groups:
    """Groups of temporal attention: each patch position attends over its T frames."""
    base = 1 if with_cls else 0
    t = num_frames
    n = (length - base) // t
    gs, ps = (t, 1) if token_order == "space_major" else (1, n)
    return Groups(batch, n, t, gs, ps, base, with_cls, False, num_heads, head_dim)


def spatial_groups(batch: int, length: int, num_frames: int, num_heads: int, head_dim: int,
                   token_order: str) -> Groups:
    """Groups of spatial attention: each frame's [cls, N patches] attend to each other."""
    t = num_frames
    n = (length - 1) // t
    gs, ps = (1, t) if token_order == "space_major" else (n, 1)
    return Groups(batch, t, n, gs, ps, 1, True, True, num_heads, head_dim)
