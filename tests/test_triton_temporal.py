"""Kernel-level tests of ``timesformer_kernels.triton.temporal`` (short groups) against the
independent fp64 einsum reference: out, lse and the whole dqkv, for both token orders, with
and without the cls key, awkward group counts and lengths, head dims and memory layouts.

On the CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) in fp64, fp32 and fp16
(bf16 ``tl.dot`` is broken in the interpreter); bf16 and large shapes run on a GPU only.
"""
import pytest
import torch

from reference import _patches, ref_temporal_attention
from timesformer_kernels.layout import temporal_groups
from timesformer_kernels.triton import temporal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ORDERS = ["space_major", "time_major"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (forward, gradient) tolerances, absolute and relative, against the fp64 reference
_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5), torch.float16: (3e-3, 2e-2),
        torch.bfloat16: (2e-2, 8e-2)}


def _randn(shape, dtype, view, seed):
    """A random tensor of `shape` in one of several memory layouts (all unit last stride
    except "strided_last")."""
    g = torch.Generator().manual_seed(seed)
    b, rows, width = shape

    def randn(*s):  # drawn on the CPU in fp64, so every dtype and device sees the same values
        return torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    if view == "contiguous":
        return randn(b, rows, width)
    if view == "wide":  # big[..., off:off + width]: wider rows and a storage offset
        return randn(b, rows, width + 24)[..., 8:8 + width]
    if view == "rows":  # full[:, 1:]
        return randn(b, rows + 1, width)[:, 1:]
    if view == "batch_inner":  # (rows, B, width) memory seen as (B, rows, width)
        return randn(rows, b, width).transpose(0, 1)
    if view == "strided_last":
        return randn(b, rows, width, 2)[..., 1]
    raise ValueError(view)


def _ref_lse(x, t, h, scale, order, with_cls):
    """Natural log-sum-exp of each patch query's scaled scores, (B, N*T, H), from fp64 x."""
    q, k, _ = _patches(x, t, h, int(with_cls), order)  # (B, N, T, H, Dh)
    s = torch.einsum("bnthd,bnshd->bnths", q, k) * scale
    if with_cls:
        k_cls = x[:, 0].reshape(x.shape[0], 3, h, -1)[:, 1]
        s = torch.cat([torch.einsum("bnthd,bhd->bnth", q, k_cls).unsqueeze(-1) * scale, s], -1)
    lse = s.logsumexp(-1)
    if order == "time_major":
        lse = lse.transpose(1, 2)
    return lse.reshape(x.shape[0], -1, h)


def _check(b=2, t=8, n=7, h=2, dh=32, order="space_major", with_cls=False, dtype=torch.float32,
           scale=None, view="contiguous", dout_view="contiguous", seed=0):
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("fp64 is run under the interpreter only")
    length = n * t + int(with_cls)
    qkv = _randn((b, length, 3 * h * dh), dtype, view, seed)
    groups = temporal_groups(b, length, t, h, dh, order, with_cls)
    scale = dh ** -0.5 if scale is None else scale

    out, lse = temporal.temporal_fwd(qkv, groups, scale)
    dout = _randn((b, n * t, h * dh), dtype, dout_view, seed + 1)
    dqkv = temporal.temporal_bwd(dout, qkv, lse, groups, scale)

    x = qkv.detach().double().requires_grad_(True)
    ref = ref_temporal_attention(x, t, h, scale, order, with_cls)
    (dref,) = torch.autograd.grad(ref, x, dout.double())
    assert out.shape == (b, n * t, h * dh) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (b, n * t, h)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype and dqkv.is_contiguous()
    fwd_tol, grad_tol = _TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=fwd_tol, rtol=fwd_tol)
    lse_tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse.double(), _ref_lse(x.detach(), t, h, scale, order, with_cls),
                               atol=lse_tol, rtol=lse_tol)
    torch.testing.assert_close(dqkv.double(), dref, atol=grad_tol, rtol=grad_tol)
    return dqkv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_cls", [False, True])
@pytest.mark.parametrize("order", ORDERS)
def test_orders_cls_dtypes(order, with_cls, dtype):
    _check(order=order, with_cls=with_cls, dtype=dtype)


# Under the interpreter's 32-row tiles: T=1 packs 32 groups a tile, T=3 eight, T=16 two,
# T=33 one group of 64 rows; every n leaves the last tile part empty.
@pytest.mark.parametrize("t, n, order, with_cls", [
    (1, 40, "space_major", True),
    (3, 19, "time_major", False),
    (3, 19, "space_major", True),
    (16, 5, "time_major", True),
    (33, 3, "space_major", False),
])
def test_group_lengths(t, n, order, with_cls):
    _check(t=t, n=n, h=1, order=order, with_cls=with_cls)


def test_max_seq():
    _check(t=temporal.MAX_SEQ, n=2, h=1, dh=16, order="time_major", with_cls=True)


# 160 and 256: the largest tiles (BLOCK_D = 256), AnimateDiff's 160 masked in them.
@pytest.mark.parametrize("dh", [8, 40, 64, 80, 128, 160, 256])
def test_head_dims(dh):
    _check(t=3, n=5, h=1 if dh > 64 else 2, dh=dh, order="time_major", with_cls=True)


def test_wide_long_groups_use_the_flash_kernel():
    """Above head dim 128 this module takes groups of at most WIDE_MAX_SEQ; the package's
    dispatch sends a longer one to the flash kernel, which must give the same results."""
    from timesformer_kernels import triton as kernels

    b, t, n, h, dh = 1, temporal.WIDE_MAX_SEQ + 1, 1, 1, 160
    qkv = _randn((b, n * t + 1, 3 * h * dh), torch.float32, "contiguous", 0)
    groups = temporal_groups(b, n * t + 1, t, h, dh, "space_major", True)
    out, _, lse, _ = kernels.attention_fwd(qkv, groups, dh ** -0.5)
    dout = _randn(out.shape, torch.float32, "contiguous", 1)
    dqkv = kernels.attention_bwd(dout, None, qkv, out, None, lse, None, groups, dh ** -0.5)
    x = qkv.double().requires_grad_(True)
    ref = ref_temporal_attention(x, t, h, dh ** -0.5, "space_major", True)
    (dref,) = torch.autograd.grad(ref, x, dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=5e-5)
    torch.testing.assert_close(dqkv.double(), dref, atol=2e-5, rtol=5e-5)


@pytest.mark.parametrize("with_cls", [False, True])
def test_custom_scale(with_cls):
    _check(t=3, n=5, scale=0.37, with_cls=with_cls, dtype=torch.float64)


@pytest.mark.parametrize("order", ORDERS)
def test_single_patch(order):
    _check(b=3, t=8, n=1, h=3, order=order, with_cls=True)


@pytest.mark.parametrize("view, dout_view", [
    ("wide", "contiguous"),
    ("rows", "batch_inner"),
    ("batch_inner", "strided_last"),
    ("contiguous", "wide"),
])
@pytest.mark.parametrize("with_cls", [False, True])
def test_memory_layouts(view, dout_view, with_cls):
    _check(t=3, n=5, order="time_major" if with_cls else "space_major", with_cls=with_cls,
           view=view, dout_view=dout_view)


@pytest.mark.parametrize("with_cls", [False, True])
def test_fp16(with_cls):
    _check(t=8, n=5, dh=32, order="time_major", with_cls=with_cls, dtype=torch.float16)


# What the GPU autotuner may pick: bigger tiles (several cls partial chunks per tile), one
# head per program, and a head block that H does not fill.
@pytest.mark.skipif(not temporal._INTERPRET, reason="the launch config is autotuned on a GPU")
@pytest.mark.parametrize("block_m, heads", [(64, 1), (128, 2)])
@pytest.mark.parametrize("order", ORDERS)
def test_tilings(monkeypatch, block_m, heads, order):
    monkeypatch.setattr(temporal, "INTERPRET_CONFIG", {"BLOCK_M": block_m, "HEADS": heads})
    _check(t=8, n=37, h=3, dh=16, order=order, with_cls=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_cls", [False, True])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.gpu
@needs_gpu
def test_gpu_timesformer_base(order, with_cls, dtype):
    """TimeSformer-base shapes; the backward must also be bitwise deterministic."""
    dqkv = _check(b=2, t=8, n=196, h=12, dh=64, order=order, with_cls=with_cls, dtype=dtype,
                  view="rows")
    assert torch.equal(dqkv, _check(b=2, t=8, n=196, h=12, dh=64, order=order,
                                    with_cls=with_cls, dtype=dtype, view="rows"))


@pytest.mark.parametrize("t, dh", [(4, 40), (16, 80), (96, 128), (128, 64)])
@pytest.mark.gpu
@needs_gpu
def test_gpu_shapes(t, dh):
    _check(b=3, t=t, n=23, h=4, dh=dh, order="time_major", with_cls=True, dtype=torch.bfloat16,
           view="wide")


@pytest.mark.gpu
@needs_gpu
def test_gpu_int64_offsets():
    """A batch stride beyond 2**31 elements: offsets must not wrap in 32 bits."""
    b, t, n, h, dh = 2, 8, 7, 2, 64
    length, width = n * t + 1, 3 * h * dh
    stride_b = 2 ** 31 + 1024
    storage = torch.zeros(stride_b + length * width, dtype=torch.float16, device="cuda")
    qkv = storage.as_strided((b, length, width), (stride_b, width, 1))
    qkv.copy_(torch.randn(b, length, width, device="cuda", dtype=torch.float16))
    groups = temporal_groups(b, length, t, h, dh, "space_major", True)
    out, lse = temporal.temporal_fwd(qkv, groups, dh ** -0.5)
    dout = torch.randn_like(out)
    dqkv = temporal.temporal_bwd(dout, qkv, lse, groups, dh ** -0.5)
    x = qkv.detach().double().requires_grad_(True)
    ref = ref_temporal_attention(x, t, h, dh ** -0.5, "space_major", True)
    (dref,) = torch.autograd.grad(ref, x, dout.double())
    torch.testing.assert_close(out.double(), ref, atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(dqkv.double(), dref, atol=2e-2, rtol=2e-2)
