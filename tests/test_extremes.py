"""Extreme values: logits around +-1e4, saturated softmax, all-equal keys, scale 0, T = 1, a
single patch, values near fp16's max. No NaN/Inf where the float64 reference has none, and
the outputs and d(qkv) match the reference, for the torch and triton backends in fp32/fp16."""
import pytest
import torch

import timesformer_kernels as tk
from reference import ref_spatial_attention, ref_temporal_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]
# (op, with_cls): the spatial op, temporal with the cls key (lucidrains) and without (official)
OPS = [("spatial", True), ("temporal", True), ("temporal", False)]
OP_IDS = ["spatial", "temporal_cls", "temporal"]

# The Triton interpreter evaluates both sides of tl.where and the masked-off lanes of tiles in
# numpy, which warns about exp overflow / inf*0 in lanes whose results are never stored; the
# tests check the stored results for NaN/Inf instead.
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def run_op(op, with_cls, qkv, t, h, backend, scale=None, order="space_major"):
    if op == "spatial":
        return tk.spatial_attention(qkv, t, h, scale=scale, token_order=order, backend=backend)
    return (tk.temporal_attention(qkv, t, h, scale=scale, token_order=order, with_cls=with_cls, backend=backend),)


def ref_op(op, with_cls, qkv, t, h, scale=None, order="space_major"):
    if op == "spatial":
        return ref_spatial_attention(qkv, t, h, scale=scale, token_order=order)
    return (ref_temporal_attention(qkv, t, h, scale=scale, token_order=order, with_cls=with_cls),)


def compare(op, with_cls, qkv64, t, h, backend, dtype, rel_tol, scale=None, order="space_major", seed=0,
            grad_scale=1.0):
    """Runs the op on qkv64 cast to dtype, and the reference on that same rounded input in
    float64. Outputs and d(qkv) must be finite where the reference is, and within rel_tol of
    the reference relative to its largest magnitude. Returns (outs, dqkv) of the op."""
    x = qkv64.to(DEVICE, dtype).requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)
    outs = run_op(op, with_cls, x, t, h, backend, scale, order)
    refs = ref_op(op, with_cls, xr, t, h, scale, order)
    g = _gen(seed + 7)
    grads = [grad_scale * torch.randn(r.shape, generator=g, dtype=torch.float64).to(DEVICE) for r in refs]
    (dq,) = torch.autograd.grad(outs, x, [gr.to(dtype) for gr in grads])
    (dref,) = torch.autograd.grad(refs, xr, grads)
    for name, a, r in [*((f"output {i}", o, rr) for i, (o, rr) in enumerate(zip(outs, refs))), ("dqkv", dq, dref)]:
        assert a.dtype == dtype and a.shape == r.shape, (name, a.dtype, a.shape, r.shape)
        assert torch.isfinite(r).all(), f"{name}: the reference itself is not finite (bad test input)"
        if dtype != torch.float64:  # the reference, rounded to dtype, must also be representable
            assert torch.isfinite(r.to(dtype)).all(), f"{name}: the reference overflows {dtype} (bad test input)"
        bad = ~torch.isfinite(a)
        assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference has none"
        err = (a.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
        assert err <= rel_tol, f"{name}: max error {err:.2e} of the reference's max magnitude > {rel_tol:.0e}"
    return outs, dq


def tokens(qkv_parts, b, length, h, dh):
    """(B, L, 3, H, Dh) -> (B, L, 3*H*Dh)"""
    return qkv_parts.reshape(b, length, 3 * h * dh)


def near_tie_logits(b, length, h, dh, level, seed=0):
    """q and k nearly parallel so that every scaled logit q.k*Dh^-0.5 is level + O(1): a
    softmax that does not subtract the row max overflows (+1e4) or underflows to 0/0 (-1e4),
    while the true probabilities are far from one-hot."""
    g = _gen(seed)
    scale = dh ** -0.5
    u = torch.randn(h, dh, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    a = (abs(level) / scale) ** 0.5
    sign = 1.0 if level > 0 else -1.0
    noise = lambda: torch.randn(b, length, h, dh, generator=g, dtype=torch.float64) / (scale * a)  # noqa: E731
    q = a * u + noise()
    k = sign * a * u + noise()
    v = torch.randn(b, length, h, dh, generator=g, dtype=torch.float64)
    return tokens(torch.stack([q, k, v], 2), b, length, h, dh)


def _shape(op, backend):
    """(B, T, N, H, Dh): small for the spatial op on the interpreter (one program per tile)."""
    if op == "spatial" and backend == "triton" and DEVICE == "cpu":
        return 1, 2, 5, 2, 16
    return 2, 3, 5, 2, 16


# Logits of magnitude 1e4 carry an absolute rounding error of ~1e4 * 2^-24 * sqrt(Dh) in fp32
# accumulation, which moves probabilities by ~1e-3: tolerances are relative to that.
LARGE_TOL = {torch.float32: 5e-3, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,with_cls", OPS, ids=OP_IDS)
@pytest.mark.parametrize("level", [1e4, -1e4], ids=["plus1e4", "minus1e4"])
def test_logits_around_1e4(level, op, with_cls, backend, dtype):
    b, t, n, h, dh = _shape(op, backend)
    length = int(with_cls) + n * t
    qkv = near_tie_logits(b, length, h, dh, level)
    order = "time_major" if level < 0 else "space_major"
    compare(op, with_cls, qkv, t, h, backend, dtype, LARGE_TOL[dtype], order=order)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,with_cls", OPS, ids=OP_IDS)
def test_saturated_softmax(op, with_cls, backend, dtype):
    """Independent q, k scaled so logits spread over +-1e4: the softmax is one-hot (exp of the
    other logits underflows to exactly 0), gradients through q and k vanish."""
    b, t, n, h, dh = _shape(op, backend)
    length = int(with_cls) + n * t
    g = _gen(1)
    x = torch.randn(b, length, 3, h, dh, generator=g, dtype=torch.float64)
    x[:, :, :2] *= 100.0  # q.k * Dh^-0.5 ~ 1e4 * N(0, 1)
    outs, _ = compare(op, with_cls, tokens(x, b, length, h, dh), t, h, backend, dtype, LARGE_TOL[dtype])
    assert outs[0].abs().max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,with_cls", OPS, ids=OP_IDS)
def test_all_equal_keys(op, with_cls, backend, dtype):
    """Every key (cls included) is the same large vector: uniform attention, so each output is
    the mean of its group's values and d(q) is zero, however large q.k is."""
    b, t, n, h, dh = _shape(op, backend)
    length = int(with_cls) + n * t
    g = _gen(2)
    x = torch.randn(b, length, 3, h, dh, generator=g, dtype=torch.float64)
    x[:, :, 0] *= 30.0
    x[:, :, 1] = 30.0 * torch.randn(1, 1, h, dh, generator=g, dtype=torch.float64)
    qkv = tokens(x, b, length, h, dh)
    # logits up to ~3e3 carry ~3e3 * 2^-24 * sqrt(Dh) of rounding where a kernel sums in another order
    tol = {torch.float32: 1e-3, torch.float16: 5e-3}[dtype]
    outs, dq = compare(op, with_cls, qkv, t, h, backend, dtype, tol)
    # out == mean of the group's values (cls value included when cls is a key)
    v = x[:, :, 2].to(dtype).double()
    first = int(with_cls)
    patches = v[:, first:].reshape(b, n, t, h, dh)  # space_major: patch (n, t) at first + n*T + t
    if op == "spatial":
        groups = patches.transpose(1, 2)  # (B, T, N, H, Dh): frame groups
    else:
        groups = patches  # (B, N, T, H, Dh): patch groups
    total, count = groups.sum(2), groups.shape[2]
    if with_cls:
        total, count = total + v[:, :1], count + 1
    mean = (total / count).unsqueeze(2).expand_as(groups)
    want = (mean.transpose(1, 2) if op == "spatial" else mean).reshape(b, n * t, h * dh)
    torch.testing.assert_close(outs[0].double().cpu(), want, atol=tol, rtol=tol)
    dq_q = dq.double().reshape(b, length, 3, h, dh)[:, :, 0]
    vanish = {torch.float32: 1e-6, torch.float16: 2e-3}[dtype] * dq.abs().max().item()
    assert dq_q.abs().max().item() <= vanish, "d(q) must vanish when all keys are equal"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,with_cls", OPS, ids=OP_IDS)
def test_scale_zero_is_uniform_attention(op, with_cls, backend):
    """scale=0 with huge q and k (q.k ~ 1e8): all logits are 0, attention is uniform."""
    b, t, n, h, dh = _shape(op, backend)
    length = int(with_cls) + n * t
    x = torch.randn(b, length, 3, h, dh, generator=_gen(3), dtype=torch.float64)
    x[:, :, :2] *= 1e4
    compare(op, with_cls, tokens(x, b, length, h, dh), t, h, backend, torch.float32, 1e-5, scale=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,with_cls", OPS, ids=OP_IDS)
def test_negative_scale(op, with_cls, backend):
    """A negative scale reverses the softmax's order (the largest logit is the most negative
    q.k): a kernel that takes the running max of unscaled scores must not assume scale > 0."""
    b, t, n, h, dh = _shape(op, backend)
    length = int(with_cls) + n * t
    x = torch.randn(b, length, 3, h, dh, generator=_gen(6), dtype=torch.float64)
    x[:, :, :2] *= 10.0  # scaled logits spread over ~+-500 (log2): a max on the wrong side overflows
    compare(op, with_cls, tokens(x, b, length, h, dh), t, h, backend, torch.float32, 1e-4, scale=-0.7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_frame_temporal_is_identity(backend, dtype):
    """T = 1 without cls: each group is one token, so out == v exactly, d(v) == d(out) and
    d(q), d(k) ~ 0, even with logits far beyond exp's range."""
    b, n, h, dh = 2, 6, 2, 16
    x = torch.randn(b, n, 3, h, dh, generator=_gen(4), dtype=torch.float64)
    x[:, :, :2] *= 300.0  # q.k * Dh^-0.5 ~ 2e4
    qkv = tokens(x, b, n, h, dh).to(DEVICE, dtype).requires_grad_(True)
    for order in ("space_major", "time_major"):
        out = tk.temporal_attention(qkv, 1, h, token_order=order, backend=backend)
        v = qkv.detach().unflatten(-1, (3, h * dh))[:, :, 2]
        # Bit-exact with IEEE dots; a GPU's fp32 tl.dot (tf32x3) carries v's low bits only to ~2^-22.
        exact = DEVICE == "cpu" or dtype != torch.float32
        same = dict(atol=0, rtol=0) if exact else dict(atol=1e-30, rtol=2e-6)
        torch.testing.assert_close(out, v, **same, msg=lambda m: f"{order}: out != v: {m}")
        dout = torch.randn(out.shape, generator=_gen(5), dtype=torch.float64).to(DEVICE, dtype)
        (dq,) = torch.autograd.grad(out, qkv, dout)
        dq = dq.unflatten(-1, (3, h * dh))
        assert torch.isfinite(dq).all()
        torch.testing.assert_close(dq[:, :, 2], dout, **same, msg=lambda m: f"{order}: d(v) != d(out): {m}")
        assert dq[:, :, :2].abs().max().item() <= 1e-3 * (1 if dtype == torch.float32 else 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,with_cls", OPS, ids=OP_IDS)
@pytest.mark.parametrize("t,n", [(1, 4), (3, 1), (1, 1)], ids=["T1", "N1", "T1N1"])
def test_single_frame_and_single_patch(t, n, op, with_cls, backend, dtype):
    """T = 1 and/or N = 1: groups of one or two tokens, with large logits."""
    b, h, dh = (1 if op == "spatial" and backend == "triton" and DEVICE == "cpu" else 2), 2, 16
    length = int(with_cls) + n * t
    qkv = near_tie_logits(b, length, h, dh, 1e4, seed=6)
    for order in ("space_major", "time_major"):
        compare(op, with_cls, qkv, t, h, backend, dtype, LARGE_TOL[dtype], order=order)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,with_cls", OPS, ids=OP_IDS)
def test_fp16_values_near_max(op, with_cls, backend):
    """Values of magnitude 3e4 (fp16's max is 65504): outputs are convex combinations of them,
    so they stay finite; small upstream gradients keep d(qkv) in range too."""
    b, t, n, h, dh = _shape(op, backend)
    length = int(with_cls) + n * t
    x = torch.randn(b, length, 3, h, dh, generator=_gen(8), dtype=torch.float64)
    x[:, :, 2] = 3e4 * torch.tanh(x[:, :, 2])
    x[:, :, :2] *= 0.5
    compare(op, with_cls, tokens(x, b, length, h, dh), t, h, backend, torch.float16, 2e-3, grad_scale=1e-2)
