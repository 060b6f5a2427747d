"""nn.Modules: parameter names of the official checkpoint, and the block's maths (eval and
train with drop-path) vs a block written here from the einsum reference."""
import pytest
import torch
import torch.nn.functional as F

import timesformer_kernels as tk
from reference import ref_spatial_attention, ref_temporal_attention

BACKENDS = ["torch", "triton"]
OFFICIAL_BLOCK_KEYS = {
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "temporal_norm1.weight", "temporal_norm1.bias", "temporal_attn.qkv.weight", "temporal_attn.qkv.bias",
    "temporal_attn.proj.weight", "temporal_attn.proj.bias", "temporal_fc.weight", "temporal_fc.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
}


def _drop(x, batch, p, training):
    """timm-style DropPath on a batch of ``batch`` samples, as the official code draws it."""
    if not training or p == 0:
        return x
    keep = 1 - p
    m = (keep + torch.rand((batch, 1, 1), dtype=x.dtype)).floor_() / keep
    return x * m


def reference_block(blk: tk.DividedSpaceTimeBlock, x, t, h):
    """The official divided space-time block, written with the einsum reference (space-major)."""
    b, length, d = x.shape
    n = (length - 1) // t
    p, tr = blk.drop_path, blk.training
    # temporal: (B·N, T, D) sequences
    xt = x[:, 1:]
    qkv = F.linear(blk.temporal_norm1(xt), blk.temporal_attn.qkv.weight, blk.temporal_attn.qkv.bias)
    res = blk.temporal_attn.proj(ref_temporal_attention(qkv, t, h, compute_dtype=x.dtype))
    res = _drop(res.reshape(b * n, t, d), b * n, p, tr).reshape(b, n * t, d)
    xt = x[:, 1:] + blk.temporal_fc(res)
    # spatial: cls repeated per frame, outputs averaged over frames
    xs = torch.cat([x[:, :1], xt], 1)
    out, cls_out = ref_spatial_attention(blk.attn.qkv(blk.norm1(xs)), t, h, compute_dtype=x.dtype)
    out, cls_out = blk.attn.proj(out), blk.attn.proj(cls_out)  # (B, N·T, D), (B, T, D)
    frames = torch.cat([cls_out.unsqueeze(2), out.reshape(b, n, t, d).permute(0, 2, 1, 3)], 2)  # (B,T,1+N,D)
    frames = _drop(frames.reshape(b * t, 1 + n, d), b * t, p, tr).reshape(b, t, 1 + n, d)
    cls_res = frames[:, :, 0].mean(1, keepdim=True)
    res = frames[:, :, 1:].permute(0, 2, 1, 3).reshape(b, n * t, d)
    x = xs + torch.cat([cls_res, res], 1)
    return x + _drop(blk.mlp(blk.norm2(x)), b, p, tr)


def test_block_loads_official_names():
    blk = tk.DividedSpaceTimeBlock(32, 2, 3, qkv_bias=True)
    assert set(blk.state_dict()) == OFFICIAL_BLOCK_KEYS
    blk.load_state_dict({k: torch.randn_like(v) for k, v in blk.state_dict().items()})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True])
def test_block_matches_reference(backend, training):
    t, n, h, d = 3, 5, 2, 32
    torch.manual_seed(0)
    blk = tk.DividedSpaceTimeBlock(d, h, t, qkv_bias=True, drop_path=0.3 if training else 0.0,
                                   backend=backend).double().train(training)
    x = torch.randn(4, 1 + n * t, d, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = blk(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *blk.parameters()])
    torch.manual_seed(1)
    y_ref = reference_block(blk, x, t, h)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *blk.parameters()])
    torch.testing.assert_close(y, y_ref, atol=1e-9, rtol=1e-9)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-8, rtol=1e-8)
    if training:  # the drop-path really dropped something, else this test could not fail
        assert not torch.allclose(y, blk.eval()(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["space_major", "time_major"])
def test_attention_modules(backend, order):
    t, n, h, d = 2, 3, 2, 32
    temporal = tk.DividedTemporalAttention(d, h, t, qkv_bias=True, token_order=order, with_cls=True,
                                           backend=backend).double()
    spatial = tk.DividedSpatialAttention(d, h, t, qk_scale=0.5, token_order=order, backend=backend).double()
    x = torch.randn(2, 1 + n * t, d, dtype=torch.float64)
    expect = temporal.proj(ref_temporal_attention(temporal.qkv(x), t, h, token_order=order, with_cls=True))
    torch.testing.assert_close(temporal(x), expect)
    out, cls_out = spatial(x)
    r_out, r_cls = ref_spatial_attention(spatial.qkv(x), t, h, scale=0.5, token_order=order)
    torch.testing.assert_close(out, spatial.proj(r_out))
    torch.testing.assert_close(cls_out, spatial.proj(r_cls))


def test_module_rejects_bad_dim():
    with pytest.raises(ValueError, match="num_heads"):
        tk.DividedTemporalAttention(30, 4, 2)


@pytest.mark.parametrize("make,exc,name", [
    (lambda: tk.DividedTemporalAttention(32, 0, 2), ValueError, "num_heads"),
    (lambda: tk.DividedSpatialAttention(32, True, 2), TypeError, "num_heads"),
    (lambda: tk.DividedSpaceTimeBlock(32, 2, 0)(torch.randn(1, 5, 32)), ValueError, "num_frames"),
])
def test_module_bad_arguments_name_the_argument(make, exc, name):
    with pytest.raises(exc, match=name):
        make()
