"""Bad input raises ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import timesformer_kernels as tk
from timesformer_kernels import backends

OPS = {
    "temporal": lambda qkv, t=2, h=2, **kw: tk.temporal_attention(qkv, t, h, **kw),
    "spatial": lambda qkv, t=2, h=2, **kw: tk.spatial_attention(qkv, t, h, **kw),
}


def good(op, dtype=torch.float32):
    return torch.randn(2, 1 + 3 * 2, 3 * 2 * 8, dtype=dtype)  # T=2, N=3, H=2, Dh=8, cls first


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad,kwargs,exc,name", [
    ("not a tensor", {}, TypeError, "qkv"),
    (torch.randn(7, 48), {}, ValueError, "qkv"),  # rank 2
    (torch.randn(1, 2, 7, 48), {}, ValueError, "qkv"),  # rank 4
    (torch.randint(0, 3, (2, 7, 48)), {}, TypeError, "dtype"),
    (torch.randn(2, 7, 48, dtype=torch.complex64), {}, TypeError, "dtype"),
    (torch.randn(2, 7, 50), {}, ValueError, "num_heads"),  # channels not 3*H*Dh
    (torch.randn(2, 8, 48), {}, ValueError, "num_frames"),  # 1 + N*T does not fit 8 tokens
    (torch.randn(2, 1, 48), {}, ValueError, "num_frames"),  # no patch token at all
    (torch.randn(2, 48, 7).transpose(1, 2), {}, ValueError, "stride"),
    (torch.randn(0, 7, 48), {}, ValueError, "qkv"),
    (None, {"t": 0}, ValueError, "num_frames"),
    (None, {"t": 2.0}, TypeError, "num_frames"),
    (None, {"h": 0}, ValueError, "num_heads"),
    (None, {"h": True}, TypeError, "num_heads"),
    (None, {"token_order": "frame_major"}, ValueError, "token_order"),
    (None, {"backend": "cudnn"}, ValueError, "backend"),
    (None, {"scale": "big"}, TypeError, "scale"),
    (None, {"scale": float("nan")}, TypeError, "scale"),
])
def test_bad_input_names_the_argument(op, bad, kwargs, exc, name):
    qkv = good(op) if bad is None else bad
    if op == "temporal":  # same token layouts as spatial: cls first
        kwargs = {"with_cls": True, **kwargs}
    with pytest.raises(exc, match=name):
        OPS[op](qkv, **kwargs)


def test_temporal_token_count_without_cls():
    with pytest.raises(ValueError, match="num_frames"):
        tk.temporal_attention(torch.randn(1, 7, 48), 2, 2)  # 7 is not N*2
    with pytest.raises(TypeError, match="with_cls"):
        tk.temporal_attention(torch.randn(1, 6, 48), 2, 2, with_cls=1)


@pytest.mark.parametrize("op", OPS)
def test_backend_that_cannot_run_says_why(op, monkeypatch):
    monkeypatch.setattr(backends, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="backend='triton'.*TRITON_INTERPRET"):
        OPS[op](good(op), backend="triton", **({"with_cls": True} if op == "temporal" else {}))


@pytest.mark.parametrize("op", OPS)
def test_cuda_backend_on_cpu_tensor_says_why(op):
    kw = {"with_cls": True} if op == "temporal" else {}
    with pytest.raises(ValueError, match="backend='cuda'"):
        OPS[op](good(op), backend="cuda", **kw)


def test_unsupported_head_dim_on_triton():
    qkv = torch.randn(1, 1 + 2, 3 * 12)  # Dh = 12: not a multiple of 8
    with pytest.raises(ValueError, match="head_dim"):
        tk.spatial_attention(qkv, 2, 1, backend="triton")
