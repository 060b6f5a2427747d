"""Tiny random models of every family tk.patch knows, for the lifecycle tests (test_lifecycle.py,
test_lifecycle_distributed.py): each a ``Family`` that builds the model and runs it on fixed
inputs, plus what a change to the model needs to know about it (its patched modules, a
submodule the fused path bypasses, its attentions).

Families whose library is missing are left out of ``available()`` (the Triton 3.6 stack has no
diffusers, mmaction2 or timesformer-pytorch).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable, Optional

import torch
from torch import nn

from official_block import TinyTimeSformer

DIFFUSERS = ("animatediff", "text_to_video", "svd", "latte")


@dataclasses.dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]  # a fresh model, every parameter random (nothing zero-initialised)
    run: Callable[[nn.Module], torch.Tensor]  # the model on fixed inputs, cast to its dtype
    bypassed: Optional[Callable[[nn.Module], nn.Module]] = None  # a submodule the fused path does not call
    lora_targets: tuple = ()  # peft target_modules of its attention projections
    lora_fused: bool = True  # the fused path calls the LoRA-wrapped projections (else it falls back)

    @property
    def diffusers(self) -> bool:
        return self.name in DIFFUSERS


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter moved off its init (several start at zero upstream: proj_out, gates, temporal_fc)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _inputs(seed: int, *shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


# ------------------------------------------------------------------------ TimeSformer families
def _huggingface() -> Family:
    from transformers import TimesformerConfig, TimesformerModel

    def build():
        config = TimesformerConfig(image_size=24, patch_size=8, num_channels=3, num_frames=3, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        object.__setattr__(config, "drop_path_rate", 0.3)  # draws in train mode (transformers 5 rejects 0.3 here)
        torch.manual_seed(0)
        return randomized(TimesformerModel(config))

    video, = _inputs(1, (2, 3, 3, 16, 24))  # a 2 x 3 patch grid
    return Family("huggingface", build, lambda m: m(video.to(dtype_of(m))).last_hidden_state,
                  bypassed=lambda m: m.encoder.layer[0].attention, lora_targets=("qkv",))


def _official() -> Family:
    def build():
        torch.manual_seed(0)
        return randomized(TinyTimeSformer(dim=32, depth=2, num_heads=2, drop_path_rate=0.3))

    x, = _inputs(1, (2, 1 + 2 * 3 * 3, 32))  # T = 3, a 2 x 3 grid
    return Family("official", build, lambda m: m(x.to(dtype_of(m)), 3, 3), bypassed=lambda m: m.blocks[0].attn,
                  lora_targets=("qkv",))


def _mmaction() -> Optional[Family]:
    from mmaction_loader import load_mmaction_transformer, mmaction_available

    if not mmaction_available():
        return None
    from mmcv.cnn.bricks.transformer import build_transformer_layer_sequence

    mt = load_mmaction_transformer()

    def build():
        torch.manual_seed(0)
        common = dict(embed_dims=32, num_heads=2, num_frames=3, dropout_layer=dict(type="DropPath", drop_prob=0.3),
                      norm_cfg=dict(type="LN", eps=1e-6))
        layer = dict(type="BaseTransformerLayer",
                     attn_cfgs=[dict(type=mt.DividedTemporalAttentionWithNorm, **common),
                                dict(type=mt.DividedSpatialAttentionWithNorm, **common)],
                     ffn_cfgs=dict(type=mt.FFNWithNorm, embed_dims=32, feedforward_channels=64,
                                   act_cfg=dict(type="GELU"), norm_cfg=dict(type="LN", eps=1e-6)),
                     operation_order=("self_attn", "self_attn", "ffn"))
        return randomized(build_transformer_layer_sequence(
            dict(type="TransformerLayerSequence", transformerlayers=[layer] * 2, num_layers=2)))

    x, = _inputs(1, (2, 1 + 5 * 3, 32))  # T = 3, N = 5
    return Family("mmaction", build, lambda m: m(x.to(dtype_of(m)), None, None),
                  bypassed=lambda m: m.layers[0].attentions[1].attn, lora_targets=("attn",), lora_fused=False)


def _lucidrains() -> Optional[Family]:
    if importlib.util.find_spec("timesformer_pytorch") is None:
        return None
    from timesformer_pytorch import TimeSformer

    def build():
        torch.manual_seed(0)
        return randomized(TimeSformer(dim=32, num_frames=3, num_classes=5, image_size=12, patch_size=4, depth=2,
                                      heads=2, dim_head=16))

    video, = _inputs(1, (2, 3, 3, 8, 12))
    return Family("lucidrains", build, lambda m: m(video.to(dtype_of(m))), lora_targets=("to_qkv",))


# ------------------------------------------------------------------------------ diffusers
FRAMES = 6


def _animatediff() -> Family:
    from diffusers import UNetMotionModel

    def build():
        torch.manual_seed(0)
        return randomized(UNetMotionModel(
            block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=4,
            down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
            up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=12,
            num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=32))

    sample, text = _inputs(1, (1, 4, FRAMES, 4, 4), (FRAMES, 3, 12))
    step = torch.tensor([10])

    def run(m):
        dtype = dtype_of(m)
        return m(sample.to(dtype), step, text.to(dtype)).sample

    return Family("animatediff", build, run, bypassed=lambda m: m.down_blocks[0].motion_modules[0].transformer_blocks[0],
                  lora_targets=("to_q", "to_k", "to_v", "to_out.0"), lora_fused=False)


def _text_to_video() -> Family:
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    def build():
        torch.manual_seed(0)
        return randomized(TransformerTemporalModel(num_attention_heads=2, attention_head_dim=8, in_channels=8,
                                                   norm_num_groups=4, num_layers=2))

    x, = _inputs(1, (2 * FRAMES, 8, 2, 3))
    return Family("text_to_video", build, lambda m: m(x.to(dtype_of(m)), num_frames=FRAMES).sample,
                  bypassed=lambda m: m.transformer_blocks[1].attn1,
                  lora_targets=("to_q", "to_k", "to_v", "to_out.0"), lora_fused=False)


def _svd() -> Family:
    from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

    def build():
        torch.manual_seed(0)
        return randomized(TransformerSpatioTemporalModel(num_attention_heads=2, attention_head_dim=16, in_channels=32,
                                                         cross_attention_dim=12))

    x, context = _inputs(1, (2 * FRAMES, 32, 2, 3), (2 * FRAMES, 1, 12))
    images_only = torch.zeros(2, FRAMES)
    images_only[1, FRAMES // 2:] = 1

    def run(m):
        dtype = dtype_of(m)
        return m(x.to(dtype), encoder_hidden_states=context.to(dtype), image_only_indicator=images_only.to(dtype)).sample

    return Family("svd", build, run, bypassed=lambda m: m.temporal_transformer_blocks[0].attn1,
                  lora_targets=("to_q", "to_k", "to_v", "to_out.0"), lora_fused=False)


def _latte() -> Family:
    from diffusers import LatteTransformer3DModel

    def build():
        torch.manual_seed(0)
        return randomized(LatteTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=4,
            patch_size=2, caption_channels=12, video_length=FRAMES, norm_type="ada_norm_single",
            cross_attention_dim=16, attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6))

    x, text = _inputs(1, (2, 4, FRAMES, 4, 2), (2, 3, 12))
    step = torch.tensor([3, 700])
    return Family("latte", build,
                  lambda m: m(x.to(dtype_of(m)), timestep=step, encoder_hidden_states=text.to(dtype_of(m))).sample,
                  bypassed=lambda m: m.temporal_transformer_blocks[0].attn1,
                  lora_targets=("to_q", "to_k", "to_v", "to_out.0"), lora_fused=False)


def available() -> dict[str, Family]:
    """{name: Family} of every family whose library imports here."""
    families = {"huggingface": _huggingface, "official": _official, "mmaction": _mmaction,
                "lucidrains": _lucidrains}
    if importlib.util.find_spec("diffusers") is not None:
        families.update(animatediff=_animatediff, text_to_video=_text_to_video, svd=_svd, latte=_latte)
    if importlib.util.find_spec("transformers") is None:
        del families["huggingface"]
    built = {name: make() for name, make in families.items()}
    return {name: family for name, family in built.items() if family is not None}
