"""torch.library custom ops: opcheck, and torch.compile(fullgraph=True) of the modules with no
graph break, no recompilation, and the eager outputs and gradients."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import timesformer_kernels as tk
import timesformer_kernels.ops  # noqa: F401  (registers torch.ops.timesformer_kernels.*)

OPS = torch.ops.timesformer_kernels
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32


def _qkv(b, length, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, c, generator=g).to(DEVICE, DTYPE)


@pytest.mark.parametrize("order", ["space_major", "time_major"])
def test_opcheck_temporal(order):
    qkv = _qkv(2, 1 + 3 * 2, 3 * 2 * 16).requires_grad_(True)
    args = (qkv, 2, 2, 0.25, order, True, "triton")
    torch.library.opcheck(OPS.temporal_attention, args)
    out, lse = OPS.temporal_attention(*args)
    bwd_args = (torch.randn_like(out), qkv.detach(), out.detach(), lse, 2, 2, 0.25, order, True, "triton")
    torch.library.opcheck(OPS.temporal_attention_backward, bwd_args)


@pytest.mark.parametrize("order", ["space_major", "time_major"])
def test_opcheck_spatial(order):
    qkv = _qkv(2, 1 + 3 * 2, 3 * 2 * 16).requires_grad_(True)
    args = (qkv, 2, 2, 0.25, order, "triton")
    torch.library.opcheck(OPS.spatial_attention, args)
    out, cls_out, lse, cls_lse = (o.detach() for o in OPS.spatial_attention(*args))
    bwd_args = (torch.randn_like(out), torch.randn_like(cls_out), qkv.detach(), out, cls_out, lse, cls_lse,
                2, 2, 0.25, order, "triton")
    torch.library.opcheck(OPS.spatial_attention_backward, bwd_args)


def _run(model, x):
    y = model(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *model.parameters()])
    return y, grads


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_block_fullgraph(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    blk = tk.DividedSpaceTimeBlock(32, 2, 3, qkv_bias=True, backend=backend).to(DEVICE).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(blk, backend=counter, fullgraph=True)
    for b in (2, 2):  # the second call with the same shapes must not recompile
        x = _qkv(b, 1 + 4 * 3, 32).requires_grad_(True)
        y, grads = _run(compiled, x)
        y_ref, grads_ref = _run(blk, x)
        torch.testing.assert_close(y, y_ref)
        for g, gr in zip(grads, grads_ref):
            torch.testing.assert_close(g, gr)
    assert counter.frame_count == 1


def test_compile_dynamic_batch():
    """One graph for several batch sizes with dynamic=True."""
    torch._dynamo.reset()
    blk = tk.DividedSpaceTimeBlock(32, 2, 2, backend="triton").to(DEVICE).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(blk, backend=counter, fullgraph=True, dynamic=True)
    counts = []
    for b in (2, 3, 5):  # (sizes 0 and 1 are always specialised by dynamo)
        x = _qkv(b, 1 + 3 * 2, 32)
        torch.testing.assert_close(compiled(x), blk(x))
        counts.append(counter.frame_count)
    assert counts[0] >= 1 and counts == counts[:1] * 3, counts  # nothing compiled after the first call


def test_compile_inductor_ops():
    """The default inductor backend compiles a graph around the custom ops."""
    torch._dynamo.reset()

    def f(qkv):
        out, cls_out = tk.spatial_attention(qkv * 2, 2, 2, backend="triton")
        return out.sum() + cls_out.sum() + tk.temporal_attention(qkv[:, 1:], 2, 2, backend="triton").sum()

    qkv = _qkv(1, 1 + 2 * 2, 3 * 2 * 16)
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(qkv), f(qkv))
