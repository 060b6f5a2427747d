"""Public ops: validation, backend choice, torch.library custom ops and their autograd.

The compiled backends ("triton", "cuda") run inside four custom ops in the
``timesformer_kernels`` namespace, so torch.compile traces them as opaque nodes with fake
implementations::

    temporal_attention(qkv, num_frames, num_heads, scale, token_order, with_cls, backend) -> (out, lse)
    temporal_attention_backward(dout, qkv, out, lse, ...same...) -> dqkv
    spatial_attention(qkv, num_frames, num_heads, scale, token_order, backend) -> (out, cls_out, lse, cls_lse)
    spatial_attention_backward(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, ...same...) -> dqkv

The backward writes dq, dk, dv into one gradient in qkv's layout. The "torch" backend is
plain PyTorch (``reference.py``) and is differentiated by autograd directly.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import backends, reference
from .layout import Groups, spatial_groups, stats_dtype, temporal_groups
from .validation import check_spatial, check_temporal


def _kernels(backend: str):
    """The module implementing ``attention_fwd``/``attention_bwd`` for a compiled backend."""
    if backend == "triton":
        from . import triton as kernels
    else:
        from . import cuda as kernels
    return kernels


def _temporal(qkv: Tensor, num_frames: int, num_heads: int, token_order: str, with_cls: bool) -> Groups:
    b, length, c = qkv.shape
    return temporal_groups(b, length, num_frames, num_heads, c // (3 * num_heads), token_order, with_cls)


def _spatial(qkv: Tensor, num_frames: int, num_heads: int, token_order: str) -> Groups:
    b, length, c = qkv.shape
    return spatial_groups(b, length, num_frames, num_heads, c // (3 * num_heads), token_order)


def _autocast(qkv: Tensor) -> Tensor:
    """Inside an autocast region the ops run in its dtype (softmax stays fp32), like SDPA."""
    kind = qkv.device.type
    if (kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind) and qkv.is_floating_point()
            and qkv.dtype != torch.float64):  # float64 is not autocast-eligible, as in torch
        return qkv.to(torch.get_autocast_dtype(kind))
    return qkv


# ---------------------------------------------------------------- temporal custom ops
@torch.library.custom_op("timesformer_kernels::temporal_attention", mutates_args=())
def _temporal_op(qkv: Tensor, num_frames: int, num_heads: int, scale: float, token_order: str,
                 with_cls: bool, backend: str) -> tuple[Tensor, Tensor]:
    groups = _temporal(qkv, num_frames, num_heads, token_order, with_cls)
    out, _, lse, _ = _kernels(backend).attention_fwd(qkv, groups, scale)
    return out, lse


@_temporal_op.register_fake
def _(qkv, num_frames, num_heads, scale, token_order, with_cls, backend):
    b, length, c = qkv.shape
    patches = length - int(with_cls)
    return qkv.new_empty(b, patches, c // 3), qkv.new_empty(b, patches, num_heads, dtype=stats_dtype(qkv.dtype))


@torch.library.custom_op("timesformer_kernels::temporal_attention_backward", mutates_args=())
def _temporal_bwd_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_frames: int, num_heads: int,
                     scale: float, token_order: str, with_cls: bool, backend: str) -> Tensor:
    groups = _temporal(qkv, num_frames, num_heads, token_order, with_cls)
    return _kernels(backend).attention_bwd(dout, None, qkv, out, None, lse, None, groups, scale)


@_temporal_bwd_op.register_fake
def _(dout, qkv, out, lse, num_frames, num_heads, scale, token_order, with_cls, backend):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _temporal_setup(ctx, inputs, output):
    qkv, num_frames, num_heads, scale, token_order, with_cls, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.args = (num_frames, num_heads, scale, token_order, with_cls, backend)
    ctx.mark_non_differentiable(lse)


def _reference_grad(qkv: Tensor, groups: Groups, scale: float, douts: tuple) -> Tensor:
    """dqkv by autograd through the torch backend (recomputed): the backward of last resort when
    a compiled backward runs out of resources at launch (``_or_reference``)."""
    with torch.enable_grad():
        x = qkv.detach().requires_grad_()
        outs = [o for o in reference.attention(x, groups, scale) if o is not None]
        pairs = [(o, d) for o, d in zip(outs, douts) if d is not None]
        return torch.autograd.grad([o for o, _ in pairs], x, [d for _, d in pairs])[0]


def _or_reference(run, backend: str, qkv: Tensor, groups_of, scale: float, douts: tuple) -> Tensor:
    """``run()``, the compiled backward; if it runs out of resources at launch (its fit was
    predicted, and the forward ran), the torch backend's gradient instead, with a warning. The
    failure is noted, so that ``auto`` passes that backend over for such calls from then on.
    ``groups_of()`` gives the call's groups, built only then."""
    try:
        return run()
    except backends.DoesNotFit as e:
        groups = groups_of()
        backends.note_failure(backend, qkv, groups, e)
        warnings.warn(f"timesformer_kernels: {e}; this gradient was computed by the torch backend instead")
        return _reference_grad(qkv, groups, scale, douts)


def _temporal_backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    num_frames, num_heads, scale, token_order, with_cls, backend = ctx.args
    dqkv = _or_reference(lambda: _temporal_bwd_op(dout, qkv, out, lse, *ctx.args), backend, qkv,
                         lambda: _temporal(qkv, num_frames, num_heads, token_order, with_cls), scale, (dout,))
    return dqkv, None, None, None, None, None, None


_temporal_op.register_autograd(_temporal_backward, setup_context=_temporal_setup)


# ----------------------------------------------------------------- spatial custom ops
@torch.library.custom_op("timesformer_kernels::spatial_attention", mutates_args=())
def _spatial_op(qkv: Tensor, num_frames: int, num_heads: int, scale: float, token_order: str,
                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    groups = _spatial(qkv, num_frames, num_heads, token_order)
    return _kernels(backend).attention_fwd(qkv, groups, scale)


@_spatial_op.register_fake
def _(qkv, num_frames, num_heads, scale, token_order, backend):
    b, length, c = qkv.shape
    stats = stats_dtype(qkv.dtype)
    return (qkv.new_empty(b, length - 1, c // 3), qkv.new_empty(b, num_frames, c // 3),
            qkv.new_empty(b, length - 1, num_heads, dtype=stats), qkv.new_empty(b, num_frames, num_heads, dtype=stats))


@torch.library.custom_op("timesformer_kernels::spatial_attention_backward", mutates_args=())
def _spatial_bwd_op(dout: Tensor, dcls_out: Tensor, qkv: Tensor, out: Tensor, cls_out: Tensor, lse: Tensor,
                    cls_lse: Tensor, num_frames: int, num_heads: int, scale: float, token_order: str,
                    backend: str) -> Tensor:
    groups = _spatial(qkv, num_frames, num_heads, token_order)
    return _kernels(backend).attention_bwd(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, groups, scale)


@_spatial_bwd_op.register_fake
def _(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, num_frames, num_heads, scale, token_order, backend):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _spatial_setup(ctx, inputs, output):
    qkv, num_frames, num_heads, scale, token_order, backend = inputs
    out, cls_out, lse, cls_lse = output
    ctx.save_for_backward(qkv, out, cls_out, lse, cls_lse)
    ctx.args = (num_frames, num_heads, scale, token_order, backend)
    ctx.mark_non_differentiable(lse, cls_lse)


def _spatial_backward(ctx, dout, dcls_out, _dlse, _dcls_lse):
    qkv, out, cls_out, lse, cls_lse = ctx.saved_tensors
    # An unused output's gradient arrives as None (eager) or zeros (compiled): the kernels take zeros.
    if dout is None:
        dout = torch.zeros_like(out)
    if dcls_out is None:
        dcls_out = torch.zeros_like(cls_out)
    num_frames, num_heads, scale, token_order, backend = ctx.args
    dqkv = _or_reference(lambda: _spatial_bwd_op(dout, dcls_out, qkv, out, cls_out, lse, cls_lse, *ctx.args), backend,
                         qkv, lambda: _spatial(qkv, num_frames, num_heads, token_order), scale, (dout, dcls_out))
    return dqkv, None, None, None, None, None


_spatial_op.register_autograd(_spatial_backward, setup_context=_spatial_setup)


# ------------------------------------------------------------------------ public API
def _dispatch(backend: str, qkv: Tensor, groups: Groups, run_torch, run_compiled):
    """Runs the call on the backend ``backend`` resolves to. A compiled backend whose launch
    runs out of resources (its fit was predicted) raises DoesNotFit, a ValueError naming the
    device, dtype, head dim and what does not fit; under ``auto`` the failure is noted and the
    call goes to the next backend (whose why_not now names it)."""
    name = backends.choose(backend, qkv, groups)
    if name == "torch":
        return run_torch()
    try:
        return run_compiled(name)
    except backends.DoesNotFit as e:
        if backend != "auto":
            raise
        backends.note_failure(name, qkv, groups, e)
        return _dispatch(backend, qkv, groups, run_torch, run_compiled)


def temporal_attention(qkv: Tensor, num_frames: int, num_heads: int, *, scale: Optional[float] = None,
                       token_order: str = "space_major", with_cls: bool = False,
                       backend: str = "auto") -> Tensor:
    """Attention of every patch over its T frames, read in place from the qkv projection.

    qkv: (B, L, 3·H·Dh), last dim laid out (3, H, Dh), any strides on the first two dims.
    L = N·T, or 1 + N·T with ``with_cls`` (cls at row 0 joins each group as a key/value, the
    lucidrains variant). Returns the patch outputs (B, N·T, H·Dh) in the input's token order.
    """
    groups, scale = check_temporal(qkv, num_frames, num_heads, scale, token_order, with_cls, backend)
    qkv = _autocast(qkv)
    return _dispatch(backend, qkv, groups, lambda: reference.attention(qkv, groups, scale)[0],
                     lambda name: _temporal_op(qkv, num_frames, num_heads, scale, token_order, with_cls, name)[0])


def spatial_attention(qkv: Tensor, num_frames: int, num_heads: int, *, scale: Optional[float] = None,
                      token_order: str = "space_major", backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Attention within each frame over [cls, its N patches], read in place from qkv.

    qkv: (B, 1 + N·T, 3·H·Dh) with cls at row 0. Returns ``out`` (B, N·T, H·Dh), the patch
    outputs in the input's token order, and ``cls_out`` (B, T, H·Dh), the cls query's output
    in each frame group (the official model averages it over frames after its projection).
    """
    groups, scale = check_spatial(qkv, num_frames, num_heads, scale, token_order, backend)
    qkv = _autocast(qkv)
    return _dispatch(backend, qkv, groups, lambda: reference.attention(qkv, groups, scale),
                     lambda name: _spatial_op(qkv, num_frames, num_heads, scale, token_order, name)[:2])
