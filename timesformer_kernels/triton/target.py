"""The device-table entry (``devices.Target``) a launch compiles, prunes and picks kernels for.

A launch uses its tensor's device (``devices.of``). ``compiling_for`` names another target for
the block, whatever device is present: benchmarks/static compiles every target on a machine
without a GPU, and the CPU tests run the kernel choices of each target under the interpreter.
CPU tensors (Triton's interpreter) count as sm_90 unless ``compiling_for`` says otherwise.

The kernels receive ``Target.key`` as the constexpr ``TARGET``: their autotune key includes it
(a config tuned on one kind of GPU is never reused on another), and their config pruning looks
the entry up again with ``by_key``.
"""
from __future__ import annotations

import contextlib

import torch

from .. import devices
from ..devices import TARGETS, Target

INTERPRETER = TARGETS["sm_90"]
_forced: Target | None = None
_by_key: dict[str, Target] = {t.key: t for t in TARGETS.values()}


def lookup(target: Target | str) -> Target:
    """A table entry by name ("sm_86"), or the entry itself."""
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return TARGETS[target]


def current(device: torch.device | None = None) -> Target:
    """The entry the next launch on ``device`` is made for (see the module docstring)."""
    if _forced is not None:
        found = _forced
    elif device is None or device.type != "cuda":
        found = INTERPRETER
    else:
        found = devices.of(device)
    _by_key.setdefault(found.key, found)
    return found


def forced() -> bool:
    """Whether a ``compiling_for`` block is active."""
    return _forced is not None


def by_key(key: str) -> Target:
    """The entry a launch passed as its TARGET constexpr (every one went through ``current``)."""
    return _by_key[key]


@contextlib.contextmanager
def compiling_for(target: Target | str):
    """Launches inside the block are made for ``target`` (an entry or a name: "sm_86")."""
    global _forced
    saved, _forced = _forced, lookup(target)
    try:
        yield _forced
    finally:
        _forced = saved


def dot_precision(dtype: torch.dtype, target: Target) -> str:
    """``tl.dot``'s input_precision for float32 operands, after PyTorch's convention
    (``torch.get_float32_matmul_precision()``): "highest" keeps float32 accuracy, as three
    TF32 products on NVIDIA tensor cores ("tf32x3", about as exact as float32 FMA, which would
    spill the tiles) or float32 MFMA on AMD ("ieee": ROCm's Triton has no tf32x3); "high" and
    "medium" allow one TF32 product ("tf32"; XF32 on the MI300, float32 MFMA on other AMD
    GPUs). Other dtypes: "ieee" (16-bit operands ignore it; float64 only runs interpreted)."""
    if dtype != torch.float32:
        return "ieee"
    if devices.float32_matmul_precision() == "highest":
        return "tf32x3" if target.vendor == "cuda" else "ieee"
    return "tf32" if target.vendor == "cuda" or target.name == "gfx942" else "ieee"
