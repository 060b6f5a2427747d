"""CPU timings behind ``backend="auto"``'s choice on CPU tensors (README, "On the CPU"): the
original module vs the patched one with backend "auto" and "torch", forward (no grad) and
forward + backward, fp32, interleaved repeats (median seconds), and the cost of the checks a
patched forward makes at every call.

    python -m benchmarks.cpu [--threads 2] [--repeats 5] [--cases motion_module,hf_layer]

Cases (random weights, nothing downloaded):
    motion_module  diffusers AnimateDiffTransformer3D, 320 channels (8 heads of 40), 16 frames,
                   32x32 latent, batch 2
    hf_layer       Hugging Face TimesformerLayer, TimeSformer-base (768, 12 heads, 8 frames, 14x14
                   patches), batch 2
    official_block the official Block structure (tests/official_block.py) at the same size
    lucidrains     lucidrains TimeSformer, one layer at the same size (rotary embeddings), 224² video
    mmaction_layer mmaction2's divided temporal + spatial attention and FFN layer at the same size
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch

import timesformer_kernels as tk


def _motion_module():
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    model = AnimateDiffTransformer3D(num_attention_heads=8, attention_head_dim=40, in_channels=320,
                                     norm_num_groups=32, positional_embeddings="sinusoidal",
                                     num_positional_embeddings=32)
    x = torch.randn(2 * 16, 320, 32, 32)
    return model, lambda m: m(x, num_frames=16)


def _hf_layer():
    from transformers import TimesformerConfig
    from transformers.models.timesformer.modeling_timesformer import TimesformerLayer

    config = TimesformerConfig(image_size=224, patch_size=16, num_frames=8, hidden_size=768, num_attention_heads=12,
                               intermediate_size=3072)
    x = torch.randn(2, 1 + 196 * 8, 768)
    return TimesformerLayer(config, 0), lambda m: m(x)[0]


def _official_block():
    sys.path.insert(0, "tests")
    from official_block import Block

    x = torch.randn(2, 1 + 196 * 8, 768)
    return Block(768, 12, 4.0, qkv_bias=True), lambda m: m(x, 2, 8, 14)


def _lucidrains():
    from timesformer_pytorch import TimeSformer

    video = torch.randn(2, 8, 3, 224, 224)
    return (TimeSformer(dim=768, image_size=224, patch_size=16, num_frames=8, num_classes=10, depth=1, heads=12,
                        dim_head=64), lambda m: m(video))


def _mmaction_layer():
    sys.path.insert(0, "tests")
    from mmaction_loader import load_mmaction_transformer
    from mmcv.cnn.bricks.transformer import build_transformer_layer_sequence

    mt = load_mmaction_transformer()
    common = dict(embed_dims=768, num_heads=12, num_frames=8, norm_cfg=dict(type="LN", eps=1e-6))
    layer = dict(type="BaseTransformerLayer",
                 attn_cfgs=[dict(type=mt.DividedTemporalAttentionWithNorm, **common),
                            dict(type=mt.DividedSpatialAttentionWithNorm, **common)],
                 ffn_cfgs=dict(type=mt.FFNWithNorm, embed_dims=768, feedforward_channels=3072,
                               act_cfg=dict(type="GELU"), norm_cfg=dict(type="LN", eps=1e-6)),
                 operation_order=("self_attn", "self_attn", "ffn"))
    model = build_transformer_layer_sequence(dict(type="TransformerLayerSequence", transformerlayers=[layer],
                                                  num_layers=1))
    x = torch.randn(2, 1 + 196 * 8, 768)
    return model, lambda m: m(x, None, None)


CASES = {"motion_module": _motion_module, "hf_layer": _hf_layer, "official_block": _official_block,
         "lucidrains": _lucidrains, "mmaction_layer": _mmaction_layer}


def _step(run, model, mode):
    if mode == "fwd":
        with torch.no_grad():
            run(model)
    else:
        model.zero_grad(set_to_none=True)
        run(model).sum().backward()


def time_case(name: str, repeats: int) -> dict:
    """{(variant, mode): median seconds}, the variants timed in turn within each repeat."""
    torch.manual_seed(0)
    model, run = CASES[name]()
    model.eval()
    variants = {"original": model, "patched auto": tk.patch(copy.deepcopy(model), backend="auto"),
                "patched torch": tk.patch(copy.deepcopy(model), backend="torch")}
    results = {}
    for mode in ("fwd", "fwd+bwd"):
        times = {v: [] for v in variants}
        for m in variants.values():
            _step(run, m, mode)  # warm-up
        for _ in range(repeats):
            for v, m in variants.items():
                t0 = time.perf_counter()
                _step(run, m, mode)
                times[v].append(time.perf_counter() - t0)
        results.update({(v, mode): statistics.median(t) for v, t in times.items()})
    return results


def check_overhead_us(repeats: int = 2000) -> dict:
    """Microseconds per call of what a patched forward checks before its fused code (the
    module's structure, hooks and the call's arguments), on tiny HF and diffusers modules."""
    from timesformer_kernels.integrations import diffusers, huggingface
    from transformers import TimesformerConfig
    from transformers.models.timesformer.modeling_timesformer import TimesformerLayer
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    hf = tk.patch(TimesformerLayer(TimesformerConfig(image_size=16, patch_size=8, num_frames=2, hidden_size=16,
                                                     num_attention_heads=2, intermediate_size=16), 0),
                  backend="torch")
    motion = tk.patch(AnimateDiffTransformer3D(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                               norm_num_groups=4), backend="torch")
    out = {}
    for name, module, family, args, kwargs in (
            ("hf_layer", hf, huggingface, (torch.randn(1, 9, 16),), {}),
            ("motion_module", motion, diffusers, (torch.randn(2, 16, 2, 2),), {"num_frames": 2})):
        fused = module.__dict__["forward"]
        t0 = time.perf_counter()
        for _ in range(repeats):
            assert fused.module_reason(family) is None
        structure = (time.perf_counter() - t0) / repeats * 1e6
        t0 = time.perf_counter()
        for _ in range(repeats):
            _arguments_checked(family, fused, args, kwargs)
        arguments = (time.perf_counter() - t0) / repeats * 1e6
        out[name] = (structure, arguments)
    return out


def _arguments_checked(family, fused, args, kwargs):
    """The argument binding and per-call reasons of ``family.forward`` without running it."""
    from timesformer_kernels.integrations._common import bind_arguments, signature_of

    signature = signature_of(type(fused.module).forward)
    arguments = bind_arguments(signature, fused.module, args, kwargs)
    if family.KIND == "huggingface":
        assert family._fallback_reason(fused, arguments, signature, "hidden_states") == (None, None)
    else:
        assert family._channel_first_reason(fused, arguments) is None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, median of {args.repeats} (seconds)")
    for name in args.cases.split(","):
        r = time_case(name, args.repeats)
        for mode in ("fwd", "fwd+bwd"):
            base = r[("original", mode)]
            cells = ", ".join(f"{v} {r[(v, mode)]:.3f} ({base / r[(v, mode)]:.2f}x)"
                              for v in ("patched auto", "patched torch"))
            print(f"{name:15s} {mode:8s} original {base:.3f}, {cells}", flush=True)
    for name, (structure, arguments) in check_overhead_us().items():
        print(f"checks per call, {name}: module {structure:.1f} us, arguments {arguments:.1f} us")


if __name__ == "__main__":
    main()
