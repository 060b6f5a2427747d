"""Patched models train like the unpatched ones under DistributedDataParallel (default settings:
find_unused_parameters=False, so a parameter left out of the graph raises) and FSDP2
(``fully_shard``): 2 CPU processes over gloo, a few AdamW steps (weight decay on), every family
of tests/lifecycle_models.py, patched before and after wrapping or sharding. One spawn runs
every case; each rank compares the patched run with the unpatched one on its own data (the
loss is weighted by rank, so the all-reduce matters).
"""
from __future__ import annotations

import copy
import os
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from spawn import spawn_ranks

WORLD, STEPS = 2, 3
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _train(model: nn.Module, run, rank: int) -> dict:
    """STEPS AdamW steps; returns {name: (final full weight, whether its last grad was None)}."""
    # eps well above rounding noise: a gradient that is zero in exact arithmetic (the key bias's)
    # is ~1e-9 of noise, which Adam's normalisation would turn into full-size steps of either sign
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1)
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)
        out = run(model)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out) * (1 + rank)
        (out * weights).sum().backward()
        optimizer.step()
    return {name.replace("module.", "").replace("_orig_mod.", ""):
            (_full(p).detach().clone(), p.grad is None) for name, p in model.named_parameters()}


def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _ddp(model, patch_first: bool):
    import timesformer_kernels as tk
    from torch.nn.parallel import DistributedDataParallel

    if patch_first:
        return DistributedDataParallel(tk.patch(model, backend="torch"))
    return tk.patch(DistributedDataParallel(model), backend="torch")


def _fsdp(model, patch_first: bool, mesh):
    import timesformer_kernels as tk
    from timesformer_kernels.integrations import FAMILIES
    from torch.distributed.fsdp import fully_shard

    if patch_first:
        tk.patch(model, backend="torch")
    for m in [m for m in model.modules() if m is not model and any(f.matches(m) for f in FAMILIES.values())]:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model if patch_first else tk.patch(model, backend="torch")


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        from lifecycle_models import available
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        for name, family in available().items():
            base = family.build().train()
            for wrapper in ("ddp", "fsdp2"):
                try:
                    if wrapper == "ddp":
                        runs = {"unpatched": lambda: torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))}
                        runs.update({f"patched_{order}": (lambda first=first: _ddp(copy.deepcopy(base), first))
                                     for order, first in (("before", True), ("after", False))})
                    else:
                        from torch.distributed.fsdp import fully_shard

                        def unpatched():
                            model = copy.deepcopy(base)
                            fully_shard(model, mesh=mesh)
                            return model
                        runs = {"unpatched": unpatched}
                        runs.update({f"patched_{order}": (lambda first=first: _fsdp(copy.deepcopy(base), first, mesh))
                                     for order, first in (("before", True), ("after", False))})
                    results[(name, wrapper)] = {label: _train(make(), family.run, rank) for label, make in runs.items()}
                except Exception:
                    results[(name, wrapper)] = traceback.format_exc()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("lifecycle_dist"))


def _cases():
    from lifecycle_models import available

    return [(name, wrapper) for name in available() for wrapper in ("ddp", "fsdp2")]


@pytest.mark.parametrize("family,wrapper", _cases())
def test_trains_like_unpatched(family, wrapper, results):
    for rank, per_rank in enumerate(results):
        runs = per_rank[(family, wrapper)]
        assert not isinstance(runs, str), f"rank {rank}:\n{runs}"
        ref = runs["unpatched"]
        for label in ("patched_before", "patched_after"):
            got = runs[label]
            assert got.keys() == ref.keys()
            assert {n for n, (_, none) in got.items() if none} == {n for n, (_, none) in ref.items() if none}
            for name, (weight, _) in ref.items():
                torch.testing.assert_close(got[name][0], weight, atol=2e-4, rtol=2e-4,
                                           msg=lambda m: f"rank {rank}, {label}, {name}: {m}")
        moved = [n for n, (w, _) in ref.items() if not torch.equal(w, results[0][(family, wrapper)]["unpatched"][n][0])]
        assert rank == 0 or not moved, f"ranks disagree on {moved}"  # the all-reduce made the ranks' weights equal
