"""tk.patch / tk.unpatch on mmaction2's DividedTemporalAttentionWithNorm and
DividedSpatialAttentionWithNorm, loaded file by file (tests/mmaction_loader.py), stacked the
way mmaction2's TimeSformer backbone stacks them (mmcv BaseTransformerLayer with
operation_order ('self_attn', 'self_attn', 'ffn'))."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mmaction_loader import load_mmaction_transformer, mmaction_available

from bf16_check import assert_kernels_ran, check_patched_bf16

import timesformer_kernels as tk
from timesformer_kernels.integrations import mmaction, patch_summary

if not mmaction_available():
    pytest.skip("mmaction2 transformer.py cannot be loaded (see tests/mmaction_loader.py)", allow_module_level=True)

from mmcv.cnn.bricks.transformer import build_transformer_layer_sequence  # noqa: E402

MT = load_mmaction_transformer()
TOL = dict(atol=2e-4, rtol=2e-4)


def build(t, dim=32, heads=2, depth=2, drop_path=0.0, proj_drop=0.0, attn_drop=0.0, dropout_type="DropPath",
          seed=0, **mha):
    """A small random mmaction2 TimeSformer encoder (tokens (B, 1 + N·T, dim) space-major)."""
    torch.manual_seed(seed)
    drop = dict(type=dropout_type, drop_prob=drop_path)
    common = dict(embed_dims=dim, num_heads=heads, num_frames=t, attn_drop=attn_drop, proj_drop=proj_drop,
                  dropout_layer=drop, norm_cfg=dict(type="LN", eps=1e-6), **mha)
    layer = dict(type="BaseTransformerLayer",
                 attn_cfgs=[dict(type=MT.DividedTemporalAttentionWithNorm, **common),
                            dict(type=MT.DividedSpatialAttentionWithNorm, **common)],
                 ffn_cfgs=dict(type=MT.FFNWithNorm, embed_dims=dim, feedforward_channels=2 * dim,
                               act_cfg=dict(type="GELU"), dropout_layer=dict(type="DropPath", drop_prob=drop_path),
                               norm_cfg=dict(type="LN", eps=1e-6)),
                 operation_order=("self_attn", "self_attn", "ffn"))
    model = build_transformer_layer_sequence(
        dict(type="TransformerLayerSequence", transformerlayers=[layer] * depth, num_layers=depth))
    with torch.no_grad():  # temporal_fc is zero-initialised upstream: randomise everything
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


def run(model, x, seed=1):
    """Output, input grad and every parameter's grad of one forward+backward under ``seed``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x, None, None)
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_same(a, b, tol=TOL):
    out_a, dx_a, g_a = a
    out_b, dx_b, g_b = b
    torch.testing.assert_close(out_a, out_b, **tol)
    torch.testing.assert_close(dx_a, dx_b, **tol)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        assert (g_a[name] is None) == (g_b[name] is None), name
        if g_a[name] is not None:
            torch.testing.assert_close(g_a[name], g_b[name], **tol, msg=lambda m: f"{name}: {m}")


def tokens(t, n, dim=32, b=2, seed=2):
    torch.manual_seed(seed)
    return torch.randn(b, 1 + n * t, dim)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_loaded_file_by_file_and_matched_by_name():
    assert "mmaction.models" not in __import__("sys").modules  # the package itself was not imported
    model = build(3)
    tk.patch(model, backend="torch")
    assert patch_summary(model) == {"mmaction": 4}
    assert not mmaction.matches(nn.MultiheadAttention(8, 2))
    assert not mmaction.matches(model.layers[0].ffns[0])


# (T, N, train, variant): T in {1, 3, 4}, N not a square; train mode with drop-path, and in
# one case proj_drop and mmcv's elementwise Dropout as the dropout layer.
CASES = [
    (1, 6, False, {}),
    (3, 5, True, dict(drop_path=0.3)),
    (4, 6, True, dict(drop_path=0.3, proj_drop=0.2)),
    (3, 6, True, dict(drop_path=0.3, proj_drop=0.2, dropout_type="Dropout")),
    (4, 5, False, dict(drop_path=0.3, proj_drop=0.2, attn_drop=0.1)),  # dropouts are off in eval: fused
    (3, 5, False, dict(bias=False)),  # no in_proj_bias / out_proj.bias
]


@pytest.mark.parametrize("t,n,train,variant", CASES)
def test_matches_unpatched_torch(t, n, train, variant, fallback_warnings):
    model = build(t, **variant).train(train)
    x = tokens(t, n)
    ref = run(model, x)
    tk.patch(model, backend="torch")
    assert_same(run(model, x), ref)
    assert not fallback_warnings()
    if train and variant.get("drop_path"):
        # the masks really drop something under this seed: another seed gives another output
        assert not torch.allclose(run(model, x, seed=5)[0], ref[0], **TOL)


@pytest.mark.parametrize("t,n,train", [(3, 5, True), (4, 6, False), (1, 3, False)])
def test_matches_unpatched_triton(t, n, train):
    # Tiny: the Triton interpreter is slow on CPU. head_dim 8 (a multiple of 8).
    model = build(t, dim=16, heads=2, depth=1, drop_path=0.3).train(train)
    x = tokens(t, n, dim=16, b=1)
    ref = run(model, x)
    tk.patch(model, backend="triton")
    assert_same(run(model, x), ref)


def test_state_dict_patch_twice_and_unpatch():
    model = build(3, drop_path=0.2).train()
    x = tokens(3, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = run(model, x)
    forwards = {id(m): m.__dict__.get("forward") for m in model.modules()}
    tk.patch(model, backend="torch")
    tk.patch(model, backend="torch")  # twice: harmless
    assert patch_summary(model) == {"mmaction": 4}
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert_same(run(model, x), ref)
    # checkpoints load into the patched model
    model.load_state_dict(before)
    tk.unpatch(model)
    assert patch_summary(model) == {}
    assert {id(m): m.__dict__.get("forward") for m in model.modules()} == forwards
    again = run(model, x)
    assert_same(again, ref, tol=dict(atol=0, rtol=0))  # the original code again, bit for bit


def test_attention_dropout_in_training_falls_back(fallback_warnings):
    model = build(3, attn_drop=0.3, drop_path=0.2).train()
    x = tokens(3, 5)
    ref = run(model, x)
    tk.patch(model, backend="torch")
    got = run(model, x)
    got2 = run(model, x)
    assert_same(got, ref, tol=dict(atol=0, rtol=0))  # the original forward ran, same draws
    assert_same(got2, ref, tol=dict(atol=0, rtol=0))
    messages = fallback_warnings()
    assert len(messages) == 2, messages  # once per module kind, not per call or per layer
    assert all("attention dropout" in m for m in messages)
    # in eval mode the same modules run fused, without a warning
    model.eval()
    tk.unpatch(model)
    ref_eval = run(model, x)
    tk.patch(model, backend="torch")
    assert_same(run(model, x), ref_eval)
    assert fallback_warnings() == messages


def test_unsupported_mha_options_fall_back(fallback_warnings):
    # add_bias_kv adds a learned key/value row the packed layout lacks.
    model = build(1, add_bias_kv=True).eval()
    x = tokens(1, 4)
    ref = run(model, x)
    tk.patch(model, backend="torch")
    assert_same(run(model, x), ref, tol=dict(atol=0, rtol=0))
    messages = fallback_warnings()
    assert len(messages) == 2 and all("options" in m for m in messages), messages


def test_rejected_calls_run_the_original():
    model = build(3)
    layer = model.layers[0].attentions[0]
    tk.patch(model, backend="torch")
    x = tokens(3, 4)
    with pytest.raises(AssertionError):  # upstream: 'Always adding the shortcut in the forward function'
        layer(x, residual=x)
    with pytest.raises(RuntimeError):  # 1 + 13 tokens is not 1 + N·3: upstream's reshape fails
        layer(torch.randn(2, 14, 32))


# ------------------------------------------------------------------ GPU: bf16 autocast on CUDA
# Run by ``pytest -m gpu`` on a machine with a CUDA device (skipped elsewhere by conftest.py).
GPU = "cuda"  # every tensor and model of the GPU test goes here (one constant: nothing left on the CPU)
GPU_FRAMES, GPU_PATCHES = 8, 42  # T = 8; N = 42 (a 6 x 7 grid: not a square)


def make_gpu_model(drop_path=0.3, seed=0):
    """Moderately sized, on the GPU: dim 256, 4 heads of 64, T = 8, 2 layers, drop-path everywhere."""
    model = build(GPU_FRAMES, dim=256, heads=4, depth=2, drop_path=drop_path, seed=seed)
    with torch.no_grad():  # build's 0.15 makes a peaked softmax at dim 256: smaller random weights
        for name, p in model.named_parameters():
            p.copy_(1 + 0.05 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return model.to(GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_bf16_matches_unpatched(backend, train, resolved_backends, fallback_warnings):
    """Forward, the input's and every parameter's gradient on CUDA under bf16 autocast, patched
    vs unpatched (mmcv DropPath drawing in train mode); criteria in assert_bf16_equivalent."""
    model = make_gpu_model().train(train)
    x = tokens(GPU_FRAMES, GPU_PATCHES, dim=256).to(GPU)
    patched = tk.patch(copy.deepcopy(model), backend=backend)
    assert patch_summary(patched) == {"mmaction": 4}
    check_patched_bf16(model, patched, lambda m, x: {"out": m(x, None, None)}, x, train, seed=1)
    assert_kernels_ran(resolved_backends, backend, 4)  # one op in each of the 2 x 2 attention modules
    assert not fallback_warnings()
