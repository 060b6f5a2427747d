"""Shared pieces of the swap-ins: the patched forward (``FusedForward``), the checks every
family makes at each call, fallback warnings, and the fused space-major divided block the
Hugging Face and official swap-ins both run."""
from __future__ import annotations

import inspect
import types
import warnings
from typing import Iterable, Optional

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from ..modules import mlp_residual, spatial_residual, temporal_residual

# integrations/__init__ registers each family module (huggingface.py, ...) here by its KIND;
# FusedForward finds its family by name, so that its own state is plain data (picklable).
FAMILIES: dict = {}
_warned: set = set()
_signatures: dict = {}
_forward_classes: dict = {}
_named_classes: dict = {}


class FusedForward:
    """A patched module's ``forward``: its family's fused code, decided at every call.

    The state is plain data: the module it belongs to, the family's KIND, the backend, the
    instance ``forward`` it replaced (None: the class's), ``active`` (False after
    ``tk.unpatch`` when someone else's wrapper still holds it: it then runs the original) and
    ``split`` (the ``parallel.FrameSplit`` tk.context_parallel sets: the module then holds this
    rank's frames of every clip). So a patched model deep-copies, pickles, and crosses process
    spawn like any module tree, the copy's forward bound to the copy.

    Each call checks that the module still holds what the fused code reads (``matches``, the
    family's ``unsupported``, no foreign forward underneath, no global module hooks), else
    runs the module's current original code, warning once per reason; then the family's
    ``forward`` checks the call's arguments.
    """

    def __init__(self, module: nn.Module, family: str, backend: str, replaced=None):
        self.module, self.family, self.backend, self.replaced = module, family, backend, replaced
        self.active, self.split = True, None

    def original(self):
        """The module's original forward, bound: the one ``patch`` replaced, else the class's."""
        if self.replaced is not None:
            return self.replaced
        return types.MethodType(type(self.module).forward, self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        # What inspect.signature(module.forward) gave before patching (pipelines read it).
        return inspect.signature(self.original())

    def __repr__(self) -> str:
        state = "" if self.active else ", inactive"
        return f"<timesformer_kernels fused forward of {type(self.module).__name__}: {self.family}, " \
               f"backend={self.backend!r}{state}>"

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self.original()(*args, **kwargs)
        family = FAMILIES[self.family]
        reason = self.module_reason(family)
        if reason is not None:
            return self.run_original(*reason, args, kwargs)
        return family.forward(self, args, kwargs)

    def module_reason(self, family) -> Optional[tuple]:
        """(warning key, message) when the module no longer holds what the fused code reads."""
        module, name = self.module, type(self.module).__name__
        if self.replaced is not None:
            return (f"{family.KIND}:replaced_forward",
                    f"timesformer_kernels: {name}'s forward had been replaced before tk.patch (accelerate or "
                    "diffusers hooks, or by hand): running that forward, unfused (patch before adding such hooks)")
        if not family.matches(module):
            return (f"{family.KIND}:structure:{name}",
                    f"timesformer_kernels: {name} no longer has the structure tk.patch fused (a submodule or "
                    "attribute was replaced after patching): running the original code")
        if global_hooks():
            return (f"{family.KIND}:global_hooks",
                    "timesformer_kernels: global module hooks are registered (register_module_forward_hook...), "
                    "which the fused path would skip for the submodules it does not call: running the original code")
        return family.unsupported(module)

    def run_original(self, key: Optional[str], message: str, args: tuple, kwargs: dict):
        """Run the original forward for a call the fused path cannot reproduce, warning once per
        ``key``; a ``key`` of None is a silent fallback (the original raises its own error).
        Under tk.context_parallel a ValueError instead: the original code would see this rank's
        frames as the whole clip."""
        if self.split is not None:
            raise ValueError(f"{type(self.module).__name__} under tk.context_parallel: this call cannot run fused, "
                             "and the original code cannot run on a split of the frames (the fallback's reason: "
                             f"{message or 'arguments or shapes the fused path does not take'})")
        if key is not None:
            warn_once(key, message)
        return self.original()(*args, **kwargs)

    def runs_original_on_cpu(self, x) -> bool:
        """backend "auto" on a CPU tensor where the original code measured as fast or faster
        (README, "On the CPU"): always (``CPU_AUTO = "original"``), or while autograd records
        (``"fused_without_grad"``: the fused forward is faster, its backward is not). Never under
        tk.context_parallel, where only the fused code handles a split of the frames."""
        if self.backend != "auto" or self.split is not None or not isinstance(x, torch.Tensor):
            return False
        return x.device.type == "cpu" and (FAMILIES[self.family].CPU_AUTO == "original" or torch.is_grad_enabled())

    def local_frames(self, frames: int) -> int:
        """The frames of a clip this rank holds: ``frames``, or its share under tk.context_parallel."""
        return frames if self.split is None else self.split.local_frames(frames)


def fused_forward_of(module: nn.Module) -> Optional[FusedForward]:
    """The FusedForward of ``module``: its instance forward, or one wrapped inside it by hooks
    added after patching (accelerate and diffusers wrap with functools.update_wrapper)."""
    forward = module.__dict__.get("forward")
    while forward is not None and not isinstance(forward, FusedForward):
        forward = getattr(forward, "__wrapped__", None)
    return forward if forward is not None and forward.module is module else None


def warn_once(key: str, message: str) -> None:
    """Warn about a fallback to the original code once per process and reason."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def hooked(module: nn.Module) -> bool:
    """Hooks or a replaced forward (accelerate, diffusers' hook registry) on ``module``, which a
    fused path that does not call ``module`` would skip."""
    return bool("forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Module hooks registered for every module (torch.nn.modules.module.register_module_*)."""
    return bool(_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks)


def hooks_reason(kind: str, modules: Iterable[tuple[str, nn.Module]]) -> Optional[tuple]:
    """A warned fallback when one of ``modules`` ((name, module) the fused path does not call)
    carries hooks; else None."""
    for name, module in modules:
        if hooked(module):
            return (f"{kind}:hooks:{name}",
                    f"timesformer_kernels: {kind} module with hooks (or a replaced forward) on {name} "
                    f"({type(module).__name__}), which the fused path does not call: running the original code")
    return None


def signature_of(function) -> Optional[inspect.Signature]:
    """inspect.signature of a class's forward (follows functools.wraps), or None; cached, since
    it is read at every call (a plain dict: torch.compile traces it, unlike functools.lru_cache)."""
    if function not in _signatures:
        try:
            _signatures[function] = inspect.signature(function)
        except (TypeError, ValueError):
            _signatures[function] = None
    return _signatures[function]


def forward_class(module: nn.Module) -> Optional[str]:
    """Name of the class whose ``forward`` the module runs (its own or inherited), cached per class."""
    cls = type(module)
    if cls not in _forward_classes:
        _forward_classes[cls] = next((c.__name__ for c in cls.__mro__ if "forward" in c.__dict__), None)
    return _forward_classes[cls]


def class_named(module: nn.Module, names: tuple) -> Optional[type]:
    """The first class in module's MRO whose name is one of ``names`` (wrappers such as FSDP2's
    subclass the module's class), cached per class: torch.compile traces a dict lookup, not
    the walk over the MRO."""
    key = (type(module), names)
    if key not in _named_classes:
        _named_classes[key] = next((c for c in type(module).__mro__ if c.__name__ in names), None)
    return _named_classes[key]


def has_attributes(module, names) -> bool:
    """Every name is an attribute or a child module of ``module`` (without nn.Module.__getattr__,
    which a check made at every call cannot afford)."""
    own, children = module.__dict__, module.__dict__.get("_modules", {})
    return all(n in own or n in children for n in names)


def bind_arguments(signature, module: nn.Module, args: tuple, kwargs: dict):
    """The call's arguments bound to the replaced forward's ``signature``, defaults applied, or
    None when they do not bind (the caller runs the original forward, which raises its own error)."""
    try:
        bound = signature.bind(module, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


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
