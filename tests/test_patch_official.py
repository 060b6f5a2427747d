"""tk.patch / tk.unpatch on blocks of the official TimeSformer structure (tests/official_block.py):
outputs and every parameter gradient vs. the unpatched model, drop-path included, the state
dict, unpatch, the fallbacks, and what is left alone."""
import copy
import warnings

import pytest
import torch
from torch import nn

from bf16_check import assert_kernels_ran, check_patched_bf16

import timesformer_kernels as tk
from official_block import Block, TinyTimeSformer
from timesformer_kernels.integrations import official, patch_summary

TOL = dict(atol=2e-4, rtol=2e-4)
HEIGHT, WIDTH = 2, 3  # a non-square patch grid: N = 6


pytestmark = pytest.mark.usefixtures("fresh_warnings")


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TinyTimeSformer(**kwargs)
    with torch.no_grad():  # the official init zeroes temporal_fc of later blocks: use random weights
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_tokens(batch, frames, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1 + HEIGHT * WIDTH * frames, 32, generator=g)


def run(model, x, frames, seed=123):
    """Output and d(loss)/d(every parameter) under a fixed seed (drop-path draws)."""
    torch.manual_seed(seed)
    out = model(x, frames, WIDTH)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), params)
    return out.detach(), grads


def assert_same(a, b, exact=False):
    (out_a, grads_a), (out_b, grads_b) = a, b
    if exact:
        assert torch.equal(out_a, out_b)
        assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
        return
    torch.testing.assert_close(out_b, out_a, **TOL)
    assert len(grads_a) == len(grads_b)
    for i, (x, y) in enumerate(zip(grads_a, grads_b)):
        torch.testing.assert_close(y, x, **TOL, msg=lambda m: f"parameter {i}: {m}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("frames", [1, 3, 4])
def test_matches_unpatched_torch(frames, train, fused_calls):
    model = make_model(drop_path_rate=0.3).train(train)
    x = make_tokens(2, frames)
    ref = run(model, x, frames)
    tk.patch(model, backend="torch")
    assert patch_summary(model) == {"official": 2}
    assert_same(ref, run(model, x, frames))
    assert len(fused_calls) == 2
    if train:  # drop-path really draws: another seed gives another output
        assert not torch.allclose(run(model, x, frames, seed=7)[0], ref[0])


@pytest.mark.parametrize("frames,train", [(3, True), (4, False)])
def test_matches_unpatched_triton(frames, train, fused_calls):
    model = make_model(drop_path_rate=0.3).train(train)
    x = make_tokens(1, frames)
    ref = run(model, x, frames)
    tk.patch(model, backend="triton")
    assert_same(ref, run(model, x, frames))
    assert len(fused_calls) == 2


def test_qk_scale_and_heads_respected():
    model = make_model(qk_scale=0.3, num_heads=4).train()
    x = make_tokens(2, 3)
    ref = run(model, x, 3)
    tk.patch(model, backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(model, x, 3)
    assert_same(ref, got)
    assert not caught  # fused, no fallback


def test_state_dict_unchanged():
    model = make_model(drop_path_rate=0.3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tk.patch(model, backend="torch")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = make_model(seed=5)
    fresh.load_state_dict(after)  # a patched model's checkpoint loads into an unpatched one
    tk.patch(fresh, backend="torch").load_state_dict(before)  # and the other way round


def test_patch_twice_and_unpatch():
    model = make_model(drop_path_rate=0.3).train()
    x = make_tokens(2, 3)
    ref = run(model, x, 3)
    tk.patch(model, backend="torch")
    tk.patch(model, backend="torch")
    assert patch_summary(model) == {"official": 2}
    assert_same(ref, run(model, x, 3))
    tk.unpatch(model)
    assert all("forward" not in b.__dict__ for b in model.blocks)
    assert patch_summary(model) == {}
    assert_same(ref, run(model, x, 3), exact=True)


def test_instance_forward_restored():
    """A block whose forward was already replaced on the instance gets that one back."""
    model = make_model()
    block = model.blocks[0]
    own = block.forward  # a bound method set on the instance, as some wrappers do
    block.forward = own
    tk.patch(model, backend="torch")
    assert block.forward is not own
    tk.unpatch(model)
    assert block.__dict__["forward"] is own


@pytest.mark.parametrize("what", ["attn_drop", "proj_drop"])
def test_dropout_in_training_falls_back(what, fused_calls):
    kwargs = {"attn_drop_rate": 0.2} if what == "attn_drop" else {"drop_rate": 0.2}
    model = make_model(drop_path_rate=0.3, **kwargs).train()
    x = make_tokens(2, 3)
    ref = run(model, x, 3)
    tk.patch(model, backend="torch")
    with pytest.warns(UserWarning, match="dropout"):
        got = run(model, x, 3)
    assert_same(ref, got, exact=True)
    assert not fused_calls
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        run(model, x, 3)
    model.eval()  # dropout off: the fused path runs
    tk.unpatch(model)
    ref_eval = run(model, x, 3)
    tk.patch(model, backend="torch")
    assert_same(ref_eval, run(model, x, 3))
    assert len(fused_calls) == 2


def test_mlp_dropout_reproduced(fused_calls):
    """Dropout inside the MLP sees the same tensor in the same order of draws: fused, same result."""
    model = make_model(drop_path_rate=0.3, drop_rate=0.2).train()
    for block in model.blocks:
        block.attn.proj_drop.p = block.temporal_attn.proj_drop.p = 0.0
    x = make_tokens(2, 3)
    ref = run(model, x, 3)
    tk.patch(model, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(ref, run(model, x, 3))
    assert len(fused_calls) == 2


class _OddDropPath(nn.Module):
    """A drop-path the fused path does not know how to reproduce."""

    def forward(self, x):
        return x * 0.5 if self.training else x


class _TimmLikeDropPath(nn.Module):
    def __init__(self, drop_prob, scale_by_keep):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0], 1, 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)


@pytest.mark.parametrize("kind", ["odd", "no_scale_by_keep"])
def test_unknown_drop_path_falls_back(kind, fused_calls):
    model = make_model().train()
    for block in model.blocks:
        block.drop_path = _OddDropPath() if kind == "odd" else _TimmLikeDropPath(0.3, False)
    x = make_tokens(2, 3)
    ref = run(model, x, 3)
    tk.patch(model, backend="torch")
    with pytest.warns(UserWarning, match="drop-path"):
        got = run(model, x, 3)
    assert_same(ref, got, exact=True)
    assert not fused_calls


def test_bad_shapes_raise_like_original():
    model = make_model()
    x = make_tokens(2, 3)
    with pytest.raises(Exception) as original:
        model(x, 3, 4)  # W does not divide the token count
    tk.patch(model, backend="torch")
    with pytest.raises(type(original.value)):
        model(x, 3, 4)
    with pytest.raises(TypeError):
        model.blocks[0](x, 2, 3)  # a missing argument


def test_keyword_arguments():
    model = make_model()
    x = make_tokens(2, 3)
    ref = model.blocks[0](x, 2, 3, WIDTH)
    tk.patch(model, backend="torch")
    torch.testing.assert_close(model.blocks[0](x=x, B=2, T=3, W=WIDTH), ref, **TOL)


def test_other_attention_types_left_alone():
    for attention_type in ("space_only", "joint_space_time"):
        with pytest.raises(ValueError, match="no divided space-time attention"):
            tk.patch(make_model(attention_type=attention_type))
    model = make_model()
    model.blocks[1] = Block(32, 2, 2.0, attention_type="joint_space_time")
    tk.patch(model, backend="torch")
    assert patch_summary(model) == {"official": 1}
    assert "forward" in model.blocks[0].__dict__ and "forward" not in model.blocks[1].__dict__


def test_nothing_to_patch_raises():
    with pytest.raises(ValueError):
        tk.patch(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError):
        tk.patch(tk.DividedSpaceTimeBlock(32, 2, 3))  # already fused: not an official Block


def test_structure_must_match():
    """Attention modules with extra parameters (q/k norms, ...) change the maths: not matched."""
    model = make_model()
    for block in model.blocks:
        block.attn.q_norm = nn.LayerNorm(16)
    assert not official.matches(model.blocks[0])
    with pytest.raises(ValueError):
        tk.patch(model)
    block = Block(32, 2)
    block.forward = lambda x: x  # instance attribute only: the class forward is what is checked
    assert official.matches(block)


# ------------------------------------------------------------------ GPU: bf16 autocast on CUDA
# Run by ``pytest -m gpu`` on a machine with a CUDA device (skipped elsewhere by conftest.py).
GPU = "cuda"  # every tensor and model of the GPU test goes here (one constant: nothing left on the CPU)
GPU_HEIGHT, GPU_WIDTH, GPU_FRAMES = 6, 7, 8  # a non-square 6 x 7 patch grid, N = 42, T = 8


def make_gpu_model(drop_path=0.3, seed=0):
    """Moderately sized, on the GPU: dim 256, 4 heads of 64, 2 blocks (drop-path 0 and 0.3), MLP 512."""
    torch.manual_seed(seed)
    model = TinyTimeSformer(dim=256, depth=2, num_heads=4, mlp_ratio=2.0, drop_path_rate=drop_path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_bf16_matches_unpatched(backend, train, fused_calls, resolved_backends, fallback_warnings):
    """Forward, the input's and every parameter's gradient on CUDA under bf16 autocast, patched
    vs unpatched (drop-path drawing in train mode); criteria in assert_bf16_equivalent."""
    model = make_gpu_model().train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1 + GPU_HEIGHT * GPU_WIDTH * GPU_FRAMES, 256, generator=g).to(GPU)
    patched = tk.patch(copy.deepcopy(model), backend=backend)
    assert patch_summary(patched) == {"official": 2}
    check_patched_bf16(model, patched, lambda m, x: {"out": m(x, GPU_FRAMES, GPU_WIDTH)}, x, train, seed=123)
    assert len(fused_calls) == 2
    assert_kernels_ran(resolved_backends, backend, 4)  # temporal and spatial op of 2 blocks
    assert not fallback_warnings()
