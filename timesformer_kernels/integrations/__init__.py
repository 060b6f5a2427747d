"""Swap the fused attention into existing TimeSformer models, in place, and undo it.

Each model family is one module here with ``KIND`` (a name for reports), ``matches(module)``
(tk.patch takes this module), ``unsupported(module)`` (a reason the fused code cannot run the
module as it is now, checked at every call), ``forward(fused, args, kwargs)`` (one call: the
fused code, or the original for arguments it cannot reproduce) and ``CPU_AUTO`` (what
backend "auto" runs on CPU tensors).
``patch`` sets a ``FusedForward`` (plain, picklable state) as the instance's ``forward`` and
keeps what it replaced, so ``unpatch`` restores it exactly; parameters and buffers are never
touched, so ``state_dict()`` is the same before and after.
"""
from __future__ import annotations

import logging
from collections import Counter

from torch import nn

from ..validation import check_backend
from . import context_parallel, diffusers, huggingface, lucidrains, mmaction, official
from ._common import FAMILIES, FusedForward, fused_forward_of

_FAMILIES = (huggingface, mmaction, official, lucidrains, diffusers)
FAMILIES.update({family.KIND: family for family in _FAMILIES})
log = logging.getLogger("timesformer_kernels")


def _patch_module(module: nn.Module, kind: str, backend: str) -> None:
    fused = fused_forward_of(module)
    if fused is not None:  # patched already (maybe inside hooks added since): a new backend, active again
        fused.backend, fused.active = backend, True
        return
    current = module.__dict__.get("forward")
    if isinstance(current, FusedForward):  # a shallow copy's: bound to another module
        current = current.replaced
    module.forward = FusedForward(module, kind, backend, current)


def patch(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace the divided space-time attention of every recognised layer in ``model`` by the
    fused ops, in place; returns ``model``. Raises ValueError if nothing is recognised.
    Patching a patched model again only changes the backend."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend(backend)
    counts: Counter = Counter()
    for module in model.modules():
        family = next((f for f in _FAMILIES if f.matches(module)), None)
        if family is None:
            continue
        _patch_module(module, family.KIND, backend)
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
    returns ``model``. A fused forward that hooks added after patching still wrap is made
    inactive (it runs the original code) and is left to them."""
    context_parallel.undo(model)
    for module in model.modules():
        fused = fused_forward_of(module)
        if fused is None:
            continue
        if module.__dict__["forward"] is not fused:
            fused.active = False
        elif fused.replaced is None:
            del module.__dict__["forward"]
        else:
            module.forward = fused.replaced
    model.__dict__.pop("_tk_patch_summary", None)
    return model


def patch_summary(model: nn.Module) -> dict:
    """{layer kind: count} replaced by the last ``patch`` of ``model`` (empty if unpatched)."""
    return dict(model.__dict__.get("_tk_patch_summary", {}))
