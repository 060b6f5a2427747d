"""Multi-process tests: run a worker once in ``world`` gloo processes on free local ports and
collect what each rank saved (``rank{r}.pt`` in the folder it is given)."""
from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, out_dir: Path) -> list:
    """``worker(rank, port, out_dir)`` in ``world`` processes; returns each rank's saved object."""
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
