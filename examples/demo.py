"""The main job: swap the fused attention into a Hugging Face TimeSformer, check that outputs
and gradients match the original model, and time both.

On a GPU: a TimeSformer-base-sized model (random weights; no hub download), bf16 autocast,
fused (backend "auto") vs. the original code. On a CPU: a small model, backend "torch", and
one tiny check of the Triton kernels under the interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import copy
import os
import time

import torch

cuda = torch.cuda.is_available()
if not cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import timesformer_kernels as tk  # noqa: E402
from transformers import TimesformerConfig, TimesformerForVideoClassification  # noqa: E402


def build(size: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if size == "base":  # TimeSformer-base: 8 frames of 224², 12 layers of 768
        cfg = dict(image_size=224, patch_size=16, num_frames=8, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, num_labels=400)
        batch = 8
    else:  # small: 4 frames of 64², 2 layers of 64
        cfg = dict(image_size=64, patch_size=16, num_frames=4, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=128, num_labels=10)
        batch = 2
    torch.manual_seed(0)
    model = TimesformerForVideoClassification(TimesformerConfig(**cfg))
    video = torch.randn(batch, cfg["num_frames"], 3, cfg["image_size"], cfg["image_size"])
    return model, video


def step(model, video, dtype):
    """One forward and backward; returns (logits, {param name: grad})."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(video.device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(pixel_values=video).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check(original, patched, video, dtype, tol):
    ref_logits, ref_grads = step(original, video, dtype)
    logits, grads = step(patched, video, dtype)
    worst = max(max_rel_err(grads[n], g) for n, g in ref_grads.items())
    err = max_rel_err(logits, ref_logits)
    print(f"  logits max rel err {err:.2e}, worst parameter-gradient max rel err {worst:.2e} (tol {tol:g})")
    if err > tol or worst > tol:
        raise SystemExit("MISMATCH between the patched and the original model")


def timed(model, video, dtype, repeats):
    """Median seconds of one training step (forward + backward)."""
    for _ in range(2):
        step(model, video, dtype)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(model, video, dtype)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    print(tk.info(), "\n")
    device = "cuda" if cuda else "cpu"
    size, dtype, tol = ("base", torch.bfloat16, 5e-2) if cuda else ("small", torch.float32, 2e-4)
    original, video = build(size)
    original, video = original.to(device), video.to(device)
    backend = "auto" if cuda else "torch"  # on CPU tensors "auto" trains with the original code (README)
    patched = tk.patch(copy.deepcopy(original), backend=backend)
    print(f"model: HF TimesformerForVideoClassification ({size}), video {tuple(video.shape)}, {dtype}, {device}")
    print("patched layers:", tk.integrations.patch_summary(patched))
    print(f"check, backend {backend}:")
    check(original, patched, video, dtype, tol)
    if not cuda:
        print("check, backend triton (interpreter, one clip):")
        check(original, tk.patch(copy.deepcopy(original), backend="triton"), video[:1], dtype, tol)
    repeats = 20 if cuda else 5
    t_orig = timed(original, video, dtype, repeats)
    t_fused = timed(patched, video, dtype, repeats)
    print(f"training step (fwd+bwd), median of {repeats}: original {t_orig * 1e3:.2f} ms, "
          f"fused {t_fused * 1e3:.2f} ms, speed-up {t_orig / t_fused:.2f}x")
    if not cuda:
        print("(CPU: the fused path is the plain PyTorch backend; the speed-up that matters is on a GPU)")
    print("OK: patched model matches the original")


if __name__ == "__main__":
    main()
