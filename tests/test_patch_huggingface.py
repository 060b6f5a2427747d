"""tk.patch / tk.unpatch on Hugging Face transformers TimeSformer models (random init, no hub):
outputs and every parameter gradient vs. the unpatched model, drop-path included, the state
dict, unpatch, gradient checkpointing, the fallbacks, and what is left alone."""
import copy
import warnings

import pytest
import torch
from torch import nn

from bf16_check import assert_kernels_ran, check_patched_bf16

import timesformer_kernels as tk
from timesformer_kernels import cuda as tk_cuda
from timesformer_kernels.integrations import patch_summary

transformers = pytest.importorskip("transformers")
from transformers import TimesformerConfig, TimesformerForVideoClassification, TimesformerModel  # noqa: E402

TOL = dict(atol=2e-4, rtol=2e-4)
IMAGE, PATCH = 24, 8  # config: 3 patches per row
PIXELS = (16, 24)  # input height, width: a 2 x 3 patch grid, N = 6 (non-square)


pytestmark = pytest.mark.usefixtures("fresh_warnings")


def make_config(frames=3, drop_path=0.0, **kwargs):
    config = TimesformerConfig(image_size=IMAGE, patch_size=PATCH, num_channels=3, num_frames=frames, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **kwargs)
    # transformers 5 types drop_path_rate as int and rejects 0.1 in the constructor
    object.__setattr__(config, "drop_path_rate", drop_path)
    return config


def make_model(frames=3, drop_path=0.0, cls=TimesformerModel, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = cls(make_config(frames, drop_path, **kwargs))
    with torch.no_grad():  # larger than the 0.02 init, so that every branch matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_video(batch, frames, pixels=PIXELS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 3, *pixels, generator=g)


def run(model, video, seed=123, **kwargs):
    """Output and d(loss)/d(every parameter) under a fixed seed (drop-path draws)."""
    torch.manual_seed(seed)
    result = model(video, **kwargs)
    out = result.last_hidden_state if hasattr(result, "last_hidden_state") else result.logits
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out.detach(), grads, result


def assert_same(a, b, exact=False):
    (out_a, grads_a, _), (out_b, grads_b, _) = a, b
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
    model = make_model(frames, drop_path=0.3).train(train)
    video = make_video(2, frames)
    ref = run(model, video)
    tk.patch(model, backend="torch")
    assert patch_summary(model) == {"huggingface": 2}
    got = run(model, video)
    assert_same(ref, got)
    assert len(fused_calls) == 2
    if train:  # drop-path really draws: another seed gives another output
        assert not torch.allclose(run(model, video, seed=7)[0], ref[0])


@pytest.mark.parametrize("frames,train", [(3, True), (1, False)])
def test_matches_unpatched_triton(frames, train, fused_calls):
    model = make_model(frames, drop_path=0.3).train(train)
    video = make_video(1, frames)
    ref = run(model, video)
    tk.patch(model, backend="triton")
    assert_same(ref, run(model, video))
    assert len(fused_calls) == 2


def test_video_classification_and_other_grid():
    """The classification model, a taller grid (4 x 3) and the loss path."""
    model = make_model(4, drop_path=0.3, cls=TimesformerForVideoClassification).train()
    video = make_video(2, 4, pixels=(32, 24))
    labels = torch.tensor([0, 1])
    ref = run(model, video, labels=labels)
    tk.patch(model, backend="torch")
    got = run(model, video, labels=labels)
    assert_same(ref, got)
    torch.testing.assert_close(got[2].loss, ref[2].loss, **TOL)


def test_frames_follow_config():
    """Like the original, the layer uses config.num_frames even for a longer clip."""
    model = make_model(3)
    video = make_video(1, 6)
    ref = run(model, video)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, video))


def test_bad_token_count_raises_like_original():
    model = make_model(3)
    video = make_video(1, 3, pixels=(16, 16))  # N = 4: not a multiple of config's 3 patches per row
    with pytest.raises(Exception) as original:
        model(video)
    tk.patch(model, backend="torch")
    with pytest.raises(type(original.value)):
        model(video)


def test_gradient_checkpointing(fused_calls):
    model = make_model(3, drop_path=0.3).train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable()
    video = make_video(2, 3)
    ref = run(model, video)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, video))
    assert len(fused_calls) == 4  # each layer ran twice: forward, then recomputed in backward


def test_state_dict_unchanged():
    model = make_model(3, drop_path=0.3, cls=TimesformerForVideoClassification)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tk.patch(model, backend="torch")
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = make_model(3, cls=TimesformerForVideoClassification, seed=5)
    fresh.load_state_dict(after)  # a patched model's checkpoint loads into an unpatched one
    tk.patch(fresh, backend="torch").load_state_dict(before)  # and the other way round


def test_patch_twice_and_unpatch():
    model = make_model(3, drop_path=0.3).train()
    video = make_video(2, 3)
    ref = run(model, video)
    tk.patch(model, backend="torch")
    tk.patch(model, backend="torch")
    assert patch_summary(model) == {"huggingface": 2}
    assert_same(ref, run(model, video))
    tk.unpatch(model)
    layers = model.encoder.layer
    assert all("forward" not in m.__dict__ for m in layers)  # no other state is left
    assert patch_summary(model) == {}
    assert_same(ref, run(model, video), exact=True)


def test_output_attentions_falls_back(fused_calls):
    model = make_model(3).eval()
    video = make_video(2, 3)
    ref = run(model, video, output_attentions=True)
    tk.patch(model, backend="torch")
    with pytest.warns(UserWarning, match="output_attentions"):
        got = run(model, video, output_attentions=True)
    assert_same(ref, got, exact=True)
    assert len(got[2].attentions) == 2
    assert all(torch.equal(a, b) for a, b in zip(ref[2].attentions, got[2].attentions))
    assert not fused_calls
    run(model, video)  # without: fused again
    assert len(fused_calls) == 2


@pytest.mark.parametrize("which", ["attention_probs_dropout_prob", "hidden_dropout_prob"])
def test_dropout_in_training_falls_back(which, fused_calls):
    model = make_model(3, drop_path=0.3, **{which: 0.2}).train()
    video = make_video(2, 3)
    ref = run(model, video)
    tk.patch(model, backend="torch")
    with pytest.warns(UserWarning, match="dropout"):
        got = run(model, video)
    assert_same(ref, got, exact=True)
    assert not fused_calls
    with warnings.catch_warnings():  # once per process
        warnings.simplefilter("error")
        run(model, video)
    model.eval()  # dropout off: the fused path runs
    tk.unpatch(model)
    ref_eval = run(model, video)
    tk.patch(model, backend="torch")
    assert_same(ref_eval, run(model, video))
    assert len(fused_calls) == 2


def test_mlp_dropout_reproduced(fused_calls):
    """Dropout in intermediate/output sees the same tensor in the same order of draws: fused, same result."""
    model = make_model(3, drop_path=0.3, hidden_dropout_prob=0.2).train()
    for layer in model.encoder.layer:
        layer.attention.output.dropout.p = layer.temporal_attention.output.dropout.p = 0.0
    video = make_video(2, 3)
    ref = run(model, video)
    tk.patch(model, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(ref, run(model, video))
    assert len(fused_calls) == 2


def test_extra_arguments_fall_back(monkeypatch):
    """Arguments the fused path does not know (head masks of other versions) run the original."""
    model = make_model(3)
    layer = model.encoder.layer[0]
    hidden = torch.randn(2, 1 + 6 * 3, 32)
    ref = layer(hidden)
    calls = []

    def original(self, hidden_states, output_attentions=False, head_mask=None):
        calls.append(head_mask)
        return ref

    # a layer class whose forward takes a head mask, like older transformers versions
    Layer = type("TimesformerLayer", (type(layer),), {"forward": original})
    layer.__class__ = Layer
    tk.patch(model, backend="torch")
    torch.testing.assert_close(layer(hidden)[0], ref[0], **TOL)
    assert calls == []
    with pytest.warns(UserWarning, match="head_mask"):
        layer(hidden, head_mask=torch.ones(2))
    assert len(calls) == 1


def test_scale_changed_by_hand():
    model = make_model(3).train()
    for layer in model.encoder.layer:
        layer.attention.attention.scale = 0.3
    video = make_video(2, 3)
    ref = run(model, video)
    tk.patch(model, backend="torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(model, video)
    assert_same(ref, got)
    assert not [w for w in caught if "timesformer_kernels" in str(w.message)]  # fused, no fallback


@pytest.mark.parametrize("attention_type", ["space_only", "joint_space_time"])
def test_other_attention_types_left_alone(attention_type):
    model = make_model(3, attention_type=attention_type)
    with pytest.raises(ValueError, match="no divided space-time attention"):
        tk.patch(model)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_nothing_to_patch_raises():
    with pytest.raises(ValueError):
        tk.patch(nn.Sequential(nn.Linear(4, 4)))


# ------------------------------------------------------------------ GPU: bf16 autocast on CUDA
# Run by ``pytest -m gpu`` on a machine with a CUDA device (skipped elsewhere by conftest.py).
GPU = "cuda"  # every tensor and model of the GPU test goes here (one constant: nothing left on the CPU)
GPU_PIXELS = (48, 56)  # config 7 patches per row: a 6 x 7 patch grid, N = 42 (non-square)


def make_gpu_model(drop_path=0.3, seed=0):
    """Moderately sized, on the GPU: dim 256, 4 heads of 64, T = 8, 2 layers, MLP 512."""
    config = TimesformerConfig(image_size=56, patch_size=8, num_channels=3, num_frames=8, hidden_size=256,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    object.__setattr__(config, "drop_path_rate", drop_path)
    torch.manual_seed(seed)
    model = TimesformerModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", [
    "triton", "auto",
    pytest.param("cuda", marks=pytest.mark.skipif(not tk_cuda.available(), reason="CUDA extension not built"))])
def test_gpu_bf16_matches_unpatched(backend, train, fused_calls, resolved_backends, fallback_warnings):
    """Forward and every parameter gradient on CUDA under bf16 autocast, patched vs unpatched
    (drop-path 0.3 drawing in train mode); criteria in assert_bf16_equivalent."""
    model = make_gpu_model().train(train)
    video = make_video(2, 8, pixels=GPU_PIXELS).to(GPU)
    patched = tk.patch(copy.deepcopy(model), backend=backend)
    assert patch_summary(patched) == {"huggingface": 2}
    check_patched_bf16(model, patched, lambda m, v: {"out": m(v).last_hidden_state}, video, train, seed=123,
                       input_grad=False, allow_unused=True)
    assert len(fused_calls) == 2
    assert_kernels_ran(resolved_backends, backend, 4)  # temporal and spatial op of 2 layers
    assert not fallback_warnings()


@pytest.mark.parametrize("copy_kind", ["deepcopy", "torch_save"])
def test_copies_fall_back_and_unpatch(copy_kind, fused_calls):
    """Issue 17, items 1-2: an EMA copy (deepcopy) or a torch.save/torch.load round trip of a
    patched model runs fused, falls back (output_attentions=True) and unpatches."""
    import io

    model = make_model(3).eval()
    video = make_video(2, 3)
    ref = run(model, video, output_attentions=True)
    tk.patch(model, backend="torch")
    if copy_kind == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert_same(ref, run(copied, video))
    assert len(fused_calls) == 2
    with pytest.warns(UserWarning, match="output_attentions"):
        got = run(copied, video, output_attentions=True)
    assert_same(ref, got, exact=True)
    tk.unpatch(copied)
    assert not [m for m in copied.modules() if "forward" in m.__dict__]
    assert_same(ref, run(copied, video), exact=True)


def test_auto_on_cpu(fused_calls):
    """backend "auto" on CPU tensors: fused without autograd (faster there), the original code,
    silently, while autograd records (README, "On the CPU")."""
    model = make_model(3).eval()
    video = make_video(2, 3)
    with torch.no_grad():
        ref = model(video).last_hidden_state
    train_ref = run(model, video)
    tk.patch(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            torch.testing.assert_close(model(video).last_hidden_state, ref, **TOL)
        assert len(fused_calls) == 2
        assert_same(train_ref, run(model, video), exact=True)
    assert len(fused_calls) == 2
