"""The "torch" backend: grouped attention in plain PyTorch on strided views of qkv.

Runs on any device and dtype (fp64 for gradcheck); autograd differentiates it, so it needs no
backward of its own. The groups of ``layout`` are always one of two view shapes of the patch
rows: group-major (group_stride == S, pos_stride == 1) or position-major (group_stride == 1,
pos_stride == G), so no gather is needed, only views, plus the cls row concatenated in front.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import Groups


def _split_groups(patches: torch.Tensor, groups: Groups) -> torch.Tensor:
    """(B, N·T, C) patch rows -> (B, G, S, C) view in group/position order."""
    g, s = groups.num_groups, groups.seq_len
    if groups.group_stride == s and groups.pos_stride == 1:
        return patches.unflatten(1, (g, s))
    return patches.unflatten(1, (s, g)).transpose(1, 2)


def _merge_groups(x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Inverse of ``_split_groups``: (B, G, S, C) -> (B, N·T, C) in token order."""
    if groups.group_stride == groups.seq_len and groups.pos_stride == 1:
        return x.flatten(1, 2)
    return x.transpose(1, 2).flatten(1, 2)


def attention(qkv: torch.Tensor, groups: Groups, scale: float):
    """Returns (out (B, N·T, D), cls_out (B, G, D) or None) for the groups of one op."""
    b, h, dh, g = groups.batch, groups.num_heads, groups.head_dim, groups.num_groups
    heads = (3, h, dh)
    x = _split_groups(qkv[:, groups.base:], groups).unflatten(-1, heads)  # (B, G, S, 3, H, Dh)
    q, k, v = (x.select(3, i).transpose(2, 3) for i in range(3))  # (B, G, H, S, Dh)
    if groups.base:
        cls = qkv[:, 0].unflatten(-1, heads)[:, :, None, :, None, :].expand(b, 3, g, h, 1, dh)
        if groups.cls_key:
            k = torch.cat([cls[:, 1], k], dim=3)
            v = torch.cat([cls[:, 2], v], dim=3)
        if groups.cls_query:
            q = torch.cat([cls[:, 0], q], dim=3)
    o = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale=scale)
    o = o.unflatten(0, (b, g)).transpose(2, 3)  # (B, G, S', H, Dh)
    cls_out = None
    if groups.cls_query:
        cls_out, o = o[:, :, 0].flatten(2), o[:, :, 1:]
    return _merge_groups(o.flatten(3), groups), cls_out
