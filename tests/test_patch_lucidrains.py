"""tk.patch / tk.unpatch on lucidrains' TimeSformer-pytorch (PyPI timesformer-pytorch 0.4.1):
time and space attention of every layer, rotary embeddings, token shift, the padding mask
(falls back in time attention), dropout on to_out."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bf16_check import assert_kernels_ran, check_patched_bf16

import timesformer_kernels as tk
from timesformer_kernels.integrations import lucidrains, patch_summary

timesformer_pytorch = pytest.importorskip("timesformer_pytorch")
TimeSformer = timesformer_pytorch.TimeSformer
TOL = dict(atol=2e-4, rtol=2e-4)


pytestmark = pytest.mark.usefixtures("one_thread")


def build(t, dim=32, heads=2, dim_head=16, depth=2, seed=0, **kw):
    torch.manual_seed(seed)
    return TimeSformer(dim=dim, num_frames=t, num_classes=5, image_size=12, patch_size=4, depth=depth,
                       heads=heads, dim_head=dim_head, **kw)


def video(t, b=2, h=8, w=12, seed=3):
    """Patches 4x4: an 8x12 frame has N = 2·3 = 6 patches (not a square)."""
    torch.manual_seed(seed)
    return torch.randn(b, t, 3, h, w)


def run(model, x, mask=None, seed=1):
    """Logits, the last layer's tokens (every attention output reaches them), the video's grad
    and every parameter's grad of one forward+backward under ``seed``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    seen = []
    hook = model.layers[-1][2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        torch.manual_seed(seed)
        logits = model(x, mask=mask)
    finally:
        hook.remove()
    tok = seen[0]
    loss = (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum()
    loss = loss + (tok * torch.linspace(-1, 1, tok.numel()).view_as(tok)).sum()
    loss.backward()
    return [logits.detach(), tok.detach(), x.grad], {n: p.grad for n, p in model.named_parameters()}


def assert_same(a, b, tol=TOL):
    for u, v in zip(a[0], b[0]):
        torch.testing.assert_close(u, v, **tol)
    assert a[1].keys() == b[1].keys()
    for name, g in a[1].items():
        assert (g is None) == (b[1][name] is None), name
        if g is not None:
            torch.testing.assert_close(g, b[1][name], **tol, msg=lambda m: f"{name}: {m}")


# (T, train, options): T in {1, 3, 4}; rotary on (the default) and off; token shift; dropout
# on to_out in training; head dim 10, where the axial rotary covers 8 of the 10 dims.
CASES = [
    (1, False, {}),
    (3, True, dict(attn_dropout=0.2, ff_dropout=0.1)),
    (4, False, dict(rotary_emb=False)),
    (4, True, dict(shift_tokens=True, attn_dropout=0.2)),
    (3, False, dict(dim_head=10, shift_tokens=True)),
]


@pytest.mark.parametrize("t,train,options", CASES)
def test_matches_unpatched_torch(t, train, options, fallback_warnings):
    model = build(t, **options).train(train)
    x = video(t)
    ref = run(model, x)
    tk.patch(model, backend="torch")
    assert patch_summary(model) == {"lucidrains": 4}
    assert_same(run(model, x), ref)
    assert not fallback_warnings()
    if train:  # the dropout masks really drop something: another seed gives another result
        assert not torch.allclose(run(model, x, seed=7)[0][1], ref[0][1], **TOL)


@pytest.mark.parametrize("t,train", [(3, True), (1, False), (4, False)])
def test_matches_unpatched_triton(t, train):
    # Tiny: the Triton interpreter is slow on CPU. head_dim 8 (a multiple of 8), rotary on.
    model = build(t, dim=16, heads=2, dim_head=8, depth=1, attn_dropout=0.2).train(train)
    x = video(t, b=1)
    ref = run(model, x)
    tk.patch(model, backend="triton")
    assert_same(run(model, x), ref)


def test_state_dict_patch_twice_and_unpatch():
    model = build(3).train()
    x = video(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = run(model, x)
    forwards = {id(m): m.__dict__.get("forward") for m in model.modules()}
    tk.patch(model, backend="torch")
    tk.patch(model, backend="torch")  # twice: harmless
    assert patch_summary(model) == {"lucidrains": 4}
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert_same(run(model, x), ref)
    model.load_state_dict(before)
    tk.unpatch(model)
    assert patch_summary(model) == {}
    assert {id(m): m.__dict__.get("forward") for m in model.modules()} == forwards
    assert_same(run(model, x), ref, tol=dict(atol=0, rtol=0))  # the original code again, bit for bit


@pytest.mark.parametrize("t", [3, 1])
def test_padding_mask_falls_back_in_time_attention(t, fallback_warnings):
    model = build(t).train()
    x = video(t, b=3)
    mask = torch.ones(3, t, dtype=torch.bool)
    mask[1, -1] = False
    mask[2, 1:] = False
    ref = run(model, x, mask=mask)
    tk.patch(model, backend="torch")
    got = run(model, x, mask=mask)
    run(model, x, mask=mask)
    # time attention ran the original; space attention stayed fused (its cls_mask is supported)
    assert_same(got, ref)
    messages = fallback_warnings()
    assert len(messages) == 1 and "padding mask" in messages[0], messages


def test_unrecognised_pattern_falls_back(fallback_warnings):
    model = build(3)
    attn = model.layers[0][1].fn
    tk.patch(model, backend="torch")
    x = torch.randn(2, 1 + 6 * 3, 32)
    got = attn(x, "b (f n) d", "(b f) n d", f=3, n=6)  # both sizes given: legal einops, not recognised
    tk.unpatch(model)
    ref = attn(x, "b (f n) d", "(b f) n d", f=3, n=6)
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    messages = fallback_warnings()
    assert len(messages) == 1 and "einops patterns" in messages[0], messages


def test_matches_only_lucidrains_attention():
    class Attention(nn.Module):  # a same-named attention of another code base
        def __init__(self):
            super().__init__()
            self.heads, self.scale = 2, 0.25
            self.to_qkv, self.to_out = nn.Linear(8, 24, bias=False), nn.Linear(8, 8)

        def forward(self, x):
            return x

    assert not lucidrains.matches(Attention())
    assert lucidrains.matches(build(1, depth=1).layers[0][0].fn)
    with pytest.raises(ValueError):
        tk.patch(nn.Sequential(Attention()))


# ------------------------------------------------------------------ GPU: bf16 autocast on CUDA
# Run by ``pytest -m gpu`` on a machine with a CUDA device (skipped elsewhere by conftest.py).
GPU = "cuda"  # every tensor and model of the GPU test goes here (one constant: nothing left on the CPU)
GPU_FRAMES, GPU_PIXELS = 8, (48, 56)  # T = 8; 8x8 patches: a 6 x 7 grid, N = 42 (not a square)


def make_gpu_model(seed=0):
    """Moderately sized, on the GPU: dim 256, 4 heads of 64, T = 8, 2 layers, rotary on (the
    default), dropout 0.1 on to_out (drawn in train mode; the model has no drop-path)."""
    torch.manual_seed(seed)
    model = TimeSformer(dim=256, num_frames=GPU_FRAMES, num_classes=10, image_size=56, patch_size=8, depth=2,
                        heads=4, dim_head=64, attn_dropout=0.1)
    with torch.no_grad():  # larger than the default init, so that the attention is not near uniform
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(GPU)


def _logits_and_tokens(model, x):
    """The logits, and the last layer's input tokens (every attention output reaches them)."""
    seen = []
    hook = model.layers[-1][2].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return {"out.logits": logits, "out.tokens": seen[0]}


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_bf16_matches_unpatched(backend, train, resolved_backends, fallback_warnings):
    """Logits, last-layer tokens, the video's and every parameter's gradient on CUDA under bf16
    autocast, patched vs unpatched (rotary on, to_out dropout drawing in train mode); criteria
    in assert_bf16_equivalent."""
    model = make_gpu_model().train(train)
    x = video(GPU_FRAMES, b=2, h=GPU_PIXELS[0], w=GPU_PIXELS[1]).to(GPU)
    patched = tk.patch(copy.deepcopy(model), backend=backend)
    assert patch_summary(patched) == {"lucidrains": 4}
    check_patched_bf16(model, patched, _logits_and_tokens, x, train, seed=1, allow_unused=True)
    assert_kernels_ran(resolved_backends, backend, 4)  # time and space attention of 2 layers
    assert not fallback_warnings()
