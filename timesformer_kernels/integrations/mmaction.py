"""Swap-in for mmaction2's divided space-time attention (``models/common/transformer.py``).

``DividedTemporalAttentionWithNorm`` and ``DividedSpatialAttentionWithNorm`` are matched by
class name anywhere in the MRO (so it works however mmaction2 was imported, even file by file,
and under FSDP2's subclass) and structure; at every call the attention must still be
``nn.MultiheadAttention``'s own maths (a peft/LoRA wrapper falls back) without hooks.
Both hold a norm, a packed ``nn.MultiheadAttention`` (``in_proj_weight``/``in_proj_bias`` is
the qkv Linear with its output laid out (3, H, Dh), ``out_proj`` the projection),
``proj_drop`` (nn.Dropout), ``dropout_layer`` (mmcv's DropPath by default) and, temporal only,
``temporal_fc``. Tokens are space-major after the cls token. What the originals compute
(B clips, N patches, T frames, m channels)::

    temporal: x[:, 1:] -> (B·N, T, m) -> norm -> MHA -> proj_drop -> dropout_layer -> temporal_fc
              out = cat(cls, x[:, 1:] + that)                       (cls passes through)
    spatial:  [cls, patches of frame t] -> (B·T, 1+N, m) -> norm -> MHA -> proj_drop -> dropout_layer
              out = x + cat(mean over frames of the T cls rows, patch rows back in token order)

The fused forwards apply the norm and the qkv projection once to the whole (B, 1+N·T, m)
sequence and read the attention groups in place (the temporal op gets ``qkv[:, 1:]`` as a
view); no rearrange of a full tensor remains. Random draws match the originals in shape and
order: in the temporal module the (B·N, T, m) result is the very tensor the original hands to
``proj_drop`` and ``dropout_layer`` (same shape and layout), so those modules are called as they
are; in the spatial module the per-(clip, frame) DropPath mask and the elementwise dropout
masks are drawn in the original's (B·T, 1+N, m) shape and mapped onto the fused layout.

Falls back to the original forward (warning once) for: attention dropout > 0 in training
(``attn_drop``: dropout on the probabilities), ``nn.MultiheadAttention`` options the packed
qkv layout does not cover (batch_first, add_bias_kv, add_zero_attn, separate k/v dims), a norm
that is not per token (LayerNorm/RMSNorm over the channels, or Identity), and in the spatial
module a ``dropout_layer`` other than Identity, nn.Dropout or mmcv's DropPath. Calls the
original would reject (``residual`` given, a token count not 1 + N·T) run the original too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import spatial_attention, temporal_attention
from ._common import bind_arguments, class_named, hooks_reason, signature_of

KIND = "mmaction"
CPU_AUTO = "fused_without_grad"  # backend "auto" on CPU tensors (README, "On the CPU")
TEMPORAL = "DividedTemporalAttentionWithNorm"
SPATIAL = "DividedSpatialAttentionWithNorm"


def _kind(module: nn.Module) -> Optional[str]:
    """TEMPORAL or SPATIAL: the first class in module's MRO with one of the two names (FSDP2 and
    other wrappers subclass the module's class), else None."""
    cls = class_named(module, (TEMPORAL, SPATIAL))
    return None if cls is None else cls.__name__


def matches(module: nn.Module) -> bool:
    name = _kind(module)
    if name is None:
        return False
    if not isinstance(getattr(module, "attn", None), nn.Module) or signature_of(type(module).forward) is None:
        return False
    if not all(isinstance(getattr(module, a, None), nn.Module) for a in ("norm", "proj_drop", "dropout_layer")):
        return False
    frames = getattr(module, "num_frames", None)
    if isinstance(frames, bool) or not isinstance(frames, int):
        return False
    return name == SPATIAL or isinstance(getattr(module, "temporal_fc", None), nn.Module)


# ------------------------------------------------------------------------ call checks
def _per_token_norm(norm: nn.Module, channels: int) -> bool:
    if isinstance(norm, nn.Identity):
        return True
    per_token = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    return isinstance(norm, per_token) and tuple(norm.normalized_shape) == (channels,)


def _plain_dropout(module: nn.Module) -> bool:
    """nn.Dropout (or a subclass such as mmcv's Dropout) that keeps nn.Dropout's forward."""
    return isinstance(module, nn.Dropout) and type(module).forward is nn.Dropout.forward


def _mmcv_drop_path(module: nn.Module) -> bool:
    """mmcv's DropPath: x.div(keep) * floor(keep + rand((batch, 1, 1))) in training."""
    cls = type(module)
    return (cls.__name__ == "DropPath" and cls.__module__.startswith("mmcv.")
            and isinstance(getattr(module, "drop_prob", None), (int, float)))


def _unsupported(module: nn.Module, query, residual) -> Optional[tuple]:
    """None when the fused path reproduces this call; else (warning key or None, message).
    A None key means the original raises or decides the call itself: fall back silently."""
    if residual is not None or not isinstance(query, Tensor) or query.dim() != 3:
        return None, ""
    t = module.num_frames
    patches = query.shape[1] - 1
    if t < 1 or patches < t or patches % t or query.shape[0] == 0:
        return None, ""
    attn = module.attn
    name = _kind(module)
    if attn.embed_dim != query.shape[-1]:
        return None, ""
    if attn.batch_first or not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return (f"mmaction.mha_options.{name}",
                f"timesformer_kernels: {name} with nn.MultiheadAttention options outside the packed qkv "
                "layout (batch_first, add_bias_kv, add_zero_attn, kdim/vdim): running the original forward")
    if attn.dropout > 0 and attn.training:
        return (f"mmaction.attn_drop.{name}",
                f"timesformer_kernels: {name} with attention dropout (attn_drop={attn.dropout}) in training: "
                "the fused kernels do not drop attention probabilities, running the original forward")
    if not _per_token_norm(module.norm, query.shape[-1]):
        return (f"mmaction.norm.{name}",
                f"timesformer_kernels: {name} with norm {type(module.norm).__name__} (not a per-token "
                "LayerNorm/RMSNorm): running the original forward")
    if name == SPATIAL:
        ok = all(isinstance(m, nn.Identity) or _plain_dropout(m) or (m is module.dropout_layer and _mmcv_drop_path(m))
                 for m in (module.proj_drop, module.dropout_layer))
        if not ok:
            return (f"mmaction.dropout_layer.{name}",
                    f"timesformer_kernels: {name} with dropout layers {type(module.proj_drop).__name__}/"
                    f"{type(module.dropout_layer).__name__} (supported: Identity, nn.Dropout, mmcv DropPath): "
                    "running the original forward")
    return None


def _qkv(module: nn.Module, query: Tensor) -> Tensor:
    """The packed in-projection of norm(query): (B, L, 3m), last dim laid out (3, H, Dh)."""
    return F.linear(module.norm(query), module.attn.in_proj_weight, module.attn.in_proj_bias)


def _out_proj(attn: nn.MultiheadAttention, x: Tensor) -> Tensor:
    return F.linear(x, attn.out_proj.weight, attn.out_proj.bias)


# ------------------------------------------------------------------------ temporal
def _temporal_fused(self: nn.Module, query: Tensor, backend: str) -> Tensor:
    b, length, m = query.shape
    t = self.num_frames
    p = (length - 1) // t
    attn = self.attn
    qkv = _qkv(self, query)  # norm and projection are per token: once over the whole sequence
    out = temporal_attention(qkv[:, 1:], t, attn.num_heads, token_order="space_major", backend=backend)
    # (B, N·T, m) space-major is the original's (B·N, T, m) contiguous: same dropout draws.
    res = _out_proj(attn, out).reshape(b * p, t, m).contiguous()
    res = self.temporal_fc(self.dropout_layer(self.proj_drop(res))).reshape(b, p * t, m)
    return torch.cat((query[:, :1], query[:, 1:] + res), 1)


# ------------------------------------------------------------------------- spatial
def _elementwise_mask(drop: nn.Module, shape: tuple, like: Tensor) -> Optional[Tensor]:
    """The scaled keep mask nn.Dropout ``drop`` would apply to a contiguous tensor of ``shape``
    (same random draws), or None when it does nothing."""
    if isinstance(drop, nn.Identity) or not drop.training or drop.p == 0:
        return None
    return F.dropout(like.new_ones(shape), drop.p, True)


def _apply_frame_mask(res: Tensor, cls_res: Tensor, mask: Tensor, b: int, p: int, t: int, m: int):
    """Apply an original-layout (B·T, 1+N, m) mask to the patch rows (B, N·T, m) and cls rows (B, T, m)."""
    mask = mask.view(b, t, 1 + p, m)
    cls_res = cls_res * mask[:, :, 0]
    res = (res.view(b, p, t, m) * mask[:, :, 1:].transpose(1, 2)).view(b, p * t, m)
    return res, cls_res


def _spatial_dropouts(self: nn.Module, res: Tensor, cls_res: Tensor, b: int, p: int, t: int, m: int):
    """proj_drop then dropout_layer, drawn as the original draws them on (B·T, 1+N, m)."""
    mask = _elementwise_mask(self.proj_drop, (b * t, 1 + p, m), res)
    if mask is not None:
        res, cls_res = _apply_frame_mask(res, cls_res, mask, b, p, t, m)
    layer = self.dropout_layer
    if _mmcv_drop_path(layer):
        if layer.training and layer.drop_prob != 0:
            keep = 1 - layer.drop_prob
            keep_mask = (keep + torch.rand((b * t, 1, 1), dtype=res.dtype, device=res.device)).floor()
            cls_res = cls_res.div(keep) * keep_mask.view(b, t, 1)
            res = (res.div(keep).view(b, p, t, m) * keep_mask.view(b, 1, t, 1)).view(b, p * t, m)
    else:
        mask = _elementwise_mask(layer, (b * t, 1 + p, m), res)
        if mask is not None:
            res, cls_res = _apply_frame_mask(res, cls_res, mask, b, p, t, m)
    return res, cls_res


def _spatial_fused(self: nn.Module, query: Tensor, backend: str) -> Tensor:
    b, length, m = query.shape
    t = self.num_frames
    p = (length - 1) // t
    attn = self.attn
    out, cls_out = spatial_attention(_qkv(self, query), t, attn.num_heads, token_order="space_major",
                                     backend=backend)
    res, cls_res = _spatial_dropouts(self, _out_proj(attn, out), _out_proj(attn, cls_out), b, p, t, m)
    return query + torch.cat((torch.mean(cls_res, 1, True), res), 1)


# ------------------------------------------------------------------------- forward
def unsupported(module: nn.Module):
    """An attention that is not nn.MultiheadAttention's own maths (the fused path reads its
    projections as weights: a peft/LoRA wrapper, a subclass), or hooks on the submodules the
    fused path does not call: the attention and, in the spatial module, the dropouts whose
    masks it draws itself."""
    attn = module.attn
    if not isinstance(attn, nn.MultiheadAttention) or type(attn).forward is not nn.MultiheadAttention.forward:
        return (f"mmaction.attn.{type(attn).__name__}",
                f"timesformer_kernels: {type(module).__name__} with attention {type(attn).__name__} (fused: "
                "nn.MultiheadAttention, whose projections it reads; peft/LoRA wrappers are not): running the original "
                "forward")
    bypassed = [("attn", module.attn), ("attn.out_proj", module.attn.out_proj)]
    if _kind(module) == SPATIAL:
        bypassed += [("proj_drop", module.proj_drop), ("dropout_layer", module.dropout_layer)]
    return hooks_reason(KIND, bypassed)


def forward(fused, args: tuple, kwargs: dict):
    # key, value and the keyword arguments (query_pos, attn_mask, ...) are ignored by the
    # original too: it always attends query to itself.
    module = fused.module
    arguments = bind_arguments(signature_of(type(module).forward), module, args, kwargs)
    if arguments is None:
        return fused.original()(*args, **kwargs)  # raises the original's own error
    query, residual = arguments.get("query"), arguments.get("residual")
    reason = _unsupported(module, query, residual)
    if reason is not None:
        return fused.run_original(*reason, args, kwargs)
    if fused.runs_original_on_cpu(query):
        return fused.original()(*args, **kwargs)
    fused_fn = _temporal_fused if _kind(module) == TEMPORAL else _spatial_fused
    return fused_fn(module, query, fused.backend)
