"""The GPU generation the autotune lists are pruned for.

Some configs are tuned for Hopper (sm_90: 64K registers per SM, wgmma) and spill on the A100
(sm_80, mma.sync); each kernel's pruning drops them below ``HOPPER``. A launch prunes for
the current CUDA device (the wrappers make it qkv's); ``compiling_for`` sets the generation
for an ahead-of-time compile on a machine without that GPU (benchmarks/static)."""
from __future__ import annotations

import contextlib

import torch

HOPPER = 9  # compute capability major of sm_90
_forced: int | None = None


def capability_major(device: torch.device | None = None) -> int:
    """Compute capability major the next launch's configs are pruned for (and its kernels
    chosen by). CPU tensors (Triton's interpreter) count as Hopper unless ``compiling_for``
    says otherwise."""
    if _forced is not None:
        return _forced
    if device is not None and device.type != "cuda":
        return HOPPER
    return torch.cuda.get_device_capability()[0]


@contextlib.contextmanager
def compiling_for(major: int):
    """Prune for compute capability ``major`` inside the block, whatever device is present."""
    global _forced
    saved, _forced = _forced, major
    try:
        yield
    finally:
        _forced = saved
