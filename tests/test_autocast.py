"""Autocast: inside an autocast region the ops run in its dtype with fp32 softmax statistics,
like SDPA; gradients flow back to the fp32 leaf. CPU: bf16 with the torch backend, fp16 with
Triton under its interpreter; GPU: fp16 and bf16 with Triton."""
import pytest
import torch

import timesformer_kernels as tk
import timesformer_kernels.ops  # noqa: F401  (registers torch.ops.timesformer_kernels.*)
from reference import ref_spatial_attention, ref_temporal_attention

OPS = torch.ops.timesformer_kernels


def _qkv(b, t, n, h, dh, seed=0, device="cpu", qk_gain=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1 + n * t, 3, h * dh, generator=g)
    x[:, :, :2] *= qk_gain  # sharper softmax than unit-variance inputs give
    return x.flatten(2).to(device).requires_grad_(True)


def _run_both(qkv, t, h, backend, order="space_major"):
    out, cls_out = tk.spatial_attention(qkv, t, h, token_order=order, backend=backend)
    tout = tk.temporal_attention(qkv, t, h, token_order=order, with_cls=True, backend=backend)
    return out, cls_out, tout


def _refs(x, t, h, order="space_major", compute_dtype=torch.float64):
    out, cls_out = ref_spatial_attention(x, t, h, token_order=order, compute_dtype=compute_dtype)
    return out, cls_out, ref_temporal_attention(x, t, h, token_order=order, with_cls=True,
                                                compute_dtype=compute_dtype)


def _rel_err(a, r):
    a, r = a.detach().double().cpu(), r.detach().double().cpu()
    return ((a - r).abs().max() / r.abs().max()).item()


def _check_autocast(device, dtype, backend, t=4, n=16, h=2, dh=64, seeds=(0, 1, 2), order="space_major"):
    """Outputs in the autocast dtype; forward within that dtype's rounding of the fp64 reference
    on the same rounded input (and, on the CPU, clearly closer than scores and softmax computed
    in the low dtype: on a GPU the custom op's fp32 lse is checked instead); d(qkv) in the
    leaf's fp32, within tolerance of the reference gradient."""
    eps = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    for seed in seeds:
        qkv = _qkv(2, t, n, h, dh, seed=seed, device=device)
        with torch.autocast(device, dtype=dtype):
            outs = _run_both(qkv, t, h, backend, order)
        assert [o.dtype for o in outs] == [dtype] * 3
        xr = qkv.detach().to(dtype).double().requires_grad_(True)  # what the op sees
        refs = _refs(xr, t, h, order)
        low = _refs(qkv.detach().to(dtype), t, h, order, compute_dtype=dtype)  # everything in the low dtype
        for i, (o, r, lo) in enumerate(zip(outs, refs, low)):
            err, err_low = _rel_err(o, r), _rel_err(lo, r)
            assert err <= 1.5 * eps, f"output {i} seed {seed}: error {err:.2e} > 1.5 ulp-at-max ({eps:.1e})"
            # fp32 softmax / accumulation: clearly better than doing it all in the low dtype
            assert device != "cpu" or err < 0.6 * err_low, \
                f"output {i} seed {seed}: {err:.2e} vs low-precision softmax {err_low:.2e}"
        g = torch.Generator().manual_seed(seed + 100)
        grads = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(device) for r in refs]
        (dq,) = torch.autograd.grad(outs, qkv, [gr.to(dtype) for gr in grads])
        (dref,) = torch.autograd.grad(refs, xr, grads)
        assert dq.dtype == torch.float32 and torch.isfinite(dq).all()
        assert _rel_err(dq, dref) <= 8 * eps, f"dqkv seed {seed}: error {_rel_err(dq, dref):.2e}"


def test_cpu_bf16_autocast_torch_backend():
    _check_autocast("cpu", torch.bfloat16, "torch")


def test_cpu_fp16_autocast_triton_interpreter():
    """The custom ops under autocast: inputs cast to fp16 before the op, lse stays fp32."""
    if torch.cuda.is_available():
        pytest.skip("the CUDA run of this is test_gpu_autocast_triton")
    _check_autocast("cpu", torch.float16, "triton", t=2, n=6, h=1, dh=32, seeds=(0,))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_autocast_leaves_float64_alone(device):
    """Like SDPA and every autocast op, float64 inputs are not eligible for autocast."""
    qkv = torch.randn(1, 1 + 3 * 2, 3 * 16, dtype=torch.float64, device=device)
    dtype = torch.bfloat16
    with torch.autocast(device, dtype=dtype):
        sdpa = torch.nn.functional.scaled_dot_product_attention(qkv[None], qkv[None], qkv[None])
        out, cls_out = tk.spatial_attention(qkv, 2, 1, backend="torch")
        tout = tk.temporal_attention(qkv, 2, 1, with_cls=True, backend="torch")
    assert sdpa.dtype == torch.float64
    assert (out.dtype, cls_out.dtype, tout.dtype) == (torch.float64,) * 3


def test_no_autocast_no_cast():
    qkv = torch.randn(1, 1 + 3 * 2, 3 * 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert all(o.dtype == torch.float32 for o in _run_both(qkv, 2, 1, "torch"))


def test_block_under_cpu_autocast():
    """A fused block in a bf16 autocast region: its attention runs in bf16 and the block's
    output and gradients stay within bf16 tolerance of the fp32 block."""
    torch.manual_seed(0)
    blk = tk.DividedSpaceTimeBlock(64, 2, 3, qkv_bias=True, backend="torch").train()
    x = torch.randn(2, 1 + 4 * 3, 64, requires_grad=True)
    seen = []
    hook = blk.attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = blk(x)
    hook.remove()
    assert seen == [torch.bfloat16]
    y_ref = blk(x)
    assert y.dtype == torch.float32  # the residual stream stays fp32
    assert _rel_err(y, y_ref) < 2e-2
    g, g_ref = (torch.autograd.grad(v.square().sum(), blk.attn.qkv.weight)[0] for v in (y, y_ref))
    assert _rel_err(g, g_ref) < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", ["space_major", "time_major"])
def test_gpu_autocast_triton(dtype, order):
    _check_autocast("cuda", dtype, "triton", order=order)
    # the custom op itself: outputs in the autocast dtype, softmax statistics (lse) in fp32
    qkv = _qkv(2, 4, 16, 2, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, cls_out, lse, cls_lse = OPS.spatial_attention(qkv.to(dtype), 4, 2, 0.125, order, "triton")
        tout, tlse = OPS.temporal_attention(qkv.to(dtype), 4, 2, 0.125, order, True, "triton")
    assert (out.dtype, cls_out.dtype, tout.dtype) == (dtype,) * 3
    assert (lse.dtype, cls_lse.dtype, tlse.dtype) == (torch.float32,) * 3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_autocast_auto_backend_block(dtype):
    """The default backend under CUDA autocast, through a block, forward and backward."""
    torch.manual_seed(0)
    blk = tk.DividedSpaceTimeBlock(128, 2, 4, qkv_bias=True).cuda()
    x = torch.randn(2, 1 + 8 * 4, 128, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=dtype):
        y = blk(x)
    y_ref = blk(x)
    assert _rel_err(y, y_ref) < 3e-2
    (g,) = torch.autograd.grad(y.float().square().sum(), x)
    assert torch.isfinite(g).all()
