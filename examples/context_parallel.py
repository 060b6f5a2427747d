"""Train a Hugging Face TimeSformer on long clips, each clip's frames split over several GPUs.

    torchrun --nproc-per-node 2 examples/context_parallel.py                    # 2 GPUs share every clip
    torchrun --nproc-per-node 4 examples/context_parallel.py --data 2 --fsdp    # 2 x 2: data x context, FSDP2
    torchrun --nproc-per-node 2 examples/context_parallel.py --small            # tiny model, runs on the CPU too

One process per GPU (NCCL), or per CPU process (gloo) without GPUs. The ranks of a context
group feed the model the same clip and get the same outputs; each holds 1/P of every clip's
frames inside, so activation memory per GPU is about 1/P. With ``--data D``, D context groups
train on different clips: gradients are averaged over the context ranks by ``tk.context_parallel``
and over the data ranks by DDP, or, with ``--fsdp``, over all ranks by FSDP2 (HSDP on the mesh).
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from transformers import TimesformerConfig, TimesformerForVideoClassification

import timesformer_kernels as tk


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=32, help="frames per clip (divisible by the context ranks)")
    ap.add_argument("--data", type=int, default=1, help="data-parallel groups (the world size must be a multiple)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 over the data x context mesh instead of DDP")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="a tiny model and 32 px frames")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (args.data, dist.get_world_size() // args.data),
                            mesh_dim_names=("data", "context"))

    if args.small:
        config = TimesformerConfig(image_size=32, patch_size=8, num_frames=args.frames, hidden_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=10)
    else:  # TimeSformer-base (the Kinetics-400 configuration) on --frames frames
        config = TimesformerConfig(num_frames=args.frames, num_labels=400)
    torch.manual_seed(0)  # the same weights, and the same drop-path draws, on every rank
    model = TimesformerForVideoClassification(config).to(device)
    model = tk.context_parallel(tk.patch(model), group=mesh["context"], reduce_grads=not args.fsdp)
    if args.fsdp:  # averages over all ranks: context and data at once
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=mesh)
    elif args.data > 1:  # averages over the data ranks; tk.context_parallel over the context ranks
        model = torch.nn.parallel.DistributedDataParallel(model, process_group=mesh["data"].get_group())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    data_rank = mesh["data"].get_local_rank()
    for step in range(args.steps):
        # a context group's ranks read the same clip; each data group its own
        g = torch.Generator().manual_seed(step * args.data + data_rank)
        video = torch.randn(1, args.frames, 3, config.image_size, config.image_size, generator=g).to(device)
        labels = torch.randint(0, config.num_labels, (1,), generator=g).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            loss = F.cross_entropy(model(pixel_values=video).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.get_rank() == 0:
            memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB per GPU" if cuda else ""
            print(f"step {step}: loss {loss.item():.4f} (data group 0){memory}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
