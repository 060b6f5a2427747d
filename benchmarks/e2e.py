"""End-to-end: whole TimeSformer models, unpatched vs ``tk.patch``-ed, eager vs torch.compile.

Models (random init, never downloaded):
    hf          transformers' TimesformerForVideoClassification, base config (8×224², patch 16,
                D=768, 12 layers, 12 heads, 400 classes)
    lucidrains  timesformer_pytorch.TimeSformer at the same size (dim 768, depth 12, 12 heads of
                64, 8×224², patch 16, its default rotary embeddings), when importable

Variants: ``eager`` (the model as is), ``patched`` (``timesformer_kernels.patch(model)``),
``compiled`` (``torch.compile(model)``), ``compiled_patched`` (patch, then compile).
Modes: ``inference`` (a forward under torch.no_grad) and ``train`` (zero_grad, forward,
cross-entropy, backward, AdamW step), both under bf16 autocast (fp32 weights).

Every inference variant's logits are checked against the eager model's float32 logits on the
same clip before it is timed (relative error at most 5e-2, or 3× the eager model's own error
under autocast if that is larger). All inference runs come before any training step, so the
weights they check are the same. Step times are CUDA events around each whole step after
warm-up (the first compiled call compiles); peak memory is the most allocated during the
timed steps, absolute and above what was allocated when timing began (weights, optimizer
state and the previous step's gradients).
"""
from __future__ import annotations

import gc
import time
import traceback
from typing import Callable

import torch
import torch.nn.functional as F

from .micro import Context, Mismatch, _short, rel_err
from .timing import quantiles, synchronize

VARIANTS = ("eager", "patched", "compiled", "compiled_patched")
MODES = ("inference", "train")
MODELS = ("hf", "lucidrains")
KERNEL = {"hf": "e2e_hf_timesformer", "lucidrains": "e2e_lucidrains_timesformer"}
LOGITS_TOL = 5e-2  # bf16 autocast against float32 logits
# Seconds each (variant, mode) is expected to take on a GPU, checked against the budget.
COST_S = {("compiled", "inference"): 90.0, ("compiled", "train"): 180.0, "default": 20.0}


def _build_hf(smoke: bool, device: torch.device):
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    if smoke:
        config = TimesformerConfig(image_size=32, patch_size=16, num_frames=2, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, num_labels=10)
    else:
        config = TimesformerConfig(num_labels=400)  # the base configuration
    with torch.device(device):
        model = TimesformerForVideoClassification(config)
    spec = {"frames": config.num_frames, "image": config.image_size, "channels": config.num_channels,
            "classes": config.num_labels, "dim": config.hidden_size, "depth": config.num_hidden_layers,
            "heads": config.num_attention_heads}
    return model, spec, lambda m, video: m(pixel_values=video).logits


def _build_lucidrains(smoke: bool, device: torch.device):
    from timesformer_pytorch import TimeSformer

    if smoke:
        spec = {"frames": 2, "image": 32, "channels": 3, "classes": 10, "dim": 32, "depth": 2, "heads": 2}
        dim_head = 16
    else:
        spec = {"frames": 8, "image": 224, "channels": 3, "classes": 400, "dim": 768, "depth": 12, "heads": 12}
        dim_head = 64
    with torch.device(device):
        model = TimeSformer(dim=spec["dim"], num_frames=spec["frames"], num_classes=spec["classes"],
                            image_size=spec["image"], patch_size=16, channels=spec["channels"], depth=spec["depth"],
                            heads=spec["heads"], dim_head=dim_head)
    return model, spec, lambda m, video: m(video)


BUILDERS = {"hf": _build_hf, "lucidrains": _build_lucidrains}


def _time_steps(step: Callable[[], object], device: torch.device, warmup: int, reps: int):
    """(times in ms, peak MiB, peak above the start in MiB) of ``reps`` steps after ``warmup``."""
    for _ in range(warmup):
        step()
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    if not cuda:
        return times, None, None
    peak = torch.cuda.max_memory_allocated(device)
    return times, peak / 2**20, (peak - base) / 2**20


def run_model(ctx: Context, model_name: str, variants: list[str], modes: list[str], batch: int, warmup: int,
              reps: int, smoke: bool, label: str = "") -> None:
    import timesformer_kernels as tk

    kernel, device = KERNEL[model_name], ctx.device
    done = {(v, m): ctx.previous.e2e[(kernel, v, m, batch)] for v in variants for m in modes
            if (kernel, v, m, batch) in ctx.previous.e2e}
    if done:
        ctx.log(f"{label}{kernel}: measured before (--resume): " + ", ".join(f"{m} {v}" for v, m in done))
    if len(done) == len(variants) * len(modes):
        return
    try:
        model, spec, forward = BUILDERS[model_name](smoke, device)
    except ImportError as e:
        for mode in modes:
            for v in variants:
                ctx.writer.add(kernel, v, "skipped", "B", batch, config={"mode": mode, "reason": _short(e)})
        ctx.log(f"{label}{kernel}: skipped: {_short(e)}")
        return
    except Exception as e:  # noqa: BLE001
        for mode in modes:
            for v in variants:
                ctx.writer.add(kernel, v, "error", "B", batch, config={"mode": mode, "error": _short(e)})
        ctx.failures.append(f"{kernel}: building the model: {_short(e)}")
        ctx.log(f"{label}{kernel}: ERROR building the model: {_short(e)}")
        return
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    cfg = {**spec, "B": batch, "autocast": "bfloat16", "params_M": round(params_m, 1)}
    ctx.log(f"{label}{kernel}: {params_m:.1f} M parameters, B={batch}, "
            f"{spec['frames']}×{spec['image']}², bf16 autocast")
    gen = torch.Generator(device=device).manual_seed(0)
    video = torch.randn(batch, spec["frames"], spec["channels"], spec["image"], spec["image"], device=device,
                        generator=gen)
    labels = torch.randint(0, spec["classes"], (batch,), device=device, generator=gen)
    model.eval()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    with torch.no_grad():
        ref_logits = forward(model, video).float()
        with autocast:
            eager_err = rel_err(forward(model, video).float(), ref_logits)
    # A variant may differ from the float32 logits by bf16 rounding, as much as the eager model does.
    tol = max(LOGITS_TOL, 3 * eager_err)

    for mode in modes:  # all inference before any training step changes the weights
        times: dict = {v: t for (v, m), t in done.items() if m == mode}
        for variant in variants:
            if (variant, mode) in done:
                continue
            vcfg = {**cfg, "mode": mode}
            cost = COST_S.get(("compiled", mode), 0) if "compiled" in variant else COST_S["default"]
            if device.type != "cuda":
                cost = 1.0
            if not ctx.deadline.allows(cost):
                reason = f"time budget: {ctx.deadline.left():.0f} s left, about {cost:.0f} s needed"
                ctx.writer.add(kernel, variant, "skipped", "B", batch, config={**vcfg, "reason": reason})
                ctx.log(f"{label}{kernel} {mode:9s} {variant:16s} skipped: {reason}")
                continue
            opt = None
            t_start = time.monotonic()
            try:
                if "patched" in variant:
                    tk.patch(model)
                runner = model
                if "compiled" in variant:
                    torch._dynamo.reset()
                    runner = torch.compile(model)
                if mode == "inference":
                    model.eval()

                    def step():
                        with torch.no_grad(), autocast:
                            return forward(runner, video)

                    err = rel_err(step().float(), ref_logits)
                    ctx.writer.add(kernel, variant, "rel_err", "B", batch, err, config={**vcfg, "vs": "eager float32"})
                    if not err <= tol:
                        raise Mismatch(f"logits differ from the eager float32 model: relative error {err:.3g} > "
                                       f"{tol:.3g} (eager under autocast: {eager_err:.3g})")
                else:
                    model.train()
                    fused = {"fused": True} if device.type == "cuda" else {}
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)

                    def step():
                        opt.zero_grad(set_to_none=True)
                        with autocast:
                            logits = forward(runner, video)
                        loss = F.cross_entropy(logits.float(), labels)
                        loss.backward()
                        opt.step()
                        return loss

                    loss = step()
                    if not torch.isfinite(loss).item():
                        raise Mismatch(f"training loss is {loss.item()}")
                samples, peak, delta = _time_steps(step, device, max(0, warmup - 1), reps)
            except Exception as e:  # noqa: BLE001 - one variant's failure must not end the run
                msg = _short(e)
                ctx.writer.add(kernel, variant, "error", "B", batch, config={**vcfg, "error": msg})
                ctx.failures.append(f"{kernel} {mode} {variant}: {msg}")
                ctx.log(f"{label}{kernel} {mode:9s} {variant:16s} ERROR {msg}")
                if not isinstance(e, Mismatch):
                    tb = traceback.format_exception(type(e), e, e.__traceback__)
                    ctx.log("    " + "    ".join(tb[-3:]).rstrip())
                continue
            finally:
                if "patched" in variant:
                    tk.unpatch(model)
                if "compiled" in variant:
                    torch._dynamo.reset()
                opt = runner = None  # drop the optimizer state and compiled graphs before the next variant
                model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            p50, p20, p80 = quantiles(samples)
            times[variant] = (p50, p20, p80)
            w = ctx.writer
            w.add(kernel, variant, "step_ms", "B", batch, p50, p20, p80, config=vcfg)
            w.add(kernel, variant, "clips_per_s", "B", batch, batch / p50 * 1e3, batch / p80 * 1e3,
                  batch / p20 * 1e3, config=vcfg)
            if peak is not None:
                w.add(kernel, variant, "peak_mem_mb", "B", batch, peak, config=vcfg)
                w.add(kernel, variant, "peak_mem_delta_mb", "B", batch, delta, config=vcfg)
            mem = f"  peak {peak:.0f} MiB (Δ {delta:.0f})" if peak is not None else ""
            ctx.log(f"{label}{kernel} {mode:9s} {variant:16s} {p50:9.2f} ms [{p20:.2f}, {p80:.2f}]  "
                    f"{batch / p50 * 1e3:8.1f} clips/s{mem}  ({time.monotonic() - t_start:.0f} s with warm-up)")
        for variant, (p50, p20, p80) in times.items():
            for base in ("eager", "compiled"):
                if (variant, mode) in done and (base, mode) in done:
                    continue  # both from the earlier run: its rows are kept by the merge
                if base in times and variant != base and not (base == "compiled" and variant in ("eager", "patched")):
                    b50, b20, b80 = times[base]
                    ctx.writer.add(kernel, variant, f"speedup_vs_{base}", "B", batch, b50 / p50, b20 / p80, b80 / p20,
                                   config={**cfg, "mode": mode})
