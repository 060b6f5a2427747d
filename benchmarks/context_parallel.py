"""Context parallelism (``tk.context_parallel``): what each rank sends, by formula, and step time and
memory per rank, measured.

    python -m benchmarks.context_parallel --table          # the README's communication table
    torchrun --nproc-per-node P -m benchmarks.context_parallel [--out DIR]   # rows at this P (NCCL on GPUs)

Bytes a rank sends per divided space-time block, forward, B clips of T frames of N patches, D
channels, e bytes per element, P ranks splitting the frames (T_l = T/P):

    frame split (ours)   (N - N_r + (P-1)·N_r)·T_l·B·D·e + 2·(P-1)/P·B·D·e
                         the temporal branch's input (D channels) to the patch split: its frames of
                         every patch but its own N_r; its output back: every other rank's frames of
                         its N_r patches; then the cls token's all-reduce (a ring all-reduce sends
                         2·(P-1)/P of its data)
    qkv all-to-all       (3·(N - N_r) + (P-1)·N_r)·T_l·B·D·e (+ the same all-reduce)
                         q, k, v (3·D) to the patch split and the attention's output (D) back
    Ulysses              4·(P-1)/P·(N·T_l·B)·D·e, needs H divisible by P
                         q, k, v and the output each by an all-to-all between a sequence split and a
                         head split (DeepSpeed-Ulysses on the temporal attention; the spatial one is
                         local under a frame split either way)
    ring                 2·(P-1)·N·T_l·B·D·e
                         every rank's K and V blocks (2·D) pass P - 1 hops around the ring

With N_r = N/P the frame split sends 2·(P-1)/P²·B·N·T·D·e, half of Ulysses and 1/P of the
ring, and the qkv all-to-all as much as Ulysses. The backward moves the same again for the all-to-all schemes (each collective's backward
is its conjugate); ring attention's backward passes K, V and their gradients (twice its forward).

The rows (``torchrun``, one process per GPU, NCCL; gloo on the CPU with ``--smoke``):
``context_parallel_hf_train`` (a Hugging Face TimesformerForVideoClassification at the base
size, ``--frames`` frames of 224², B = 1: forward, backward, AdamW step under bf16 autocast) and
``context_parallel_animatediff`` (an SD 1.5-sized UNetMotionModel, ``--frames`` frames of 64²
latents, batch 2, one denoising step in bf16, no grad); metrics ``step_ms`` (median, p20, p80
over ``--reps`` steps after ``--warmup``) and ``peak_mem_mb`` (this rank's peak during the
steps), x = ranks. Each launch writes ``context_parallel_p{P}.csv`` under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch

# (N patches per frame, T frames, D channels, H heads) of the TimeSformer models, batch 1
SHAPES = {"base": (196, 8, 768, 12), "hr": (784, 16, 768, 12), "l": (196, 96, 768, 12)}
SCHEMES = ("frame_split", "qkv_all_to_all", "ulysses", "ring")
FAMILIES = ("hf", "animatediff")


def sent_bytes(scheme: str, batch: int, patches: int, frames: int, dim: int, ranks: int, element: int = 2,
               rank: int = 0) -> float:
    """Bytes rank ``rank`` of ``ranks`` sends per block, forward, under ``scheme`` (module docstring);
    ``frames`` is T, the whole clip's."""
    local = frames // ranks
    own = patches // ranks + (rank < patches % ranks)  # N_r, as parallel.FrameSplit.patch_counts splits N
    cls_all_reduce = 2 * (ranks - 1) / ranks * batch * dim * element
    back = (ranks - 1) * own  # the patch split's output: every other rank's frames of this rank's patches
    if scheme == "frame_split":
        return (patches - own + back) * local * batch * dim * element + cls_all_reduce
    if scheme == "qkv_all_to_all":
        return (3 * (patches - own) + back) * local * batch * dim * element + cls_all_reduce
    if scheme == "ulysses":
        return 4 * (ranks - 1) / ranks * patches * local * batch * dim * element
    if scheme == "ring":
        return 2 * (ranks - 1) * patches * local * batch * dim * element
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def table(ranks=(2, 4, 8)) -> str:
    """The README's table: MiB each rank sends per block (forward), bf16, B = 1."""
    lines = ["| model (N, T) | P | frame split (ours) | qkv all-to-all | Ulysses | ring |", "|---|---|---|---|---|---|"]
    for name, (n, t, d, h) in SHAPES.items():
        for p in ranks:
            cells = []
            for scheme in SCHEMES:
                mib = sent_bytes(scheme, 1, n, t, d, p) / 2**20
                cells.append(f"n/a ({h} heads)" if scheme == "ulysses" and h % p else f"{mib:.2f}")
            lines.append(f"| TimeSformer-{name.upper() if name != 'base' else 'base'} ({n}, {t}) | {p} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ measured rows
def _hf(frames: int, smoke: bool, device: torch.device):
    from transformers import TimesformerConfig, TimesformerForVideoClassification

    if smoke:
        config = TimesformerConfig(image_size=32, patch_size=16, num_frames=frames, hidden_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=10)
    else:
        config = TimesformerConfig(num_frames=frames, num_labels=400)
    torch.manual_seed(0)
    with torch.device(device):
        model = TimesformerForVideoClassification(config)
    video = torch.randn(1, frames, 3, config.image_size, config.image_size, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    return model, lambda m: torch.nn.functional.cross_entropy(m(pixel_values=video).logits, labels)


def _animatediff(frames: int, smoke: bool, device: torch.device):
    from .diffusion import _unet

    torch.manual_seed(0)
    model, inputs, forward = _unet(frames, 2, smoke)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = model.to(device, dtype)
    inputs = [x.to(device, dtype) for x in inputs]
    return model, lambda m: forward(m, *inputs)


def measure(family: str, frames: int, smoke: bool, device: torch.device, warmup: int, reps: int) -> dict:
    """Step times (ms) and peak memory (MiB; None on the CPU) of ``family`` under tk.context_parallel
    over the default group (every rank of it calls this)."""
    import timesformer_kernels as tk

    from .e2e import _time_steps

    build = _hf if family == "hf" else _animatediff
    model, loss_or_output = build(frames, smoke, device)
    model = tk.context_parallel(tk.patch(model))
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=not smoke and family == "hf")
    if family == "hf":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_or_output(model)
            loss.backward()
            optimizer.step()
    else:
        def step():
            with torch.no_grad():
                loss_or_output(model)
    times, peak, _ = _time_steps(step, device, warmup, reps)
    return {"times": times, "peak_mb": peak}


def main(argv=None) -> int:
    import torch.distributed as dist

    from . import report, timing
    from .timing import quantiles

    ap = argparse.ArgumentParser(prog="python -m benchmarks.context_parallel", description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", action="store_true", help="print the README's communication table and exit")
    ap.add_argument("--families", default=",".join(FAMILIES), help="hf,animatediff")
    ap.add_argument("--frames", type=int, default=32, help="frames per clip (divisible by the ranks; default 32)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (gloo)")
    ap.add_argument("--out", default=None, help="folder of the CSV (default benchmarks/results/<device>/)")
    args = ap.parse_args(argv)
    if args.table:
        print(table())
        return 0
    cuda = torch.cuda.is_available() and not args.smoke
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        ranks = dist.get_world_size()
        gpu_name = timing.device_name(device)
        out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", timing.slug(gpu_name))
        writer = None
        if dist.get_rank() == 0:
            import timesformer_kernels as tk

            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            writer = report.CsvWriter(os.path.join(out_dir, f"context_parallel_p{ranks}.csv"), gpu_name, stamp,
                                      tk.__version__)
        for family in args.families.split(","):
            result = measure(family, args.frames, args.smoke, device, args.warmup, args.reps)
            peaks = [None] * ranks
            dist.all_gather_object(peaks, result["peak_mb"])
            if writer is not None:
                kernel = f"context_parallel_{family}" + ("_train" if family == "hf" else "")
                config = {"frames": args.frames, "backend": dist.get_backend(), "smoke": args.smoke}
                writer.add(kernel, "tk", "step_ms", "ranks", ranks, *quantiles(result["times"]), config=config)
                if peaks[0] is not None:
                    writer.add(kernel, "tk", "peak_mem_mb", "ranks", ranks, max(peaks), min(peaks), max(peaks),
                               config=config)
                print(f"{kernel} P={ranks}: step {quantiles(result['times'])[0]:.1f} ms, peak per rank "
                      f"{peaks} MiB", flush=True)
        if writer is not None:
            writer.close()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
