"""Swap the fused attention into existing TimeSformer models, in place, and undo it.

Each model family is one module here with ``KIND`` (a name for reports), ``matches(module)``
and ``fused_forward(module, backend)`` (the replacement forward, a plain function taking the
module's forward arguments). ``patch`` sets that function as the instance's ``forward`` and
keeps what it replaced, so ``unpatch`` restores it exactly; parameters and buffers are never
touched, so ``state_dict()`` is the same before and after.
"""
from __future__ import annotations

import logging
import types
from collections import Counter

from torch import nn

from ..validation import check_backend
from . import context_parallel, diffusers, huggingface, lucidrains, mmaction, official
from ._common import NO_FORWARD, ORIGINAL_ATTR

_FAMILIES = (huggingface, mmaction, official, lucidrains, diffusers)
log = logging.getLogger("timesformer_kernels")


def patch(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace the divided space-time attention of every recognised layer in ``model`` by the
    fused ops, in place; returns ``model``. Raises ValueError if nothing is recognised."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    counts: Counter = Counter()
    for module in model.modules():
        family = next((f for f in _FAMILIES if f.matches(module)), None)
        if family is None:
            continue
        if ORIGINAL_ATTR not in module.__dict__:
            module.__dict__[ORIGINAL_ATTR] = module.__dict__.get("forward", NO_FORWARD)
        module.forward = types.MethodType(family.fused_forward(module, backend), module)
        counts[family.KIND] += 1
    if not counts:
        raise ValueError(
            f"model: tk.patch found no divided space-time attention layer in {type(model).__name__} "
            "(supported: Hugging Face TimesformerLayer, mmaction2 Divided*AttentionWithNorm, "
            "official-structure Block, lucidrains TimeSformer Attention, diffusers AnimateDiffTransformer3D, "
            "TransformerTemporalModel, TemporalBasicTransformerBlock, LatteTransformer3DModel)")
    log.info("timesformer_kernels.patch: replaced %s (backend=%s)",
             ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())), backend)
    model.__dict__["_tk_patch_summary"] = dict(counts)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every forward that ``patch`` replaced in ``model`` (and undo ``context_parallel``);
    returns ``model``."""
    context_parallel.undo(model)
    for module in model.modules():
        saved = module.__dict__.pop(ORIGINAL_ATTR, None)
        if saved is None:
            continue
        if saved is NO_FORWARD:
            del module.__dict__["forward"]
        else:
            module.forward = saved
    model.__dict__.pop("_tk_patch_summary", None)
    return model


def patch_summary(model: nn.Module) -> dict:
    """{layer kind: count} replaced by the last ``patch`` of ``model`` (empty if unpatched)."""
    return dict(model.__dict__.get("_tk_patch_summary", {}))
