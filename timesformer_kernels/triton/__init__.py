"""Triton kernels of grouped attention over TimeSformer's qkv (see ``layout``).

``temporal.py`` packs many short groups (temporal attention, S <= 128, or <= 32 at head
dims above 128) into one program;
``spatial.py`` is a flash-style kernel for groups of any length with the cls query and key
(spatial attention, and temporal attention with T > 128). Both read qkv in place and write
dq/dk/dv into one gradient in qkv's layout.

Alignment: a launch specialises every pointer with ``data_ptr() % 16 == 0`` and every integer
argument divisible by 16 (strides included) as 16-divisible, which lets the compiler use
16-byte vector loads. A qkv Linear's output always qualifies (rows of 3·H·Dh elements, Dh a
multiple of 8). A view that does not (a storage offset or row stride that is not a multiple
of 16 bytes) still gives correct results, through a separately compiled variant with narrower
loads and more registers (ptxas: the temporal forward at Dh 64 goes from 96 to 255).
"""
from __future__ import annotations

import contextlib

import torch
from triton.runtime.errors import OutOfResources

from .. import devices
from ..backends import DoesNotFit
from ..layout import Groups
from . import spatial, target, temporal, tuning


def _on_device(qkv: torch.Tensor):
    """Triton launches on the current CUDA device: make it qkv's (a no-op on CPU)."""
    return torch.cuda.device(qkv.device) if qkv.is_cuda else contextlib.nullcontext()


def _short(groups: Groups, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether temporal.py takes the call (short groups without a cls query), else spatial.py."""
    return not groups.cls_query and groups.seq_len <= temporal.max_seq(groups.head_dim, dtype, device)


@contextlib.contextmanager
def _launching(qkv: torch.Tensor, groups: Groups):
    """On qkv's device; a launch that runs out of resources (shared memory, tensor memory or
    threads, Triton checks them as it loads a kernel) raises DoesNotFit, naming the call."""
    with _on_device(qkv):
        try:
            yield
        except OutOfResources as e:
            raise DoesNotFit(f"triton: a kernel for {qkv.dtype} head_dim {groups.head_dim} does not fit "
                             f"{target.current(qkv.device).label}: {e}") from e


def attention_fwd(qkv: torch.Tensor, groups: Groups, scale: float):
    """Returns (out (B,N·T,D), cls_out (B,G,D) or None, lse (B,N·T,H) fp32, cls_lse (B,G,H) or None)."""
    with _launching(qkv, groups):
        if _short(groups, qkv.dtype, qkv.device):
            out, lse = temporal.temporal_fwd(qkv, groups, scale)
            return out, None, lse, None
        return spatial.spatial_fwd(qkv, groups, scale)


def attention_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, groups: Groups, scale: float):
    """Returns dqkv, contiguous, shape and dtype of qkv."""
    with _launching(qkv, groups):
        if _short(groups, qkv.dtype, qkv.device):
            return temporal.temporal_bwd(dout, qkv, lse, groups, scale)
        return spatial.spatial_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, groups, scale)


def plan(groups: Groups, dtype: torch.dtype, device: torch.device, backward: bool = True) -> list[tuple[str, list]]:
    """Every kernel a call launches, forward (and backward), with the autotune configs its
    pruning keeps on the call's target (``target.current``); raises DoesNotFit when a kernel
    keeps none. Nothing is allocated or launched."""
    return (temporal.plan if _short(groups, dtype, device) else spatial.plan)(groups, dtype, device, backward)


ROCM = tuning.ROCM  # why ``auto`` (and backend="triton") does not take these kernels on ROCm


def why_not(qkv: torch.Tensor, groups: Groups) -> list[str]:
    """Why this call cannot run on its GPU: a kernel it launches (the backward's too when qkv
    will need a gradient) with no autotune config that fits the GPU. Empty under the
    interpreter (one small config, no device limits) unless ``target.compiling_for`` names a
    target; float64 runs only there."""
    if not (qkv.is_cuda or target.forced()) or qkv.dtype == torch.float64:
        return []
    return list(_why_not(str(qkv.device), qkv.dtype, torch.is_grad_enabled() and qkv.requires_grad, _fields(groups)))


def _fields(groups: Groups) -> tuple:
    return (groups.batch, groups.num_groups, groups.seq_len, groups.group_stride, groups.pos_stride, groups.base,
            groups.cls_key, groups.cls_query, groups.num_heads, groups.head_dim)


_fits: dict[tuple, tuple[str, ...]] = {}


@torch.compiler.assume_constant_result  # torch.compile runs it while tracing, like any Python check
def _why_not(device: str, dtype: torch.dtype, backward: bool, fields: tuple) -> tuple[str, ...]:
    """why_not, once per target and kind of call (the batch and group count do not matter)."""
    groups = Groups(*fields)
    tgt = target.current(torch.device(device))
    key = (tgt.key, backward, dtype, devices.float32_matmul_precision(), *fields[2:])
    if key not in _fits:
        try:
            plan(groups, dtype, torch.device(device), backward)
            _fits[key] = ()
        except DoesNotFit as e:
            _fits[key] = (str(e),)
    return _fits[key]
