"""Swap-in for blocks with the structure of the official facebookresearch TimeSformer ``Block``.

Users vendor the official ``vit.py`` under many names, so a block is recognised by its
structure, not its class: ``attention_type == 'divided_space_time'``, the submodules
temporal_norm1, temporal_attn (qkv, proj), temporal_fc, norm1, attn (qkv, proj), norm2, mlp,
drop_path, attention modules holding no parameters besides those of qkv and proj (which the
fused path calls as modules: a peft/LoRA-wrapped qkv is fine), and a ``forward(x, B, T, W)``.
The structure is checked again at every call, with the hooks of the attention and drop-path
modules the fused path does not call.

The fused forward computes, with x of shape (B, 1 + N·T, D), patches space-major::

    xt = x[:, 1:] + temporal_fc(drop_path(temporal_attn(temporal_norm1(.))))   per (clip, patch)
    x  = [x_cls, xt] + [mean_t cls_t, patches]  of drop_path(attn(norm1(.)))    per (clip, frame)
    x  = x + drop_path(mlp(norm2(x)))                                          per clip

reading each attention's ``num_heads`` and ``scale`` (qk_scale) at call time. Drop-path masks
are drawn with ``torch.rand`` in the same shapes and order as the official code (and timm
< 0.6, Hugging Face), so under the same seed the outputs are the same; a timm >= 0.6
``DropPath`` draws with ``bernoulli_`` instead: same distribution, other samples.

Calls the fused path cannot reproduce run the original forward, with a warning once:
attention-probability or projection dropout active in training, an unrecognised drop-path
module, timm's ``scale_by_keep=False``, or a non-default scale while the fused building blocks
take none. Shapes the original would reject (B, T, W not matching x) run the original too,
which raises its own error.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ._common import active_dropout, bind_arguments, divided_block, drop_path_prob, hooks_reason, signature_of

KIND = "official"
CPU_AUTO = "fused_without_grad"  # backend "auto" on CPU tensors (README, "On the CPU")

_BLOCK_PARTS = ("temporal_norm1", "temporal_attn", "temporal_fc", "norm1", "attn", "norm2", "mlp", "drop_path")
_ATTN_PARTS = {"qkv", "proj"}  # called as modules: a peft/LoRA-wrapped qkv or proj is fine


# ------------------------------------------------------------------------- the swap-in
def _signature(module: nn.Module) -> Optional[inspect.Signature]:
    """The class forward's signature when it is ``forward(self, x, B, T, W)``-shaped, else None."""
    signature = signature_of(type(module).forward)
    if signature is None:
        return None
    params = list(signature.parameters.values())
    if len(params) != 5 or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return None
    return signature


def _attention_like(attn) -> bool:
    if not isinstance(attn, nn.Module):
        return False
    if not all(isinstance(getattr(attn, a, None), nn.Module) for a in ("qkv", "proj")):
        return False
    heads = getattr(attn, "num_heads", None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        return False
    # Nothing that would change the maths (q/k norms, relative positions...) may hide inside.
    return all(name.split(".", 1)[0] in _ATTN_PARTS for name, _ in attn.named_parameters())


def matches(module) -> bool:
    # Parts first: reading attention_type of a diffusers model warns (a deprecated config attribute).
    if not all(isinstance(getattr(module, a, None), nn.Module) for a in _BLOCK_PARTS):
        return False
    if getattr(module, "attention_type", None) != "divided_space_time":
        return False
    if not (_attention_like(module.temporal_attn) and _attention_like(module.attn)):
        return False
    return _signature(module) is not None


def _fallback_reason(fused, x, batch, frames, width) -> tuple[Optional[str], Optional[str]]:
    """(key, message) of a warned fallback, (None, "") for a silent one (the original raises),
    (None, None) when the fused path runs."""
    block = fused.module
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return None, ""
    try:
        batch, frames, width = int(batch), int(frames), int(width)
    except (TypeError, ValueError):
        return None, ""
    if frames < 1 or width < 1 or x.shape[0] != batch:
        return None, ""
    frames = fused.local_frames(frames)
    tokens = x.shape[1] - 1
    height = (tokens // frames) // width
    if height < 1 or height * width * frames != tokens:
        return None, ""
    if active_dropout(block.temporal_attn, block.attn):
        return ("official:dropout",
                "timesformer_kernels: official-structure Block with attention or projection dropout "
                "active in training: this call runs the original (unfused) code")
    if drop_path_prob(block.drop_path) is None:
        return ("official:drop_path",
                f"timesformer_kernels: drop-path module {type(block.drop_path).__name__} is not one the fused "
                "path reproduces (per-sample DropPath with drop_prob, scaled by 1/keep): "
                "this call runs the original (unfused) code")
    return None, None


def unsupported(block):
    """Hooks on the submodules the fused path does not call (it calls qkv, proj, norms, mlp)."""
    return hooks_reason(KIND, (("temporal_attn", block.temporal_attn), ("attn", block.attn),
                               ("drop_path", block.drop_path)))


def forward(fused, args: tuple, kwargs: dict):
    block = fused.module
    arguments = bind_arguments(_signature(block), block, args, kwargs)
    if arguments is None:
        return fused.original()(*args, **kwargs)  # raises the original's own error
    _, x, batch, frames, width = arguments.values()
    key, message = _fallback_reason(fused, x, batch, frames, width)
    if message is not None:
        return fused.run_original(key, message, args, kwargs)
    if fused.runs_original_on_cpu(x):
        return fused.original()(*args, **kwargs)
    prob = drop_path_prob(block.drop_path)
    ta, sa = block.temporal_attn, block.attn
    temporal = (block.temporal_norm1, ta.qkv, ta.proj, block.temporal_fc, ta.num_heads, ta.scale, prob)
    spatial = (block.norm1, sa.qkv, sa.proj, sa.num_heads, sa.scale, prob)
    return divided_block(x, fused.local_frames(int(frames)), temporal, spatial,
                         (block.norm2, block.mlp, block.drop_path, prob), fused.backend, fused.split)
