"""DistributedDataParallel: a 2-process gloo (CPU) training step of fused models, the torch
backend, gives the same gradients and updated weights as one process on the full batch.

Two models: ``DividedSpaceTimeBlock`` layers with a classifier head, and the official
TimeSformer block structure (tests/official_block.py) patched in place with ``tk.patch``.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import timesformer_kernels as tk
from official_block import TinyTimeSformer
from spawn import spawn_ranks

WORLD = 2
BATCH = 4  # split 2 + 2 over the ranks
T, HEIGHT, WIDTH, DIM, CLASSES = 2, 2, 3, 32, 5
N = HEIGHT * WIDTH
LR = 0.1
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class FusedNet(nn.Module):
    """Two fused divided space-time blocks on token input, a linear head on the cls token."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([tk.DividedSpaceTimeBlock(DIM, 2, T, mlp_ratio=2.0, qkv_bias=True,
                                                              backend="torch") for _ in range(2)])
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(x[:, 0])


class PatchedOfficial(nn.Module):
    """The official block structure, patched to the fused ops, and a head on the cls token."""

    def __init__(self):
        super().__init__()
        self.body = tk.patch(TinyTimeSformer(dim=DIM, depth=2, num_heads=2), backend="torch")
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.head(self.body(x, T, WIDTH)[:, 0])


MODELS = {"fused_blocks": FusedNet, "patched_official": PatchedOfficial}


def build(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    with torch.no_grad():  # random weights everywhere (some inits are zero, e.g. biases)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.train()


def full_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 1 + N * T, DIM, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


def train_step(model, x, y):
    """One SGD step on the mean cross-entropy; returns {name: grad} and {name: new weight}."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    # DDP wraps the module: report names without its "module." prefix
    grads = {k.removeprefix("module."): p.grad.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    weights = {k.removeprefix("module."): p.detach().clone() for k, p in model.named_parameters()}
    return grads, weights


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y = full_batch()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        results = {}
        for kind in MODELS:
            ddp = DDP(build(kind))
            results[kind] = train_step(ddp, x[shard], y[shard])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("kind", list(MODELS))
def test_ddp_step_matches_single_process(kind, ddp_results):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = full_batch()
        grads, weights = train_step(build(kind), x, y)
    finally:
        torch.set_num_threads(old)
    assert len(grads) > 10
    for rank, results in enumerate(ddp_results):
        rank_grads, rank_weights = results[kind]
        assert rank_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(rank_grads[name], grads[name], atol=1e-12, rtol=1e-10,
                                       msg=lambda m: f"rank {rank} grad of {name}: {m}")
            torch.testing.assert_close(rank_weights[name], weights[name], atol=1e-12, rtol=1e-10,
                                       msg=lambda m: f"rank {rank} weight {name}: {m}")
        assert any(g.abs().max() > 0 for g in rank_grads.values())


def test_ranks_saw_different_data(ddp_results):
    """Guards the set-up: each rank's local gradient differs from the full-batch one, so the
    all-reduce is what made them equal (checked on the fused model, one process per shard)."""
    x, y = full_batch()
    local = [train_step(build("fused_blocks"), x[s], y[s])[0] for s in (slice(0, 2), slice(2, 4))]
    name = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(local[0][name], local[1][name])
    torch.testing.assert_close((local[0][name] + local[1][name]) / 2, ddp_results[0]["fused_blocks"][0][name])
