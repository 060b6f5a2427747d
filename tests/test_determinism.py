"""Determinism of the Triton backend: repeated forward and backward passes give bit-identical
outputs and d(qkv). The cls token's gradient is a reduction over every group of a clip (per-
group / per-chunk partial sums, added up in a fixed order), which is where atomics would make
it run-to-run nondeterministic. Shapes span several tiles, chunks and groups per clip."""
import pytest
import torch

import timesformer_kernels as tk

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
ORDERS = ["space_major", "time_major"]


def _qkv(b, length, h, dh, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, 3 * h * dh, generator=g).to(DEVICE, dtype).requires_grad_(True)


def _grads(outs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(DEVICE, o.dtype) for o in outs]


def _assert_bitwise(runs, what):
    first = runs[0]
    for i, other in enumerate(runs[1:], 1):
        for j, (a, b) in enumerate(zip(first, other)):
            assert torch.equal(a, b), f"{what}: run {i} tensor {j} differs by up to {(a - b).abs().max()}"


def _check(fn, qkv):
    """Two fresh forward+backward passes, the first one backpropagated twice through one graph."""
    results = []
    for run in range(2):
        outs = fn(qkv)
        grads = _grads(outs)
        (dq,) = torch.autograd.grad(outs, qkv, grads, retain_graph=run == 0)
        if run == 0:
            (dq_again,) = torch.autograd.grad(outs, qkv, grads)
            _assert_bitwise([(dq,), (dq_again,)], "two backward passes of one graph")
        results.append((*(o.detach() for o in outs), dq))
    _assert_bitwise(results, "forward+backward")
    assert results[0][-1][:, 0].abs().max() > 0  # the cls reduction really ran


def _shape(big, small):
    return big if DEVICE == "cuda" else small


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_temporal_with_cls_is_deterministic(order, dtype):
    # CPU: 2 clips x 40 patches x T=2 = 80 rows a clip: three 32-row tiles, several cls chunks
    b, t, n, h, dh = _shape((4, 8, 196, 12, 64), (2, 2, 40, 2, 16))
    qkv = _qkv(b, 1 + n * t, h, dh, dtype)
    _check(lambda x: (tk.temporal_attention(x, t, h, token_order=order, with_cls=True, backend="triton"),), qkv)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("order", ORDERS)
def test_spatial_is_deterministic(order, dtype):
    # CPU: 3 frame groups of 1 + 20 rows: two 16-row tiles each; the cls gradient sums 3 groups
    b, t, n, h, dh = _shape((4, 8, 196, 12, 64), (1, 3, 20, 1, 16))
    qkv = _qkv(b, 1 + n * t, h, dh, dtype)
    _check(lambda x: tk.spatial_attention(x, t, h, token_order=order, backend="triton"), qkv)


@pytest.mark.gpu  # the interpreter runs programs one after another: only a GPU can race here
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_temporal_with_cls_is_deterministic(dtype):
    """T > 128 goes to the flash kernel with the cls key: its cls share is per group too."""
    b, t, n, h, dh = 2, 160, 8, 4, 64
    qkv = _qkv(b, 1 + n * t, h, dh, dtype)
    _check(lambda x: (tk.temporal_attention(x, t, h, token_order="time_major", with_cls=True,
                                            backend="triton"),), qkv)
