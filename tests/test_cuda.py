"""CUDA C++ backend (timesformer_kernels.cuda, extension timesformer_kernels._C).

CPU part: the ops are registered and the raw ops reject bad input with a message naming the
argument, without crashing; why_not explains itself. GPU part (``-m gpu``): forward and every
gradient against the fp64 reference of tests/reference.py, flash-attention style: the kernel's
error must be at most twice the error of the same maths computed by PyTorch in the same dtype
(plus a small eps), over both token orders, with/without cls, fp16/bf16/fp32, Dh 64/128, short
groups (CUDA-core kernels) and long ones (tensor-core / fp32 kernels), non-contiguous and
misaligned qkv, and a batch past 2^31 elements for index overflow.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import ref_spatial_attention, ref_temporal_attention  # noqa: E402

from timesformer_kernels import cuda as tk_cuda  # noqa: E402
from timesformer_kernels.layout import spatial_groups, temporal_groups  # noqa: E402

needs_ext = pytest.mark.skipif(
    not tk_cuda.available(),
    reason=f"CUDA extension not built ({tk_cuda.load_error()}); {tk_cuda.build_hint}")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_test(fn):
    """Marked gpu; skipped without a CUDA device or without the extension."""
    for mark in (needs_ext, needs_gpu, pytest.mark.gpu):
        fn = mark(fn)
    return fn


DEVICE = "cuda"  # the GPU tests' device (a dry run of the harness may point it elsewhere)
ORDERS = ("space_major", "time_major")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# eps added to the 2x-PyTorch-error bound, relative to the size of the reference values
EPS = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5}


def _geometry_args(g):
    return (g.num_groups, g.seq_len, g.group_stride, g.pos_stride, g.base, g.cls_key, g.cls_query, g.num_heads)


# ---------------------------------------------------------------------------------------------
# CPU: registration and input checks of the raw ops
# ---------------------------------------------------------------------------------------------

@needs_ext
def test_ops_registered():
    ops = torch.ops.timesformer_kernels
    fwd = ops.cuda_attention_fwd.default._schema
    bwd = ops.cuda_attention_bwd.default._schema
    assert [a.name for a in fwd.arguments] == [
        "qkv", "num_groups", "seq_len", "group_stride", "pos_stride", "base", "cls_key", "cls_query",
        "num_heads", "scale"]
    assert [a.name for a in bwd.arguments][:7] == ["dout", "dcls_out", "qkv", "out", "cls_out", "lse", "cls_lse"]
    assert len(fwd.returns) == 1 and str(fwd.returns[0].type) == "List[Tensor]"


def _temporal_case(dtype=torch.float32, device="cpu", b=2, n=3, t=4, h=2, dh=64, with_cls=True):
    length = n * t + (1 if with_cls else 0)
    qkv = torch.randn(b, length, 3 * h * dh, dtype=dtype, device=device)
    return qkv, temporal_groups(b, length, t, h, dh, "space_major", with_cls)


@needs_ext
@pytest.mark.parametrize("case, match", [
    ("cpu", "qkv must be a CUDA tensor"),
    ("float64", "qkv must be float16, bfloat16 or float32"),
    ("int", "qkv must be float16, bfloat16 or float32"),
    ("rank2", "qkv must have rank 3"),
    ("channels", "qkv's last dim"),
    ("head_dim", "head_dim of qkv"),
    ("length", "qkv has"),
    ("strides", r"\(group_stride, pos_stride\)"),
    ("base", "base must be 0 or 1"),
    ("cls_base", "cls_key/cls_query need the cls token"),
    ("last_stride", "qkv's last dim must have unit stride"),
])
def test_raw_fwd_rejects(case, match):
    qkv, g = _temporal_case()
    args = list(_geometry_args(g))
    if case == "float64":
        qkv = qkv.double()
    elif case == "int":
        qkv = qkv.to(torch.int32)
    elif case == "rank2":
        qkv = qkv[0]
    elif case == "channels":
        qkv = qkv[..., :-1]
    elif case == "head_dim":
        qkv = qkv[..., : 3 * 2 * 32]
    elif case == "length":
        qkv = qkv[:, :-1]
    elif case == "strides":
        args[2] = 2
    elif case == "base":
        args[4] = 2
    elif case == "cls_base":
        qkv = qkv[:, 1:]
        args[4] = 0
    elif case == "last_stride":
        qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)
        assert qkv.stride(-1) != 1
    with pytest.raises(RuntimeError, match=match):
        torch.ops.timesformer_kernels.cuda_attention_fwd(qkv, *args, 0.125)


@needs_ext
@pytest.mark.parametrize("case, match", [
    ("cpu", "qkv must be a CUDA tensor"),
    ("dout_shape", "dout must have shape"),
    ("dout_dtype", "dout must have dtype"),
    ("out_shape", "out must have shape"),
    ("lse_dtype", "lse must have dtype"),
    ("cls_out_missing", "cls_out is required"),
    ("cls_lse_shape", "cls_lse must have shape"),
])
def test_raw_bwd_rejects(case, match):
    b, n, t, h, dh = 2, 3, 4, 2, 64
    length = 1 + n * t
    qkv = torch.randn(b, length, 3 * h * dh)
    g = spatial_groups(b, length, t, h, dh, "space_major")
    out = torch.randn(b, n * t, h * dh)
    dout = torch.randn_like(out)
    lse = torch.randn(b, n * t, h)
    cls_out = torch.randn(b, t, h * dh)
    dcls = torch.randn_like(cls_out)
    cls_lse = torch.randn(b, t, h)
    if case == "dout_shape":
        dout = dout[:, 1:]
    elif case == "dout_dtype":
        dout = dout.half()
    elif case == "out_shape":
        out = out[..., 1:]
    elif case == "lse_dtype":
        lse = lse.double()
    elif case == "cls_out_missing":
        cls_out = None
    elif case == "cls_lse_shape":
        cls_lse = cls_lse[:, 1:]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.timesformer_kernels.cuda_attention_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse,
                                                         *_geometry_args(g), 0.125)


@needs_ext
def test_wrapper_on_cpu_names_qkv():
    qkv, g = _temporal_case()
    with pytest.raises(RuntimeError, match="qkv must be a CUDA tensor"):
        tk_cuda.attention_fwd(qkv, g, 0.125)


def test_why_not_on_cpu():
    qkv, g = _temporal_case()
    reasons = tk_cuda.why_not(qkv, g)
    assert any("CUDA tensor" in r for r in reasons)
    assert tk_cuda.available() or any("not built" in r and tk_cuda.build_hint in r for r in reasons)
    reasons = tk_cuda.why_not(qkv.double(), g)
    assert any("dtype" in r for r in reasons)
    qkv32, g32 = _temporal_case(dh=32)
    assert any("head_dim 32" in r for r in tk_cuda.why_not(qkv32, g32))
    assert tk_cuda.SUPPORTED_HEAD_DIMS == (64, 128)
    assert set(tk_cuda.SUPPORTED_DTYPES) == set(DTYPES)


# ---------------------------------------------------------------------------------------------
# GPU: numerics against the fp64 reference
# ---------------------------------------------------------------------------------------------

def _make_qkv(b, length, channels, dtype, layout="contiguous", seed=0):
    """qkv (b, length, channels) on the GPU; 'strided' and 'misaligned' read it out of a bigger buffer."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(b, length, channels, device=DEVICE, generator=gen).to(dtype)
    shift = 8 if layout == "strided" else 1  # 1 element: rows no longer 16-byte aligned
    big = torch.randn(2 * b, length + 3, channels + 16, device=DEVICE, generator=gen).to(dtype)
    qkv = big[::2, 2:2 + length, shift:shift + channels]
    assert not qkv.is_contiguous()
    return qkv


def _reference(op, qkv, t, h, order, with_cls, compute_dtype):
    """(out, cls_out or None) of the reference maths, computed in compute_dtype."""
    if op == "temporal":
        return ref_temporal_attention(qkv, t, h, None, order, with_cls, compute_dtype), None
    return ref_spatial_attention(qkv, t, h, None, order, compute_dtype)


def _reference_grads(op, qkv, dout, dcls, t, h, order, with_cls, compute_dtype):
    x = qkv.detach().to(compute_dtype).requires_grad_()
    out, cls_out = _reference(op, x, t, h, order, with_cls, compute_dtype)
    loss = (out * dout.to(compute_dtype)).sum()
    if cls_out is not None:
        loss = loss + (cls_out * dcls.to(compute_dtype)).sum()
    loss.backward()
    return out.detach(), (cls_out.detach() if cls_out is not None else None), x.grad


def _groups(op, b, length, t, h, dh, order, with_cls):
    if op == "temporal":
        return temporal_groups(b, length, t, h, dh, order, with_cls)
    return spatial_groups(b, length, t, h, dh, order)


def _assert_close(name, got, ref64, torch_same, dtype):
    """|got - ref| <= 2 |torch_same - ref| + eps·max(1, |ref|), in max norm."""
    err = (got.double() - ref64).abs().max().item()
    err_torch = (torch_same.double() - ref64).abs().max().item()
    bound = 2 * err_torch + EPS[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (PyTorch {dtype} error {err_torch:.3e})"


def _check(op, b, n, t, h, dh, order, with_cls, dtype, layout="contiguous", dcls_none=False):
    length = n * t + (1 if (with_cls or op == "spatial") else 0)
    qkv = _make_qkv(b, length, 3 * h * dh, dtype, layout)
    groups = _groups(op, b, length, t, h, dh, order, with_cls)
    scale = dh ** -0.5
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    dout = torch.randn(b, n * t, h * dh, device=DEVICE, generator=gen).to(dtype)
    dcls = torch.randn(b, t, h * dh, device=DEVICE, generator=gen).to(dtype) if op == "spatial" else None
    if dcls_none:
        dcls = None

    out, cls_out, lse, cls_lse = tk_cuda.attention_fwd(qkv, groups, scale)
    assert out.shape == (b, n * t, h * dh) and out.dtype == dtype and lse.shape == (b, n * t, h)
    assert lse.dtype == torch.float32
    if op == "spatial":
        assert cls_out.shape == (b, t, h * dh) and cls_lse.shape == (b, t, h)
    else:
        assert cls_out is None and cls_lse is None
    dqkv = tk_cuda.attention_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, scale)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype and dqkv.is_contiguous()

    dcls_ref = torch.zeros(b, t, h * dh, device=DEVICE, dtype=dtype) if (op == "spatial" and dcls is None) else dcls
    out64, cls64, g64 = _reference_grads(op, qkv, dout, dcls_ref, t, h, order, with_cls, torch.float64)
    out_t, cls_t, g_t = _reference_grads(op, qkv, dout, dcls_ref, t, h, order, with_cls, dtype)

    _assert_close("out", out, out64, out_t, dtype)
    if op == "spatial":
        _assert_close("cls_out", cls_out, cls64, cls_t, dtype)
    d = h * dh
    base = 1 if length != n * t else 0
    for part, name in enumerate(("dq", "dk", "dv")):
        sl = slice(part * d, (part + 1) * d)
        _assert_close(name, dqkv[:, base:, sl], g64[:, base:, sl], g_t[:, base:, sl], dtype)
        if base:
            _assert_close(f"cls {name}", dqkv[:, 0, sl], g64[:, 0, sl], g_t[:, 0, sl], dtype)

    # lse: log-sum-exp of the scaled scores, checked through the fp64 reference of one head
    if dtype == torch.float32 and op == "temporal" and not with_cls:
        x = qkv.double()
        q, k = x[..., :d], x[..., d:2 * d]
        rows = torch.tensor([groups.row(0, p) for p in range(groups.seq_len)], device=DEVICE)
        s = torch.einsum("bid,bjd->bij", q[:, rows, :dh], k[:, rows, :dh]) * scale
        torch.testing.assert_close(lse[:, rows - groups.base, 0].double(), torch.logsumexp(s, -1),
                                   rtol=1e-5, atol=1e-5)
    return dqkv


@pytest.fixture(autouse=True)
def _no_tf32():
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dh", (64, 128))
@pytest.mark.parametrize("with_cls", (False, True))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("t", (8, 40), ids=("short", "long"))  # 40 > kShortMaxSeq: spatial kernels
def test_temporal(t, order, with_cls, dh, dtype):
    _check("temporal", b=2, n=5, t=t, h=2, dh=dh, order=order, with_cls=with_cls, dtype=dtype)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dh", (64, 128))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", (7, 70), ids=("one_tile", "tiles"))  # 1+70 queries: 2 query tiles, 2-3 key tiles
def test_spatial(n, order, dh, dtype):
    _check("spatial", b=2, n=n, t=3, h=2, dh=dh, order=order, with_cls=True, dtype=dtype)


@gpu_test
@pytest.mark.parametrize("layout", ("strided", "misaligned"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("op, t", [("temporal", 8), ("temporal", 40), ("spatial", 4)])
def test_non_contiguous(op, t, dtype, layout):
    _check(op, b=2, n=36, t=t, h=3, dh=64, order="time_major", with_cls=True, dtype=dtype, layout=layout)


@gpu_test
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_spatial_without_dcls_out(dtype):
    """dcls_out None (cls_out unused) reads as zeros."""
    _check("spatial", b=1, n=40, t=2, h=2, dh=64, order="space_major", with_cls=True, dtype=dtype, dcls_none=True)


@gpu_test
@pytest.mark.parametrize("op, t", [("temporal", 8), ("temporal", 40), ("spatial", 4)])
def test_backward_deterministic(op, t):
    """No atomics: two backward passes agree bit for bit (cls sums included)."""
    b, n, h, dh, dtype = 2, 50, 2, 64, torch.bfloat16
    length = 1 + n * t
    qkv = _make_qkv(b, length, 3 * h * dh, dtype)
    groups = _groups(op, b, length, t, h, dh, "space_major", True)
    out, cls_out, lse, cls_lse = tk_cuda.attention_fwd(qkv, groups, 0.125)
    dout = torch.randn_like(out)
    dcls = torch.randn_like(cls_out) if cls_out is not None else None
    d1 = tk_cuda.attention_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, 0.125)
    d2 = tk_cuda.attention_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, 0.125)
    assert torch.equal(d1, d2)


@gpu_test
@pytest.mark.slow
@pytest.mark.parametrize("op", ("temporal", "spatial"))
def test_large_batch_forward(op):
    """B·L >= 2^20 rows and B·L·3·H·Dh > 2^31 elements: int64 offsets (forward only)."""
    b, n, t, h, dh, dtype = 669, 196, 8, 12, 64, torch.float16
    length = 1 + n * t
    assert b * length >= 2 ** 20 and b * length * 3 * h * dh > 2 ** 31
    qkv = torch.randn(b, length, 3 * h * dh, device=DEVICE, dtype=dtype)
    groups = _groups(op, b, length, t, h, dh, "space_major", True)
    out, cls_out, lse, cls_lse = tk_cuda.attention_fwd(qkv, groups, dh ** -0.5)
    for clip in (0, b // 2, b - 1):
        x = qkv[clip:clip + 1]
        ref64, cls64 = _reference(op, x.double(), t, h, "space_major", True, torch.float64)
        ref_t, cls_t = _reference(op, x, t, h, "space_major", True, dtype)
        _assert_close(f"out[{clip}]", out[clip:clip + 1], ref64, ref_t, dtype)
        if op == "spatial":
            _assert_close(f"cls_out[{clip}]", cls_out[clip:clip + 1], cls64, cls_t, dtype)
        assert torch.isfinite(lse[clip]).all()
