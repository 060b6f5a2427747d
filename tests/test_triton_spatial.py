"""Kernel-level tests of ``timesformer_kernels.triton.spatial`` against the einsum reference.

On CPU the kernels run in Triton's interpreter with 16-row tiles, so N = 37 (and T = 37 for
temporal groups) crosses three query and three key tiles; shapes stay small because the
interpreter is slow. bf16 (whose ``tl.dot`` the interpreter gets wrong) and real model
shapes run only on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from reference import ref_spatial_attention, ref_temporal_attention
from timesformer_kernels.layout import spatial_groups, temporal_groups
from timesformer_kernels.triton import spatial, target
from timesformer_kernels.triton.spatial import spatial_bwd, spatial_fwd, whole_group

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _make_qkv(b, length, channels, dtype, strided, seed=0):
    """Random qkv; strided: a window of a wider, longer buffer (storage offset, odd strides)."""
    gen = torch.Generator().manual_seed(seed)
    if not strided:
        return torch.randn(b, length, channels, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    buf = torch.randn(b, length + 3, channels + 24, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    return buf[:, 2:2 + length, 8:8 + channels]


def _randn_strided(shape, dtype, strided, seed):
    """Random tensor; strided: dims 0 and 1 swapped in memory (last dim stays unit stride)."""
    gen = torch.Generator().manual_seed(seed)
    if not strided:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    b, n, c = shape
    return torch.randn(n, b, c, generator=gen, dtype=torch.float64).to(DEVICE, dtype).transpose(0, 1)


def _groups(op, qkv, t, h, dh, order):
    b, length, _ = qkv.shape
    if op == "spatial":
        return spatial_groups(b, length, t, h, dh, order)
    return temporal_groups(b, length, t, h, dh, order, op == "temporal_cls")


def _reference(op, qkv, t, h, scale, order, compute_dtype):
    """(out, cls_out or None) of the independent reference."""
    if op == "spatial":
        return ref_spatial_attention(qkv, t, h, scale, order, compute_dtype=compute_dtype)
    return ref_temporal_attention(qkv, t, h, scale, order, op == "temporal_cls", compute_dtype=compute_dtype), None


def _reference_lse(qkv, groups, scale):
    """(lse (B, N·T, H), cls_lse (B, G, H) or None) gathered through ``Groups.row``."""
    b, length, _ = qkv.shape
    h, dh, g, s = groups.num_heads, groups.head_dim, groups.num_groups, groups.seq_len
    x = qkv.double().reshape(b, length, 3, h, dh)
    idx = torch.tensor([[groups.row(gi, p) for p in range(s)] for gi in range(g)], device=qkv.device)
    q, k = x[:, idx, 0], x[:, idx, 1]  # (B, G, S, H, Dh)
    cls = x[:, 0].unsqueeze(1).unsqueeze(1).expand(b, g, 1, 3, h, dh)
    if groups.cls_key:
        k = torch.cat([cls[..., 1, :, :], k], 2)
    if groups.cls_query:
        q = torch.cat([cls[..., 0, :, :], q], 2)
    lse = torch.logsumexp(torch.einsum("bgshd,bgthd->bghst", q, k) * scale, -1)
    patch_lse = torch.empty(b, groups.num_patches, h, dtype=torch.float64, device=qkv.device)
    patch_lse[:, (idx - groups.base).flatten()] = lse[..., int(groups.cls_query):].permute(0, 1, 3, 2).flatten(1, 2)
    return patch_lse, (lse[..., 0] if groups.cls_query else None)


def _check(actual, expected, lowp, tol):
    """fp32/fp64: max error <= tol. fp16/bf16 (lowp given): error at most twice that of
    torch computing the same maths in that dtype, plus tol."""
    err = (actual.double() - expected).abs().max().item()
    bound = tol if lowp is None else 2 * (lowp.double() - expected).abs().max().item() + tol
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


def _run_case(op, order, b, n, t, h, dh, dtype, scale=None, strided=False, no_dcls=False, tol=None):
    """Forward (out, cls_out, lse) and the full dqkv against the reference in float64."""
    base = 0 if op == "temporal" else 1
    qkv = _make_qkv(b, base + n * t, 3 * h * dh, dtype, strided)
    before = qkv.clone()
    groups = _groups(op, qkv, t, h, dh, order)
    scale = dh ** -0.5 if scale is None else scale
    lowp_dtype = dtype in (torch.float16, torch.bfloat16)
    tol = tol if tol is not None else {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-3)
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    out, cls_out, lse, cls_lse = spatial_fwd(qkv, groups, scale)
    assert out.shape == (b, n * t, h * dh) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, n * t, h) and lse.dtype == stat_dtype
    assert (cls_out is None) == (cls_lse is None) == (op != "spatial")

    x = qkv.detach().double().requires_grad_()
    ref_out, ref_cls = _reference(op, x, t, h, scale, order, torch.float64)
    lowp_out = lowp_cls = None
    if lowp_dtype:
        xl = qkv.detach().clone().requires_grad_()
        lowp_out, lowp_cls = _reference(op, xl, t, h, scale, order, dtype)
    _check(out, ref_out, lowp_out, tol)
    ref_lse, ref_cls_lse = _reference_lse(qkv, groups, scale)
    _check(lse, ref_lse, None, tol * 10 if lowp_dtype else tol)
    if op == "spatial":
        assert cls_out.shape == (b, t, h * dh) and cls_lse.shape == (b, t, h)
        _check(cls_out, ref_cls, lowp_cls, tol)
        _check(cls_lse, ref_cls_lse, None, tol * 10 if lowp_dtype else tol)

    dout = _randn_strided(out.shape, dtype, strided, seed=1)
    dcls = None if cls_out is None or no_dcls else _randn_strided(cls_out.shape, dtype, strided, seed=2)
    dqkv = spatial_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, scale)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype and dqkv.is_contiguous()
    outs, grads = [ref_out], [dout.double()]
    if dcls is not None:
        outs.append(ref_cls)
        grads.append(dcls.double())
    (ref_grad,) = torch.autograd.grad(outs, x, grads)
    lowp_grad = None
    if lowp_dtype:
        louts = [lowp_out] + ([lowp_cls] if dcls is not None else [])
        (lowp_grad,) = torch.autograd.grad(louts, xl, [dout] + ([dcls] if dcls is not None else []))
    _check(dqkv, ref_grad, lowp_grad, tol * 5)
    assert torch.equal(qkv, before), "qkv was modified"
    return dqkv


# (op, token order, B, N, T, H, Dh): N = 37 and temporal T = 37 span three 16-row tiles.
CASES = [
    ("spatial", "space_major", 1, 37, 2, 2, 32),
    ("spatial", "time_major", 2, 37, 1, 1, 40),
    ("spatial", "space_major", 1, 1, 3, 2, 64),  # N = 1: group [cls, one patch]
    ("spatial", "time_major", 2, 5, 1, 1, 80),  # T = 1: one group
    ("temporal", "space_major", 1, 2, 37, 2, 32),  # long T without cls
    ("temporal", "time_major", 1, 3, 37, 1, 40),
    ("temporal_cls", "space_major", 1, 3, 37, 1, 64),  # long T with cls key, no cls query
    ("temporal_cls", "time_major", 2, 2, 5, 2, 32),
    ("temporal", "time_major", 2, 3, 1, 2, 32),  # S = 1: one key, one query
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_float32_matches_reference(case):
    _run_case(*case, torch.float32)


@pytest.mark.parametrize("case", [("spatial", "space_major", 1, 20, 1, 1, 160),
                                  ("temporal_cls", "time_major", 1, 1, 20, 1, 256)],
                         ids=lambda c: "-".join(map(str, c)))
def test_large_head_dims(case):
    """Head dims up to 256 (BLOCK_D = 256; 160 masked in it), forward and dqkv; 20 rows
    span two 16-row query and key tiles."""
    _run_case(*case, torch.float32)


@pytest.mark.parametrize("op", ["spatial", "temporal_cls"])
def test_float64_matches_reference(op):
    _run_case(op, "space_major", 1, 5, 3, 2, 32, torch.float64)


def test_float16_matches_reference():
    _run_case("spatial", "time_major", 1, 20, 2, 2, 32, torch.float16)


def test_custom_scale_and_strided_inputs():
    """qkv a window of a wider buffer, dout and dcls_out with swapped dims 0 and 1."""
    _run_case("spatial", "space_major", 2, 20, 2, 1, 32, torch.float32, scale=0.37, strided=True)


def test_strided_temporal_with_cls():
    _run_case("temporal_cls", "time_major", 2, 2, 20, 1, 40, torch.float32, scale=0.2, strided=True)


def test_no_cls_gradient():
    """dcls_out=None counts as zero: the cls query then adds nothing, and row 0's dq is 0."""
    dqkv = _run_case("spatial", "time_major", 1, 20, 2, 2, 32, torch.float32, no_dcls=True)
    assert torch.all(dqkv[:, 0, :64] == 0)


@pytest.mark.parametrize("whole", [True, False], ids=["whole-group", "dq-dkdv-pair"])
@pytest.mark.parametrize("case", [("spatial", "space_major", 1, 37, 2, 2, 64),
                                  ("spatial", "time_major", 2, 20, 3, 1, 32),
                                  ("temporal_cls", "time_major", 1, 1, 130, 1, 16)],
                         ids=lambda c: "-".join(map(str, c)))
def test_backward_paths(monkeypatch, whole, case):
    """Head dims <= 64 with a group's queries in one tile: the whole-group backward where its
    configs compile clean (sm_90's in 16-bit; the interpreter takes it in every dtype), else
    the dQ + dK/dV pair (forced here). Both against the reference, at the same shapes (float32
    on the interpreter; bf16 on a GPU)."""
    op, order, b, n, t, h, dh = case
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    groups = _groups(op, _make_qkv(b, int(op != "temporal") + n * t, 3 * h * dh, dtype, False), t, h, dh, order)
    with target.compiling_for("sm_90"):
        assert whole_group(groups, torch.bfloat16, torch.device(DEVICE))
        assert not whole_group(groups, torch.float32, torch.device(DEVICE))  # as sm_90 would choose
    if DEVICE == "cpu":
        assert whole_group(groups, dtype, torch.device(DEVICE))
    elif whole and not whole_group(groups, dtype, torch.device(DEVICE)):
        pytest.skip("the whole-group backward has no clean config on this GPU (triton/pools.py)")
    if not whole:
        monkeypatch.setattr(spatial, "whole_group", lambda *args: False)
    _run_case(*case, dtype)


def test_backward_is_deterministic():
    qkv = _make_qkv(2, 1 + 5 * 3, 3 * 2 * 32, torch.float32, False)
    groups = spatial_groups(2, qkv.shape[1], 3, 2, 32, "space_major")
    out, cls_out, lse, cls_lse = spatial_fwd(qkv, groups, 0.2)
    dout, dcls = torch.randn_like(out), torch.randn_like(cls_out)
    first = spatial_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, 0.2)
    second = spatial_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, 0.2)
    assert torch.equal(first, second)


# Model shapes on a GPU: TimeSformer-base at 224 px (N = 196) and 448 px (N = 784), long T.
GPU_CASES = [
    ("spatial", "space_major", 2, 196, 8, 12, 64),
    ("spatial", "time_major", 2, 196, 8, 12, 64),
    ("spatial", "space_major", 1, 784, 2, 4, 64),
    ("spatial", "time_major", 1, 197, 2, 2, 96),
    ("temporal_cls", "space_major", 1, 4, 256, 4, 64),
    ("temporal", "time_major", 1, 4, 300, 2, 128),
]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_gpu_low_precision(case, dtype, strided):
    _run_case(*case, dtype, strided=strided)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", GPU_CASES[:2] + GPU_CASES[4:5], ids=lambda c: "-".join(map(str, c)))
def test_gpu_float32(case):
    _run_case(*case, torch.float32, tol=1e-4)
