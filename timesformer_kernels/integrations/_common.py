"""Shared pieces of the swap-ins: where the replaced forward is kept, fallback warnings, and the
fused space-major divided block the Hugging Face and official swap-ins both run."""
from __future__ import annotations

import types
import warnings
from typing import Optional

import torch
from torch import nn

from ..modules import mlp_residual, spatial_residual, temporal_residual

ORIGINAL_ATTR = "_tk_original_forward"  # instance attribute holding the replaced forward (or NO_FORWARD)
SPLIT_ATTR = "_tk_frame_split"  # instance attribute: the FrameSplit of a layer under tk.context_parallel
NO_FORWARD = object()  # the instance had no forward of its own (the class's was used)
_warned: set = set()


def warn_once(key: str, message: str) -> None:
    """Warn about a fallback to the original code once per process and reason."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def run_original(module: nn.Module, key: Optional[str], message: str, args: tuple, kwargs: dict):
    """Run the replaced forward for a call the fused path cannot reproduce, warning once per
    ``key``; a ``key`` of None is a silent fallback (the original raises its own error)."""
    if frame_split(module) is not None:  # the original code would run on this rank's frames only
        raise ValueError(f"{type(module).__name__} under tk.context_parallel: {message or 'this call'} cannot run "
                         "fused, and the original code cannot run on a split of the frames")
    if key is not None:
        warn_once(key, message)
    return original_forward(module)(*args, **kwargs)


def frame_split(module: nn.Module):
    """The ``parallel.FrameSplit`` a fused forward runs with under tk.context_parallel, else None."""
    return module.__dict__.get(SPLIT_ATTR)


def local_frames(module: nn.Module, frames: int) -> int:
    """The frames of a clip this rank holds: ``frames``, or its share under tk.context_parallel."""
    split = frame_split(module)
    return frames if split is None else split.local_frames(frames)


def bind_arguments(signature, module: nn.Module, args: tuple, kwargs: dict):
    """The call's arguments bound to the replaced forward's ``signature``, defaults applied, or
    None when they do not bind (the caller runs the original forward, which raises its own error)."""
    try:
        bound = signature.bind(module, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


def original_forward(module: nn.Module):
    """The forward that ``patch`` replaced (bound), for fallbacks of calls the fused path can't do."""
    saved = module.__dict__[ORIGINAL_ATTR]
    return saved if saved is not NO_FORWARD else types.MethodType(type(module).forward, module)


def drop_path_prob(module: nn.Module) -> Optional[float]:
    """The drop probability of a drop-path module when the fused path can reproduce it (0 when
    it is inactive), else None: nn.Identity, or a per-sample DropPath with ``drop_prob``."""
    if isinstance(module, nn.Identity):
        return 0.0
    if not hasattr(module, "drop_prob"):
        return None
    prob = module.drop_prob
    if prob is None:  # old timm's DropPath(): identity in eval, an error in training
        return None if module.training else 0.0
    if isinstance(prob, bool) or not isinstance(prob, (int, float)):
        return None
    if not module.training or prob == 0.0:
        return 0.0
    if not getattr(module, "scale_by_keep", True):  # timm's scale_by_keep=False: no 1/keep
        return None
    return float(prob)


def active_dropout(*modules: nn.Module) -> bool:
    """True when any dropout inside ``modules`` would zero something in this call."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
               for module in modules for m in module.modules())


def divided_block(x: torch.Tensor, num_frames: int, temporal: tuple, spatial: tuple, mlp: tuple,
                  backend: str, split=None) -> torch.Tensor:
    """The fused divided space-time block on x (B, 1 + N·T, D), space-major.

    temporal = (norm, qkv, proj, fc, num_heads, scale, drop_prob), spatial = (norm, qkv, proj,
    num_heads, scale, drop_prob), mlp = (norm, mlp callable, drop_path module, drop_prob); a
    scale of None means head_dim**-0.5. ``split``: the ``parallel.FrameSplit`` of a
    context-parallel model, x then holding this rank's ``num_frames`` frames.
    """
    norm, qkv, proj, fc, heads, scale, prob = temporal
    xt = temporal_residual(x, num_frames, heads, norm, qkv, proj, fc, prob, prob > 0,
                           token_order="space_major", backend=backend, scale=scale, split=split)
    norm, qkv, proj, heads, scale, prob = spatial
    x = spatial_residual(torch.cat([x[:, :1], xt], dim=1), num_frames, heads, norm, qkv, proj, prob, prob > 0,
                         token_order="space_major", backend=backend, scale=scale, split=split)
    norm, mlp_fn, drop_path, prob = mlp
    return mlp_residual(x, norm, mlp_fn, prob, drop_path.training)
