"""Swap-in for lucidrains' TimeSformer-pytorch (``timesformer_pytorch``, PyPI timesformer-pytorch).

Its ``Attention`` module serves both divided attentions, told apart by the einops patterns
of the call: ``forward(x, einops_from, einops_to, mask=None, cls_mask=None, rot_emb=None,
**einops_dims)`` with ``x`` (B, 1 + T·N, D), already normed, tokens time-major after cls
(token 1 + t·N + n)::

    time:  'b (f n) d' -> '(b n) f d', n=N    each patch attends over [cls, its T frames]
    space: 'b (f n) d' -> '(b f) n d', f=T    each frame's patches attend over [cls, its N patches]

The cls query attends to all 1 + T·N keys (masked by ``cls_mask``); the cls key/value joins
every group; rotary embeddings (``rot_emb`` = (sin, cos), position = frame index in time
attention, patch index in space attention) rotate q and k of the patch tokens, not of cls.
``to_qkv`` has its output laid out (3, H, Dh); ``to_out`` is Linear + Dropout.

In time-major order both are the op ``temporal_attention(with_cls=True)``: time attention is
``num_frames=T, token_order='time_major'``, space attention (groups of N contiguous rows) is
``num_frames=N, token_order='space_major'``. Rotary is applied per token in place of the
qkv layout (broadcast tables, no transpose of a full tensor); the one cls query row is plain
torch (scaled_dot_product_attention over strided views of qkv).

Falls back to the original forward, warning once, for: the per-frame padding ``mask`` (a key
mask inside the time-attention groups, which the kernels do not take), einops patterns other
than the two above, and ``rot_emb``/``cls_mask`` of shapes other than the model makes.
``cls_mask`` itself is supported (it only touches the cls query). Token shift happens
before the attention module and is left to the model; ``to_out`` (with its dropout) is called
as is, on the same tensor as the original, so its dropout draws are the same.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import temporal_attention
from ._common import class_named, signature_of

KIND = "lucidrains"
CPU_AUTO = "fused_without_grad"  # backend "auto" on CPU tensors (README, "On the CPU")
TIME = ("b (f n) d", "(b n) f d", "n")  # (einops_from, einops_to, the one einops_dims key)
SPACE = ("b (f n) d", "(b f) n d", "f")
_FORWARD_ARGS = ("x", "einops_from", "einops_to", "mask", "cls_mask", "rot_emb")


def matches(module: nn.Module) -> bool:
    if class_named(module, ("Attention",)) is None:  # anywhere in the MRO: FSDP2 subclasses it
        return False
    heads, to_qkv = getattr(module, "heads", None), getattr(module, "to_qkv", None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return False
    features = getattr(to_qkv, "out_features", None)  # called as a module: an nn.Linear or a peft/LoRA wrapper
    if not isinstance(to_qkv, nn.Module) or not isinstance(features, int) or features % (3 * heads):
        return False
    if not isinstance(getattr(module, "to_out", None), nn.Module):
        return False
    if not isinstance(getattr(module, "scale", None), float):
        return False
    signature = signature_of(type(module).forward)
    return signature is not None and all(a in signature.parameters for a in _FORWARD_ARGS)


def unsupported(module: nn.Module):
    """None: the fused path calls to_qkv and to_out as modules, and bypasses nothing else."""
    return None


class _Plan:
    """What one call needs: the op's arguments and where the rotary positions run."""

    def __init__(self, time: bool, t: int, n: int):
        self.time, self.t, self.n = time, t, n


def _warn(key: str, message: str):
    return key, "timesformer_kernels: lucidrains Attention " + message + ": running the original forward"


def _plan(module: nn.Module, x, einops_from, einops_to, mask, cls_mask, rot_emb, dims: dict):
    """A _Plan, or (warning key or None, message) to fall back (None: the original decides)."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[0] == 0:
        return None, ""
    key = (einops_from, einops_to, next(iter(dims)) if len(dims) == 1 else None)
    if key not in (TIME, SPACE):
        return _warn("lucidrains.pattern", f"called with einops patterns {einops_from!r} -> {einops_to!r} "
                     f"and {sorted(dims)} (fused: time '(b n) f d' with n, space '(b f) n d' with f)")
    size = dims[key[2]]
    patches = x.shape[1] - 1
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or patches < size or patches % size:
        return None, ""
    time = key == TIME
    n, t = (size, patches // size) if time else (patches // size, size)
    if mask is not None:
        return _warn("lucidrains.mask", "with a padding mask (frames masked out of the time-attention groups)")
    b, length = x.shape[0], x.shape[1]
    c = module.to_qkv.out_features // 3
    dh = c // module.heads
    if cls_mask is not None:
        if (not isinstance(cls_mask, Tensor) or cls_mask.dtype != torch.bool or cls_mask.dim() > 3
                or not _broadcasts(cls_mask.shape, (b * module.heads, 1, length))):
            return _warn("lucidrains.cls_mask", "with a cls_mask that is not a bool tensor broadcasting to "
                         "(batch*heads, 1, tokens)")
    if rot_emb is not None:
        positions = t if time else n
        ok = isinstance(rot_emb, (tuple, list)) and len(rot_emb) == 2 and all(isinstance(r, Tensor) for r in rot_emb)
        if ok:
            sin, cos = rot_emb
            r = sin.shape[-1] if sin.dim() else 0
            ok = (sin.shape == cos.shape and sin.dim() == 3 and sin.shape[0] == 1 and sin.shape[1] == positions
                  and r % 2 == 0 and 0 < r <= dh)
        if not ok:
            return _warn("lucidrains.rot_emb", "with rotary tables (sin, cos) not shaped (1, positions, even dim "
                         "<= head dim)")
    return _Plan(time, t, n)


def _broadcasts(shape, target) -> bool:
    try:
        torch.broadcast_shapes(shape, target)
    except RuntimeError:
        return False
    return torch.broadcast_shapes(shape, target) == torch.Size(target)


def _cls_attention(qkv: Tensor, heads: int, scale: float, cls_mask: Optional[Tensor]) -> Tensor:
    """The cls query over all 1 + T·N keys (unrotated, like the original): (B, 1, C)."""
    b, length, c3 = qkv.shape
    c = c3 // 3
    split = qkv.unflatten(-1, (3, heads, c // heads))  # (B, L, 3, H, Dh) view
    q = split[:, :1, 0].transpose(1, 2)  # (B, H, 1, Dh)
    k, v = split[:, :, 1].transpose(1, 2), split[:, :, 2].transpose(1, 2)  # (B, H, L, Dh)
    mask = None
    if cls_mask is not None:
        mask = cls_mask.expand(b * heads, 1, length).reshape(b, heads, 1, length)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2).reshape(b, 1, c)


def _with_rotary(qkv: Tensor, plan: _Plan, heads: int, sin: Tensor, cos: Tensor) -> Tensor:
    """qkv with q and k of the patch tokens rotated by their position, in qkv's layout.

    The patch rows are viewed as (B, T, N, 3, H, Dh) (time-major tokens); the (positions, r)
    tables broadcast over the frame axis (time attention) or the patch axis (space attention).
    One new tensor is written; the cls row and v are copied unchanged.
    """
    b, length, c3 = qkv.shape
    dh = c3 // (3 * heads)
    r = sin.shape[-1]
    shape = (1, plan.t, 1, 1, 1, r) if plan.time else (1, 1, plan.n, 1, 1, r)
    sin, cos = sin.reshape(shape), cos.reshape(shape)

    def patches(x):
        return x[:, 1:].unflatten(1, (plan.t, plan.n)).unflatten(-1, (3, heads, dh))

    src = patches(qkv)
    new = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dst = patches(new)
    new[:, :1] = qkv[:, :1]
    dst[..., 2, :, :] = src[..., 2, :, :]
    # upstream: x·cos + rotate_every_two(x)·sin with rotate_every_two (x0, x1) -> (-x1, x0);
    # written pair by pair (the same products and sums, so the same rounding).
    x = src[..., :2, :, :r].unflatten(-1, (r // 2, 2))
    y = dst[..., :2, :, :r].unflatten(-1, (r // 2, 2))
    sin, cos = sin.unflatten(-1, (r // 2, 2)), cos.unflatten(-1, (r // 2, 2))
    y[..., 0] = x[..., 0] * cos[..., 0] - x[..., 1] * sin[..., 0]
    y[..., 1] = x[..., 1] * cos[..., 1] + x[..., 0] * sin[..., 1]
    if r < dh:
        dst[..., :2, :, r:] = src[..., :2, :, r:]
    return new


def forward(fused, args: tuple, kwargs: dict):
    return _forward(fused, *args, **kwargs)


def _forward(fused, x, einops_from, einops_to, mask=None, cls_mask=None, rot_emb=None, **einops_dims):
    module = fused.module
    plan = _plan(module, x, einops_from, einops_to, mask, cls_mask, rot_emb, einops_dims)
    if not isinstance(plan, _Plan):
        return fused.run_original(*plan, (x, einops_from, einops_to),
                                  dict(mask=mask, cls_mask=cls_mask, rot_emb=rot_emb, **einops_dims))
    if fused.runs_original_on_cpu(x):
        return fused.original()(x, einops_from, einops_to, mask=mask, cls_mask=cls_mask, rot_emb=rot_emb,
                                **einops_dims)
    h, backend = module.heads, fused.backend
    qkv = module.to_qkv(x)
    cls_out = _cls_attention(qkv, h, module.scale, cls_mask)
    if rot_emb is not None:
        qkv = _with_rotary(qkv, plan, h, *rot_emb)
    if plan.time:
        out = temporal_attention(qkv, plan.t, h, scale=module.scale, token_order="time_major", with_cls=True,
                                 backend=backend)
    else:
        out = temporal_attention(qkv, plan.n, h, scale=module.scale, token_order="space_major", with_cls=True,
                                 backend=backend)
    return module.to_out(torch.cat((cls_out, out), 1))
