"""Video diffusion rows: diffusers' temporal transformers at the shapes people run, upstream
(``eager``) vs ``tk.patch``-ed (``patched``), and the temporal attention alone.

Cases (random init, never downloaded; bf16 weights and inputs, as pipelines run them):

    animatediff_c{320,640,1280}  AnimateDiffTransformer3D of SD 1.5's motion adapter: 8 heads
                                 (head dim 40 / 80 / 160), 16 frames, batch 2 (classifier-free
                                 guidance), latents 64² / 32² / 16² (512² images)
    attention_c{320,640,1280}    its temporal attention alone: upstream's SDPA over
                                 (B·H·W, heads, F, Dh) from (B·H·W, F, 3C) (``sdpa``) vs
                                 tk.temporal_attention reading (B, F·H·W, 3C) time-major (``tk``)
    svd_f{14,25}                 TemporalBasicTransformerBlock of Stable Video Diffusion's top
                                 level: 320 channels, 5 heads of 64, 576×1024 (72×128 latents),
                                 batch 2, a one-token 1024-channel time context
    latte_f16                    one layer (spatial + temporal block) of LatteTransformer3DModel:
                                 16 heads of 72, 512² (64² latents, patches of 2), 16 frames, batch 2
    unet_step                    one denoising step (UNet forward, no grad) of an SD 1.5-sized
                                 UNetMotionModel, 16 frames, batch 2: eager, patched, compiled,
                                 compiled_patched

Modes ``fwd`` (no grad) and ``fwd+bwd`` (backward of a fixed weighting of the output, every
parameter requiring grad); unet_step is fwd only. Every variant's output is checked against
eager's first (``rel_err`` row, error above 5e-2). Rows: kernel_name ``diffusion_<case>``,
provider = variant, ``step_ms`` (median, p20, p80), ``peak_mem_mb`` (CUDA) and
``speedup_vs_eager``. ``--smoke``: tiny float32 versions on the CPU (the torch backend).
"""
from __future__ import annotations

import gc
import traceback

import torch

from .micro import Context, Mismatch, _short, rel_err
from .timing import bench, peak_memory_mb

KERNEL = "diffusion_{}"
REL_TOL = 5e-2
# Seconds a case is expected to take on a GPU (with warm-up and compilation), checked against the budget.
COST_S = {"unet_step": 300.0, "default": 15.0}


def _animatediff(channels, pixels, frames, batch, smoke):
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    heads = 2 if smoke else 8
    model = AnimateDiffTransformer3D(num_attention_heads=heads, attention_head_dim=channels // heads,
                                     in_channels=channels, norm_num_groups=4 if smoke else 32,
                                     positional_embeddings="sinusoidal", num_positional_embeddings=32)
    x = torch.randn(batch * frames, channels, pixels, pixels)
    return model, (x,), lambda m, x: m(x, num_frames=frames)


def _svd(frames, batch, smoke):
    from diffusers.models.attention import TemporalBasicTransformerBlock

    channels, heads, pixels, context = (32, 2, 12, 16) if smoke else (320, 5, 72 * 128, 1024)
    model = TemporalBasicTransformerBlock(channels, channels, heads, channels // heads, cross_attention_dim=context)
    x = torch.randn(batch * frames, pixels, channels)
    time_context = torch.randn(batch * pixels, 1, context)
    return model, (x, time_context), lambda m, x, c: m(x, frames, encoder_hidden_states=c)


def _latte(frames, batch, smoke):
    from diffusers import LatteTransformer3DModel

    heads, head_dim, size = (2, 8, 8) if smoke else (16, 72, 64)
    model = LatteTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                    out_channels=8, num_layers=1, sample_size=size, patch_size=2,
                                    caption_channels=32 if smoke else 4096, video_length=frames,
                                    norm_type="ada_norm_single", cross_attention_dim=heads * head_dim,
                                    attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6)
    x = torch.randn(batch, 4, frames, size, size)
    text = torch.randn(batch, 8 if smoke else 120, 32 if smoke else 4096)
    timestep = torch.tensor([500] * batch)
    return model, (x, text, timestep), lambda m, x, t, s: m(x, timestep=s, encoder_hidden_states=t).sample


def _unet(frames, batch, smoke):
    from diffusers import UNetMotionModel

    if smoke:
        model = UNetMotionModel(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=8,
                                down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                                up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=16,
                                num_attention_heads=2, motion_num_attention_heads=2)
        size, text_dim = 8, 16
    else:  # SD 1.5 + the AnimateDiff v1.5 motion adapter: the defaults
        model = UNetMotionModel(sample_size=64, cross_attention_dim=768)
        size, text_dim = 64, 768
    x = torch.randn(batch, 4, frames, size, size)
    text = torch.randn(batch * frames, 77, text_dim)
    return model, (x, text), lambda m, x, t: m(x, torch.tensor([500] * batch, device=x.device), t).sample


def _attention(channels, pixels, frames, batch, smoke):
    """(sdpa, tk) callables on one qkv (B, F·S, 3C) frame-major, and the qkv."""
    import torch.nn.functional as F

    import timesformer_kernels as tk

    heads = 2 if smoke else 8
    s = pixels * pixels
    qkv = torch.randn(batch, frames * s, 3 * channels)

    def sdpa(qkv):  # upstream: (B·S, F, C) q, k, v after the permute, heads split by views
        seq = qkv.view(batch, frames, s, 3 * channels).transpose(1, 2).reshape(batch * s, frames, 3 * channels)
        q, k, v = (t.view(batch * s, frames, heads, -1).transpose(1, 2) for t in seq.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch * s, frames, channels)
        return out.view(batch, s, frames, channels).transpose(1, 2).reshape(batch, frames * s, channels)

    def fused(qkv):
        return tk.temporal_attention(qkv, frames, heads, token_order="time_major")

    return {"sdpa": sdpa, "tk": fused}, qkv


def cases(smoke: bool) -> list:
    """(name, builder, modes, variants) in the order they run."""
    frames, batch = (6, 2) if smoke else (16, 2)
    levels = [(16, 4), (32, 2)] if smoke else [(320, 64), (640, 32), (1280, 16)]
    out = []
    for c, p in levels:
        out.append((f"attention_c{c}", lambda c=c, p=p: _attention(c, p, frames, batch, smoke), ("fwd", "fwd+bwd"),
                    ("sdpa", "tk")))
        out.append((f"animatediff_c{c}", lambda c=c, p=p: _animatediff(c, p, frames, batch, smoke),
                    ("fwd", "fwd+bwd"), ("eager", "patched")))
    for f in ((6,) if smoke else (14, 25)):
        out.append((f"svd_f{f}", lambda f=f: _svd(f, batch, smoke), ("fwd", "fwd+bwd"), ("eager", "patched")))
    out.append((f"latte_f{frames}", lambda: _latte(frames, batch, smoke), ("fwd", "fwd+bwd"), ("eager", "patched")))
    unet_variants = ("eager", "patched") if smoke else ("eager", "patched", "compiled", "compiled_patched")
    out.append(("unet_step", lambda: _unet(frames, batch, smoke), ("fwd",), unet_variants))
    return out


def _runner(model, forward, variant):
    """The callable a variant times: the attention alone's function, or the (patched, compiled) model."""
    import timesformer_kernels as tk

    if isinstance(model, dict):
        return model[variant]
    if "patched" in variant:  # on the CPU (the smoke run) the fused torch path: auto would run diffusers' code
        tk.patch(model, backend="auto" if next(model.parameters()).is_cuda else "torch")
    runner = torch.compile(model) if "compiled" in variant else model
    return lambda *inputs: forward(runner, *inputs)


def run_all(ctx: Context, smoke: bool, label: str = "") -> None:
    """Every case; each failure becomes an error row and the run goes on."""
    device = ctx.device
    dtype = torch.float32 if smoke else torch.bfloat16
    for name, build, modes, variants in cases(smoke):
        kernel = KERNEL.format(name)
        cost = 1.0 if smoke else COST_S.get(name, COST_S["default"])
        if not ctx.deadline.allows(cost):
            reason = f"time budget: {ctx.deadline.left():.0f} s left, about {cost:.0f} s needed"
            for v in variants:
                ctx.writer.add(kernel, v, "skipped", "", "", config={"reason": reason})
            ctx.log(f"{label}{kernel} skipped: {reason}")
            continue
        model = inputs = None
        try:
            torch.manual_seed(0)
            with torch.device(device):  # weights and inputs made where they run
                model, *rest = build()
            if isinstance(model, torch.nn.Module):
                inputs, forward = rest
                model = model.to(device, dtype)
                inputs = tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs)
            else:  # attention alone: {variant: fn}, qkv
                inputs, forward = (rest[0].to(device, dtype),), None
            _run_case(ctx, kernel, model, forward, inputs, modes, variants, label)
        except ImportError as e:  # diffusers is not installed: nothing to measure
            for v in variants:
                ctx.writer.add(kernel, v, "skipped", "", "", config={"reason": _short(e)})
            ctx.log(f"{label}{kernel} skipped: {_short(e)}")
        except Exception as e:  # noqa: BLE001 - never lose the rows already written
            ctx.writer.add(kernel, "", "error", "", "", config={"error": _short(e)})
            ctx.failures.append(f"{kernel}: {_short(e)}")
            ctx.log(f"{label}{kernel}: ERROR {_short(e)}")
            ctx.log("    " + "    ".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:]).rstrip())
        finally:
            model = inputs = None
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _run_case(ctx, kernel, model, forward, inputs, modes, variants, label):
    import timesformer_kernels as tk

    device = ctx.device
    module = isinstance(model, torch.nn.Module)
    for mode in modes:
        grad = mode == "fwd+bwd"
        if module:
            model.train(grad).requires_grad_(grad)
        leaf = tuple(t.detach().requires_grad_(grad and t.is_floating_point() and not module) for t in inputs)
        ref = None
        times = {}
        for variant in variants:
            cfg = {"mode": mode, "dtype": str(leaf[0].dtype).replace("torch.", ""),
                   "shape": list(leaf[0].shape)}
            try:
                run = _runner(model, forward, variant)
                with torch.no_grad():
                    out = run(*leaf).float()
                if ref is None:
                    ref = out
                else:
                    err = rel_err(out, ref)
                    ctx.writer.add(kernel, variant, "rel_err", "", "", err, config={**cfg, "vs": variants[0]})
                    if not err <= REL_TOL:
                        raise Mismatch(f"output differs from {variants[0]}'s: relative error {err:.3g}")
                if grad:
                    weight = torch.randn_like(out).to(leaf[0].dtype)

                    def step():
                        params = list(model.parameters()) if module else [t for t in leaf if t.requires_grad]
                        return torch.autograd.grad((run(*leaf) * weight).sum(), params, allow_unused=True)
                else:
                    def step():
                        with torch.no_grad():
                            return run(*leaf)
                step()  # compilation, autotuning, allocation stay out of the numbers
                p50, p20, p80 = bench(step, device, ctx.warmup_ms, ctx.rep_ms, ctx.min_reps)
                peak = peak_memory_mb(step, device)
            except Exception as e:  # noqa: BLE001 - one variant's failure must not end the case
                ctx.writer.add(kernel, variant, "error", "", "", config={**cfg, "error": _short(e)})
                ctx.failures.append(f"{kernel} {mode} {variant}: {_short(e)}")
                ctx.log(f"{label}{kernel} {mode:7s} {variant:16s} ERROR {_short(e)}")
                continue
            finally:
                if module:
                    tk.unpatch(model)
                torch._dynamo.reset()
            times[variant] = (p50, p20, p80)
            ctx.writer.add(kernel, variant, "step_ms", "", "", p50, p20, p80, config=cfg)
            if peak is not None:
                ctx.writer.add(kernel, variant, "peak_mem_mb", "", "", peak, config=cfg)
            mem = f"  peak {peak:.0f} MiB" if peak is not None else ""
            ctx.log(f"{label}{kernel} {mode:7s} {variant:16s} {p50:9.3f} ms [{p20:.3f}, {p80:.3f}]{mem}")
        base = variants[0]
        for variant, (p50, p20, p80) in times.items():
            if variant != base and base in times:
                b50, b20, b80 = times[base]
                ctx.writer.add(kernel, variant, f"speedup_vs_{base}", "", "", b50 / p50, b20 / p80, b80 / p20,
                               config={"mode": mode})
