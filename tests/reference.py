"""Plain einsum/softmax maths of divided space-time attention, written from the paper and the
official code's semantics, independently of the package (no import from it).

Both functions take qkv (B, L, 3*H*Dh) exactly like the public ops and compute in float64
(or float32 when asked), so they can judge fp32/fp16/bf16 kernels and fp64 gradcheck alike.
"""
from __future__ import annotations

import torch


def _patches(qkv: torch.Tensor, num_frames: int, num_heads: int, first: int, token_order: str):
    """q, k, v of the patch tokens as (B, N, T, H, Dh), whatever the token order."""
    b, length, c = qkv.shape
    dh = c // (3 * num_heads)
    n = (length - first) // num_frames
    x = qkv[:, first:]
    if token_order == "space_major":  # token 1 + n*T + t
        x = x.reshape(b, n, num_frames, 3, num_heads, dh)
    elif token_order == "time_major":  # token 1 + t*N + n
        x = x.reshape(b, num_frames, n, 3, num_heads, dh).transpose(1, 2)
    else:
        raise ValueError(token_order)
    return x[..., 0, :, :], x[..., 1, :, :], x[..., 2, :, :]


def _to_tokens(o: torch.Tensor, token_order: str) -> torch.Tensor:
    """(B, N, T, H, Dh) back to (B, N*T, H*Dh) in the model's token order."""
    b, n, t, h, dh = o.shape
    if token_order == "time_major":
        o = o.transpose(1, 2)
    return o.reshape(b, n * t, h * dh)


def ref_temporal_attention(qkv, num_frames, num_heads, scale=None, token_order="space_major",
                           with_cls=False, compute_dtype=torch.float64):
    """Each patch n attends over its T frames (and the cls token when with_cls)."""
    x = qkv.to(compute_dtype)
    q, k, v = _patches(x, num_frames, num_heads, 1 if with_cls else 0, token_order)
    dh = q.shape[-1]
    scale = dh ** -0.5 if scale is None else scale
    s = torch.einsum("bnthd,bnshd->bnhts", q, k) * scale
    if with_cls:
        cls = x[:, 0].reshape(x.shape[0], 3, num_heads, dh)
        s_cls = torch.einsum("bnthd,bhd->bnht", q, cls[:, 1]) * scale
        p = torch.softmax(torch.cat([s_cls.unsqueeze(-1), s], dim=-1), dim=-1)
        o = torch.einsum("bnhts,bnshd->bnthd", p[..., 1:], v)
        o = o + torch.einsum("bnht,bhd->bnthd", p[..., 0], cls[:, 2])
    else:
        p = torch.softmax(s, dim=-1)
        o = torch.einsum("bnhts,bnshd->bnthd", p, v)
    return _to_tokens(o, token_order).to(qkv.dtype)


def ref_spatial_attention(qkv, num_frames, num_heads, scale=None, token_order="space_major",
                          compute_dtype=torch.float64):
    """Each frame's group [cls, N patches] attends over itself; returns (out, cls_out)."""
    x = qkv.to(compute_dtype)
    b = x.shape[0]
    q, k, v = _patches(x, num_frames, num_heads, 1, token_order)  # (B, N, T, H, Dh)
    dh = q.shape[-1]
    scale = dh ** -0.5 if scale is None else scale
    cls = x[:, 0].reshape(b, 3, num_heads, dh)
    t = num_frames
    # keys/values of frame group t: [cls, patches of frame t] -> (B, T, 1+N, H, Dh)
    kg = torch.cat([cls[:, 1].unsqueeze(1).unsqueeze(1).expand(b, t, 1, num_heads, dh), k.transpose(1, 2)], 2)
    vg = torch.cat([cls[:, 2].unsqueeze(1).unsqueeze(1).expand(b, t, 1, num_heads, dh), v.transpose(1, 2)], 2)
    qg = torch.cat([cls[:, 0].unsqueeze(1).unsqueeze(1).expand(b, t, 1, num_heads, dh), q.transpose(1, 2)], 2)
    p = torch.softmax(torch.einsum("btihd,btjhd->bthij", qg, kg) * scale, dim=-1)
    o = torch.einsum("bthij,btjhd->btihd", p, vg)  # (B, T, 1+N, H, Dh)
    cls_out = o[:, :, 0].reshape(b, t, num_heads * dh)
    out = _to_tokens(o[:, :, 1:].transpose(1, 2), token_order)
    return out.to(qkv.dtype), cls_out.to(qkv.dtype)
