"""Property-based tests (hypothesis): random shapes, memory layouts, token orders, cls options
and scales against the independent einsum reference, forward and d(qkv); and random bad
inputs, which must raise ValueError/TypeError naming the argument, never anything else.

Sizes stay tiny because Triton runs under its (slow) CPU interpreter when there is no GPU.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import timesformer_kernels as tk
from reference import ref_spatial_attention, ref_temporal_attention
from timesformer_kernels.layout import TOKEN_ORDERS
from timesformer_kernels.validation import BACKENDS as VALID_BACKENDS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp64 under the interpreter; fp32 on a GPU (fp64 Triton runs only under the interpreter).
TRITON_DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}

# The interpreter is slow: no shrinking for the Triton properties (their inputs are tiny
# already), so a failure is reported at once instead of after minutes of shrinking.
_FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
             print_blob=True)
_NO_SHRINK = dict(_FAST, phases=[Phase.explicit, Phase.reuse, Phase.generate])


# ------------------------------------------------------------------------------ inputs
@st.composite
def layouts(draw):
    """How qkv (B, L, C) sits in memory: which of B and L is outer, a step on each, padding
    (so a slice of a wider buffer with a storage offset), or a batch broadcast (stride 0)."""
    if draw(st.booleans()) and draw(st.booleans()):  # 1 in 4: a broadcast batch
        return {"broadcast": True}
    return {
        "broadcast": False,
        "batch_inner": draw(st.booleans()),  # (L, B, C) memory seen as (B, L, C)
        "step_b": draw(st.integers(1, 2)),
        "step_l": draw(st.integers(1, 2)),
        "off_b": draw(st.integers(0, 1)),
        "off_l": draw(st.integers(0, 2)),
        "off_c": draw(st.integers(0, 8)),
        "pad_c": draw(st.integers(0, 8)),
    }


def make_qkv(b, length, channels, layout, dtype, seed):
    """A (b, length, channels) leaf tensor with ``layout``'s strides, standard normal values."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    if layout["broadcast"]:
        base = randn(1, length, channels).requires_grad_(True)
        return base, base.expand(b, length, channels)
    sb, sl, ob, ol, oc = layout["step_b"], layout["step_l"], layout["off_b"], layout["off_l"], layout["off_c"]
    nb, nl, nc = ob + sb * b, ol + sl * length, oc + channels + layout["pad_c"]
    if layout["batch_inner"]:
        buf = randn(nl, nb, nc)[ol::sl, ob::sb, oc:oc + channels].transpose(0, 1)
    else:
        buf = randn(nb, nl, nc)[ob::sb, ol::sl, oc:oc + channels]
    buf = buf[:b, :length]
    assert buf.shape == (b, length, channels) and buf.stride(-1) == 1
    leaf = buf.detach().requires_grad_(True)  # keeps the strides and storage offset
    assert leaf.stride() == buf.stride() and leaf.storage_offset() == buf.storage_offset()
    return leaf, leaf


scales = st.one_of(st.none(), st.floats(-1.5, 1.5, allow_nan=False).filter(lambda s: abs(s) > 1e-3))


@st.composite
def problems(draw, op, max_b, max_t, max_n, max_h, head_dims):
    return dict(
        op=op,
        b=draw(st.integers(1, max_b)), t=draw(st.integers(1, max_t)), n=draw(st.integers(1, max_n)),
        h=draw(st.integers(1, max_h)), dh=draw(st.sampled_from(head_dims)),
        order=draw(st.sampled_from(TOKEN_ORDERS)),
        with_cls=draw(st.booleans()) if op == "temporal" else True,
        scale=draw(scales), layout=draw(layouts()), seed=draw(st.integers(0, 2 ** 16)),
    )


def check_against_reference(p, backend, dtype):
    b, t, n, h, dh, order, scale = p["b"], p["t"], p["n"], p["h"], p["dh"], p["order"], p["scale"]
    length = int(p["with_cls"]) + n * t
    leaf, qkv = make_qkv(b, length, 3 * h * dh, p["layout"], dtype, p["seed"])
    if p["op"] == "temporal":
        kw = dict(scale=scale, token_order=order, with_cls=p["with_cls"])
        outs = (tk.temporal_attention(qkv, t, h, backend=backend, **kw),)
        ref_fn = lambda x: (ref_temporal_attention(x, t, h, **kw),)  # noqa: E731
    else:
        kw = dict(scale=scale, token_order=order)
        outs = tk.spatial_attention(qkv, t, h, backend=backend, **kw)
        ref_fn = lambda x: ref_spatial_attention(x, t, h, **kw)  # noqa: E731
    ref_leaf = leaf.detach().to(torch.float64).requires_grad_(True)
    ref_in = ref_leaf.expand(b, length, 3 * h * dh) if p["layout"]["broadcast"] else ref_leaf
    refs = ref_fn(ref_in)
    tol = TOL[dtype]
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape and o.dtype == dtype, (i, o.shape, r.shape, o.dtype)
        torch.testing.assert_close(o.double(), r, atol=tol, rtol=tol, msg=lambda m: f"output {i}: {m}")
    g = torch.Generator().manual_seed(p["seed"] + 1)
    grads = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(DEVICE) for r in refs]
    (dq,) = torch.autograd.grad(outs, leaf, [gr.to(dtype) for gr in grads])
    (dref,) = torch.autograd.grad(refs, ref_leaf, grads)
    assert dq.shape == leaf.shape and dq.dtype == dtype
    torch.testing.assert_close(dq.double(), dref, atol=tol, rtol=tol, msg=lambda m: f"dqkv: {m}")


# ------------------------------------------------------------- matches the reference
@settings(max_examples=40, **_FAST)
@given(p=st.sampled_from(["temporal", "spatial"]).flatmap(
    lambda op: problems(op, max_b=3, max_t=5, max_n=6, max_h=3, head_dims=[8, 16, 24, 40])))
def test_torch_backend_matches_reference(p):
    check_against_reference(p, "torch", torch.float64)


@settings(max_examples=15, **_NO_SHRINK)
@given(p=problems("temporal", max_b=2, max_t=5, max_n=5, max_h=2, head_dims=[8, 16, 24]))
def test_triton_temporal_matches_reference(p):
    check_against_reference(p, "triton", TRITON_DTYPE)


@settings(max_examples=10, **_NO_SHRINK)
@given(p=problems("spatial", max_b=2, max_t=2, max_n=5, max_h=2, head_dims=[8, 16, 24]))
def test_triton_spatial_matches_reference(p):
    check_against_reference(p, "triton", TRITON_DTYPE)


# ---------------------------------------------------------------------- bad inputs
def _good(op, b, t, n, h, dh):
    return torch.randn(b, 1 + n * t, 3 * h * dh)  # cls first: valid for both ops (temporal: with_cls)


_BAD_INTS = st.one_of(
    st.integers(-(2 ** 40), 0).map(lambda v: (v, ValueError)),
    st.sampled_from([2.0, 0.5, "2", None, True, False, [2], (2,), 2 + 0j]).map(lambda v: (v, TypeError)),
    st.floats(allow_nan=True).map(lambda v: (v, TypeError)),
    st.just(None).map(lambda _: (torch.tensor(2), TypeError)),
)
_BAD_STRINGS = st.one_of(st.text(max_size=12), st.sampled_from([None, 0, 1.5, b"torch", ["torch"]]))


@st.composite
def bad_calls(draw):
    """(op, qkv, num_frames, num_heads, kwargs, exception types, names one of which the message has)."""
    op = draw(st.sampled_from(["temporal", "spatial"]))
    b, t, n, h = (draw(st.integers(1, 3)) for _ in range(4))
    dh = draw(st.sampled_from([8, 16]))
    qkv, kwargs = _good(op, b, t, n, h, dh), {"backend": draw(st.sampled_from(["auto", "torch"]))}
    if op == "temporal":
        kwargs["with_cls"] = True
    c = 3 * h * dh
    kind = draw(st.sampled_from(["qkv_type", "rank", "dtype", "channels", "tokens", "last_stride", "empty_batch",
                                 "num_frames", "num_heads", "token_order", "backend", "scale", "with_cls"]))
    exc, names = (ValueError,), ("qkv",)
    if kind == "qkv_type":
        qkv = draw(st.sampled_from([None, 3, 1.0, "qkv", [[[1.0]]], np.zeros((b, 1 + n * t, c), np.float32)]))
        exc = (TypeError,)
    elif kind == "rank":
        rank = draw(st.sampled_from([0, 1, 2, 4, 5]))
        qkv = torch.randn(*(draw(st.integers(1, 4)) for _ in range(rank - 1)), c) if rank else torch.tensor(1.0)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool,
                                      torch.complex64, torch.complex128, torch.float8_e4m3fn]))
        qkv = qkv.to(dtype)
        exc, names = (TypeError,), ("dtype",)
    elif kind == "channels":
        bad_c = draw(st.integers(0, 4 * c).filter(lambda v: v == 0 or v % (3 * h) != 0))
        qkv = torch.randn(b, 1 + n * t, bad_c)
        names = ("num_heads",)
    elif kind == "tokens":
        base = 1 if op == "spatial" or kwargs.get("with_cls") else 0
        if op == "temporal" and draw(st.booleans()):
            kwargs["with_cls"], base = False, 0
        length = draw(st.integers(0, 40).filter(lambda v: v - base < t or (v - base) % t != 0))
        qkv = torch.randn(b, length, c)
        names = ("num_frames",)
    elif kind == "last_stride":
        step = draw(st.integers(2, 3))
        qkv = torch.randn(b, 1 + n * t, c * step)[..., ::step] if draw(st.booleans()) else \
            torch.randn(b, c, 1 + n * t).transpose(1, 2)
        names = ("stride", "qkv")
    elif kind == "empty_batch":
        qkv = torch.randn(0, 1 + n * t, c)
    elif kind in ("num_frames", "num_heads"):
        value, e = draw(_BAD_INTS)
        t, h = (value, h) if kind == "num_frames" else (t, value)
        exc, names = (e,), (kind,)
    elif kind == "token_order":
        kwargs["token_order"] = draw(_BAD_STRINGS.filter(lambda s: s not in TOKEN_ORDERS))
        exc, names = (ValueError, TypeError), ("token_order",)
    elif kind == "backend":
        choice = draw(st.sampled_from(["string", "triton_head_dim", "cuda_on_cpu"]))
        if choice == "string":
            kwargs["backend"] = draw(_BAD_STRINGS.filter(lambda s: s not in VALID_BACKENDS))
        elif choice == "triton_head_dim":  # a valid name that cannot run: head_dim not a multiple of 8, or above 256
            qkv = torch.randn(b, 1 + n * t, 3 * h * draw(st.sampled_from([4, 12, 20, 264])))
            kwargs["backend"] = "triton"
        else:
            kwargs["backend"] = "cuda"  # a CPU tensor
        exc, names = (ValueError, TypeError), ("backend",)
    elif kind == "scale":
        kwargs["scale"] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), "0.1", True, 1j,
                                                [0.1], torch.tensor(0.1), np.float64("nan")]))
        exc, names = (TypeError,), ("scale",)
    else:  # with_cls
        if op == "spatial":
            op = "temporal"
        kwargs["with_cls"] = draw(st.sampled_from([1, 0, None, "yes", 1.0, np.bool_(True), torch.tensor(True)]))
        exc, names = (TypeError,), ("with_cls",)
    return op, qkv, t, h, kwargs, exc, names, kind


@settings(max_examples=300, **_FAST)
@given(call=bad_calls())
def test_bad_inputs_raise_naming_the_argument(call):
    op, qkv, t, h, kwargs, exc, names, kind = call
    fn = tk.temporal_attention if op == "temporal" else tk.spatial_attention
    with pytest.raises(Exception) as info:
        fn(qkv, t, h, **kwargs)
    err = info.value
    assert isinstance(err, exc), f"{kind}: expected {exc}, got {type(err).__name__}: {err}"
    assert any(name in str(err) for name in names), f"{kind}: message does not name {names}: {err}"


def test_bad_input_generator_covers_every_kind():
    """Guards the generator itself: every mutation kind is drawn and is invalid."""
    seen = set()

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(call=bad_calls())
    def collect(call):
        seen.add(call[-1])

    collect()
    assert seen == {"qkv_type", "rank", "dtype", "channels", "tokens", "last_stride", "empty_batch", "num_frames",
                    "num_heads", "token_order", "backend", "scale", "with_cls"}


@settings(max_examples=30, **_FAST)
@given(t=st.integers(1, 3), n=st.integers(1, 3), h=st.integers(1, 2), order=st.sampled_from(TOKEN_ORDERS),
       scale=st.floats(1e-3, 2.0))
def test_integer_like_arguments_are_accepted(t, n, h, order, scale):
    """numpy integers and floats are valid num_frames/num_heads/scale and give the same result."""
    qkv = torch.randn(2, 1 + n * t, 3 * h * 8, dtype=torch.float64)
    a = tk.spatial_attention(qkv, np.int64(t), np.int32(h), scale=np.float32(scale), token_order=order,
                             backend="torch")
    b = tk.spatial_attention(qkv, t, h, scale=float(np.float32(scale)), token_order=order, backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert math.isfinite(float(a[0].sum()))
