"""tk.patch / tk.unpatch on diffusers' temporal transformers (tiny random configs, nothing
downloaded): AnimateDiff motion modules, text-to-video TransformerTemporalModel, Stable Video
Diffusion's temporal blocks and Latte, outputs and every parameter gradient vs the unpatched
model, a whole UNetMotionModel, the fallbacks, the state dict, unpatch, and the hidden-state
copies the patched motion module no longer makes."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bf16_check import assert_kernels_ran, check_patched_bf16

import timesformer_kernels as tk
from timesformer_kernels.integrations import diffusers_ops, patch_summary

pytest.importorskip("diffusers")
from diffusers import LatteTransformer3DModel, UNetMotionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0  # noqa: E402
from diffusers.models.transformers.transformer_temporal import (TransformerSpatioTemporalModel,  # noqa: E402
                                                                TransformerTemporalModel)
from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D  # noqa: E402

TOL = dict(atol=2e-4, rtol=2e-4)
BATCH, PIXELS = 2, (2, 3)  # latents of 2 x 3 pixels: S = 6 temporal sequences per clip

pytestmark = pytest.mark.usefixtures("fresh_warnings", "one_thread")


def perturbed(model, seed=0, device="cpu"):
    """Every parameter moved off its init (proj_out and the gates start at zero upstream)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(device)


def animatediff(frames, head_dim=8, heads=2, dropout=0.0, device="cpu"):
    torch.manual_seed(0)
    model = AnimateDiffTransformer3D(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=8,
                                     norm_num_groups=4, dropout=dropout, positional_embeddings="sinusoidal",
                                     num_positional_embeddings=32)
    x = torch.randn(BATCH * frames, 8, *PIXELS, generator=torch.Generator().manual_seed(1)).to(device)
    return perturbed(model, device=device), lambda m, x: {"out": m(x, num_frames=frames)}, x


def text_to_video(frames, head_dim=8, device="cpu"):
    torch.manual_seed(0)
    model = TransformerTemporalModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=8,
                                     norm_num_groups=4, num_layers=2)
    x = torch.randn(BATCH * frames, 8, *PIXELS, generator=torch.Generator().manual_seed(1)).to(device)
    return perturbed(model, device=device), lambda m, x: {"out": m(x, num_frames=frames).sample}, x


def svd(frames, head_dim=16, device="cpu"):
    torch.manual_seed(0)
    model = TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=32,
                                           cross_attention_dim=12)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * frames, 32, *PIXELS, generator=g).to(device)
    context = torch.randn(BATCH * frames, 1, 12, generator=g).to(device)
    images_only = torch.zeros(BATCH, frames, device=device)
    images_only[1, frames // 2:] = 1  # the image_only_indicator mix: half of clip 1 takes the spatial path only

    def forward(m, x):
        return {"out": m(x, encoder_hidden_states=context, image_only_indicator=images_only).sample}

    return perturbed(model, device=device), forward, x


def latte(frames, head_dim=8, device="cpu"):
    torch.manual_seed(0)
    model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
                                    num_layers=2, sample_size=4, patch_size=2, caption_channels=12,
                                    video_length=frames, norm_type="ada_norm_single", cross_attention_dim=16,
                                    attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, frames, 4, 2, generator=g).to(device)  # 2 x 1 patches per frame
    text = torch.randn(BATCH, 3, 12, generator=g).to(device)
    timestep = torch.tensor([3, 700], device=device)
    return (perturbed(model, device=device),
            lambda m, x: {"out": m(x, timestep=timestep, encoder_hidden_states=text).sample}, x)


FAMILIES = {"animatediff": animatediff, "text_to_video": text_to_video, "svd": svd, "latte": latte}
FUSED_OPS = {"animatediff": 2, "text_to_video": 4, "svd": 1, "latte": 2}  # temporal attention calls per forward


def run(model, forward, x, seed=123):
    """Output and d(loss)/d(every parameter) (zeros where a parameter does not reach the output)."""
    torch.manual_seed(seed)
    out = forward(model, x)["out"]
    params = list(model.parameters())
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params,
                                allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def assert_same(ref, got, exact=False):
    (out_a, grads_a), (out_b, grads_b) = ref, got
    if exact:
        assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
        return
    torch.testing.assert_close(out_b, out_a, **TOL)
    for i, (a, b) in enumerate(zip(grads_a, grads_b)):
        torch.testing.assert_close(b, a, **TOL, msg=lambda m: f"parameter {i}: {m}")


@pytest.fixture
def fused_ops(monkeypatch):
    """Counts the fused temporal attention calls of the diffusers swap-in."""
    calls = []
    inner = diffusers_ops.temporal_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["backend"])
        return inner(*args, **kwargs)

    monkeypatch.setattr(diffusers_ops, "temporal_attention", counting)
    return calls


def assert_as_close_as_upstream(ref, got, exact):
    """Each of ``got`` (output, gradients) is at most twice as far from the float64 result
    ``exact`` as upstream's float32 ``ref`` is, plus a rounding floor: flash-attention's criterion,
    for sizes where fp32 reductions (1280-channel GEMMs, sums over every token) make the fixed
    tolerance of ``assert_same`` depend on the CPU's summation order."""
    (out_a, grads_a), (out_b, grads_b), (out_x, grads_x) = ref, got, exact
    for name, a, b, x in [("output", out_a, out_b, out_x)] + [
            (f"parameter {i}", *t) for i, t in enumerate(zip(grads_a, grads_b, grads_x))]:
        x = x.to(a.dtype)
        err, upstream_err = (b - x).abs().max().item(), (a - x).abs().max().item()
        floor = 1e-6 * max(x.abs().max().item(), 1.0)
        assert err <= 2 * upstream_err + floor, f"{name}: error {err:.3g} vs upstream's {upstream_err:.3g}"


def check_family(family, frames, backend, train, fused_ops, fp64_reference=False, **options):
    """Patched vs unpatched outputs and gradients: within ``TOL``, or, with ``fp64_reference``,
    against the float64 model by ``assert_as_close_as_upstream``."""
    model, forward, x = FAMILIES[family](frames, **options)
    model.train(train)
    ref = run(model, forward, x)
    exact = run(copy.deepcopy(model).double(), forward, x.double()) if fp64_reference else None
    tk.patch(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused: no fallback warning
        got = run(model, forward, x)
    if fp64_reference:
        assert_as_close_as_upstream(ref, got, exact)
    else:
        assert_same(ref, got)
    assert len(fused_ops) == FUSED_OPS[family]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("frames", [6, 16, 24])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_unpatched_torch(family, frames, train, fused_ops):
    check_family(family, frames, "torch", train, fused_ops)


@pytest.mark.parametrize("family,frames,train", [("animatediff", 6, True), ("animatediff", 24, False),
                                                 ("text_to_video", 16, True), ("svd", 6, False), ("svd", 24, True),
                                                 ("latte", 16, False), ("latte", 6, True)])
def test_matches_unpatched_triton(family, frames, train, fused_ops):
    check_family(family, frames, "triton", train, fused_ops)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_dim_160(backend, fused_ops):
    """AnimateDiff SD 1.5's deepest motion modules: 8 heads over 1280 channels, head dim 160.
    With backend "triton" this needs the Triton kernels' head dims up to 256. Its fp32 rounding
    (a gradient element off by 2.3e-4 on one CPU, within 2e-4 on another) is judged against float64."""
    check_family("animatediff", 16, backend, True, fused_ops, fp64_reference=True, head_dim=160, heads=1)


def tiny_unet():
    torch.manual_seed(0)
    unet = UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=4,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=12,
                           num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=32)
    return perturbed(unet)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unet_motion_model(backend, fused_ops):
    """A whole UNetMotionModel, forward and backward: 7 motion modules of head dim 8 and 16."""
    unet = tiny_unet().train()
    frames = 6
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(1, 4, frames, 4, 4, generator=g), torch.randn(frames, 3, 12, generator=g)

    def forward(m, x):
        return {"out": m(x, torch.tensor([10]), text).sample}

    ref = run(unet, forward, sample)
    tk.patch(unet, backend=backend)
    assert patch_summary(unet) == {"diffusers": 7}
    assert_same(ref, run(unet, forward, sample))
    assert len(fused_ops) == 14  # two self-attentions per motion module


def test_state_dict_and_unpatch():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    frames = 6
    sample, text = torch.randn(1, 4, frames, 4, 4), torch.randn(frames, 3, 12)
    ref = unet(sample, torch.tensor([10]), text).sample
    tk.patch(unet, backend="torch")
    after = unet.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    tk.unpatch(unet)
    assert not [m for m in unet.modules() if "forward" in m.__dict__]
    assert patch_summary(unet) == {}
    assert torch.equal(unet(sample, torch.tensor([10]), text).sample, ref)


@pytest.mark.parametrize("family", ["svd", "latte"])
def test_unpatch_restores_exactly(family):
    model, forward, x = FAMILIES[family](6)
    ref = run(model, forward, x)
    tk.unpatch(tk.patch(model, backend="torch"))
    assert_same(ref, run(model, forward, x), exact=True)


class HiddenCopies(TorchDispatchMode):
    """Records aten copies (clone, copy_, _to_copy) whose result has at least ``size`` elements."""

    def __init__(self, size):
        super().__init__()
        self.size, self.copies = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func.overloadpacket.__name__ in ("clone", "copy_", "_to_copy", "copy") and isinstance(out, torch.Tensor)
                and out.numel() >= self.size):
            self.copies.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("family,before", [("animatediff", 2), ("text_to_video", 2), ("svd", 2 + 2)])
def test_no_hidden_state_copies(family, before):
    """Upstream's temporal transformer permutes the hidden state (a copy) and back; the patched
    forward (backend "triton") makes no hidden-state-sized copy. SVD: the spatial path's own two
    layout changes (input to tokens, tokens to channel-first) stay; its temporal block's two go."""
    model, forward, x = FAMILIES[family](8)
    with torch.no_grad():
        with HiddenCopies(x.numel()) as original:
            forward(model, x)
        tk.patch(model, backend="triton")
        with HiddenCopies(x.numel()) as patched:
            forward(model, x)
    assert len(original.copies) == before, original.copies
    assert len(patched.copies) == before - 2, patched.copies


def test_latte_copies():
    """Latte permutes around every temporal block (two copies each); the fused forward keeps
    only the input and output layout changes upstream makes once per forward."""
    model, forward, x = latte(8)
    size = model.config.num_attention_heads * model.config.attention_head_dim * BATCH * 8 * 2  # hidden state
    with torch.no_grad():
        with HiddenCopies(size) as original:
            forward(model, x)
        tk.patch(model, backend="triton")
        with HiddenCopies(size) as patched:
            forward(model, x)
    assert len(original.copies) == len(patched.copies) + 2 * 2, (original.copies, patched.copies)


# ------------------------------------------------------------------------------ what is fused
def test_fused_projections_and_plain_processor(fused_ops):
    """fuse_projections() + FusedAttnProcessor2_0 (to_qkv, with its own weights) and the plain
    AttnProcessor (attn.scale) are diffusers' default maths: fused."""
    model, forward, x = animatediff(6)
    attentions = [b.attn1 for b in model.transformer_blocks] + [b.attn2 for b in model.transformer_blocks]
    attentions[0].fuse_projections()
    attentions[0].set_processor(FusedAttnProcessor2_0())
    with torch.no_grad():
        attentions[0].to_qkv.weight.mul_(1.5)  # the fused processor reads to_qkv, not to_q/to_k/to_v
    attentions[1].set_processor(AttnProcessor())
    attentions[1].scale = 0.3
    ref = run(model, forward, x)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, forward, x))
    assert len(fused_ops) == 2


def test_svd_fused_context_projection(fused_ops):
    model, forward, x = svd(6)
    for block in model.temporal_transformer_blocks:
        block.attn2.fuse_projections()
        block.attn2.set_processor(FusedAttnProcessor2_0())
        with torch.no_grad():
            block.attn2.to_kv.weight.mul_(1.5)
    ref = run(model, forward, x)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, forward, x))
    assert len(fused_ops) == 1


def test_gradient_checkpointing_latte(fused_ops):
    model, forward, x = latte(6)
    model.train().enable_gradient_checkpointing()
    ref = run(model, forward, x)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, forward, x))
    assert len(fused_ops) == 4  # each temporal block ran twice: forward, then recomputed in backward


# ------------------------------------------------------------------------------- fallbacks
class CustomProcessor(AttnProcessor):
    """A user-set processor (same maths here, but the swap-in cannot know that)."""


def lora_like(linear):
    """A peft-style wrapper: the q projection plus a low-rank update, not an nn.Linear."""
    class LoraLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = linear
            self.down, self.up = nn.Linear(linear.in_features, 2, bias=False), nn.Linear(2, linear.out_features,
                                                                                        bias=False)

        def forward(self, x):
            return self.base_layer(x) + self.up(self.down(x))

    return LoraLinear()


FALLBACKS = {
    "processor": lambda m, attn: attn.set_processor(CustomProcessor()),
    "projections": lambda m, attn: setattr(attn, "to_q", lora_like(attn.to_q)),
    "hook": lambda m, attn: attn.to_k.register_forward_hook(lambda mod, args, out: out * 2),
    "options": lambda m, attn: setattr(attn, "rescale_output_factor", 2.0),
    "chunking": lambda m, attn: m.transformer_blocks[0].set_chunk_feed_forward(2, 1),
}


@pytest.mark.parametrize("reason", FALLBACKS)
def test_fallback_warns_once(reason, fused_ops, fallback_warnings):
    model, forward, x = animatediff(6)
    FALLBACKS[reason](model, model.transformer_blocks[0].attn1)
    ref = run(model, forward, x)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, forward, x), exact=True)
    run(model, forward, x)
    assert len(fallback_warnings()) == 1, fallback_warnings()
    assert not fused_ops


def test_dropout_in_training_falls_back(fused_ops, fallback_warnings):
    model, forward, x = animatediff(6, dropout=0.2)
    model.train()
    ref = run(model, forward, x)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, forward, x), exact=True)
    assert ["dropout" in w for w in fallback_warnings()] == [True]
    assert not fused_ops
    model.eval()  # dropout off: fused
    tk.unpatch(model)
    ref = run(model, forward, x)
    tk.patch(model, backend="torch")
    assert_same(ref, run(model, forward, x))
    assert len(fused_ops) == 2


@pytest.mark.parametrize("argument", ["encoder_hidden_states", "cross_attention_kwargs"])
def test_arguments_fall_back(argument, fused_ops, fallback_warnings):
    model, _, x = animatediff(6)
    value = {"gligen": None}
    if argument == "encoder_hidden_states":  # a motion module with cross-attention over each pixel's frames
        torch.manual_seed(0)
        model = perturbed(AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=8, in_channels=8,
                                                   norm_num_groups=4, cross_attention_dim=12,
                                                   double_self_attention=False))
        value = torch.randn(BATCH * PIXELS[0] * PIXELS[1], 4, 12)  # upstream's batch: one context per sequence
    ref = model(x, num_frames=6, **{argument: value})
    tk.patch(model, backend="torch")
    torch.testing.assert_close(model(x, num_frames=6, **{argument: value}), ref, rtol=0, atol=0)
    assert [argument in w for w in fallback_warnings()] == [True]
    assert not fused_ops


def test_svd_long_context_falls_back(fused_ops, fallback_warnings):
    model, _, x = svd(6)
    context, images_only = torch.randn(BATCH * 6, 3, 12), torch.zeros(BATCH, 6)
    ref = model(x, encoder_hidden_states=context, image_only_indicator=images_only).sample
    tk.patch(model, backend="torch")
    got = model(x, encoder_hidden_states=context, image_only_indicator=images_only).sample
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert ["3 tokens" in w for w in fallback_warnings()] == [True]


def test_return_dict_false(fused_ops):
    """UNet3DConditionModel calls its TransformerTemporalModels with return_dict=False: a 1-tuple."""
    model, _, x = text_to_video(6)
    ref = model(x, num_frames=6, return_dict=False)
    tk.patch(model, backend="torch")
    got = model(x, None, None, None, 6, None, False)  # positionally, as upstream's blocks may
    assert isinstance(got, tuple) and len(got) == 1
    torch.testing.assert_close(got[0], ref[0], **TOL)
    assert len(fused_ops) == 4


def test_bad_frame_count_raises_like_original():
    model, _, x = animatediff(6)
    with pytest.raises(Exception) as original:
        model(x, num_frames=5)
    tk.patch(model, backend="torch")
    with pytest.raises(type(original.value)):
        model(x, num_frames=5)


def test_spatial_models_left_alone():
    """Image attention (Transformer2DModel, BasicTransformerBlock alone) is not matched."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    with pytest.raises(ValueError, match="no divided space-time attention"):
        tk.patch(Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4))


# ------------------------------------------------------------------ GPU: bf16 autocast on CUDA
GPU = "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("family", ["animatediff", "svd", "latte"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_gpu_bf16_matches_unpatched(backend, family, train, fused_ops, resolved_backends, fallback_warnings):
    """Forward and every parameter gradient on CUDA under bf16 autocast, patched vs unpatched,
    16 frames, head dim 64; criteria in assert_bf16_equivalent."""
    model, forward, x = FAMILIES[family](16, head_dim=64, device=GPU)
    model.train(train)
    for block in getattr(model, "temporal_transformer_blocks", []) if family == "svd" else []:
        for unused in (block.attn2.to_q, block.attn2.to_k, block.norm2):  # one-token cross-attention: zero gradients
            unused.requires_grad_(False)
    patched = tk.patch(copy.deepcopy(model), backend=backend)
    check_patched_bf16(model, patched, forward, x, train, seed=123)
    assert_kernels_ran(resolved_backends, backend, FUSED_OPS[family])
    assert not fallback_warnings()


@pytest.mark.parametrize("direction", ["from_channels", "to_channels"])
@pytest.mark.parametrize("features_out, pixels", [(4, 16), (12, 5)])  # both weight-gradient schemes
def test_channel_first_linears_match_nn_linear(direction, features_out, pixels):
    """proj_in / proj_out as batched GEMMs on transposed views: output and the input, weight and
    bias gradients equal nn.Linear's on the permuted tensor, with either weight-gradient scheme
    (a batched product summed over frames, or one GEMM over a copy)."""
    torch.manual_seed(0)
    lin = nn.Linear(8, features_out).double()
    if direction == "from_channels":  # (B·F, C, S) -> (B·F, S, out)
        x = torch.randn(3, 8, pixels, dtype=torch.float64, requires_grad=True)
        fused, ref = diffusers_ops.linear_from_channels(x, lin), lin(x.mT)
    else:  # (B·F, S, C) -> (B·F, out, S)
        x = torch.randn(3, pixels, 8, dtype=torch.float64, requires_grad=True)
        fused, ref = diffusers_ops.linear_to_channels(x, lin), lin(x).mT
    torch.testing.assert_close(fused, ref)
    grad = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(fused, (x, lin.weight, lin.bias), grad),
                         torch.autograd.grad(ref, (x, lin.weight, lin.bias), grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_on_cpu_runs_the_original(family, fused_ops, fallback_warnings):
    """backend "auto" on CPU tensors: diffusers' own code (faster there, README "On the CPU"),
    silently; an explicit backend="torch" still fuses (the tests above)."""
    model, forward, x = FAMILIES[family](6)
    ref = run(model, forward, x)
    tk.patch(model)  # backend="auto"
    assert_same(ref, run(model, forward, x), exact=True)
    assert not fused_ops and not fallback_warnings()
