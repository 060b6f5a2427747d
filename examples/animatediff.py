"""Swap the fused temporal attention into an AnimateDiff UNet (diffusers' UNetMotionModel),
check the denoiser's output against the original, and time one denoising step.

On a GPU: an SD 1.5-sized UNetMotionModel (random weights; no hub download) in bf16, 16
frames of 512² (64² latents), batch 2 (classifier-free guidance). On a CPU: a tiny UNet in
float32 with the "torch" backend and 4 frames. With a real pipeline the call is the same:
``tk.patch(pipe.unet)``.
"""
from __future__ import annotations

import time

import torch
from diffusers import UNetMotionModel

import timesformer_kernels as tk

cuda = torch.cuda.is_available()
device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
frames, batch = (16 if cuda else 4), 2
torch.manual_seed(0)
if cuda:  # SD 1.5 + the AnimateDiff v1.5 motion adapter
    unet, size, text_dim = UNetMotionModel(sample_size=64, cross_attention_dim=768), 64, 768
else:
    unet = UNetMotionModel(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=8,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), cross_attention_dim=32,
                           num_attention_heads=2, motion_num_attention_heads=2)
    size, text_dim = 8, 32
unet = (unet.to(device, dtype) if cuda else unet).eval()
latents = torch.randn(batch, 4, frames, size, size, device=device, dtype=dtype)
text = torch.randn(batch * frames, 77, text_dim, device=device, dtype=dtype)  # one prompt embedding per frame
t = torch.tensor([500] * batch, device=device)


def step_ms(reps: int = 5 if cuda else 1) -> tuple[torch.Tensor, float]:
    """The denoiser's output and the median time of one step (no grad)."""
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = unet(latents, t, text).sample
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
    return out.float(), sorted(times[1:])[reps // 2]


ref, eager = step_ms()
tk.patch(unet, backend="auto" if cuda else "torch")
print("patched:", tk.integrations.patch_summary(unet), "motion modules")
out, fused = step_ms()
err = ((out - ref).norm() / ref.norm()).item()
print(f"relative difference to the original UNet: {err:.2e}")
print(f"one denoising step: original {eager:.1f} ms, patched {fused:.1f} ms ({device}, {dtype})")
tk.unpatch(unet)
