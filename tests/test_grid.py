"""Launch grids within CUDA's limits: x <= 2^31 - 1 programs, y and z <= 65,535 (Triton's
interpreter checks none, so a grid past them would pass every CPU test and fail on a GPU).
The grids are computed at G = 70,000 groups and B = 70,000 clips, and the batch split over y
and z runs under the interpreter with the limit lowered to 2."""
import pytest
import torch

import timesformer_kernels as tk
from timesformer_kernels.layout import spatial_groups, temporal_groups
from timesformer_kernels.triton import grid, spatial, temporal

BIG = 70_000


def _within_limits(xyz, batch):
    x, y, z = xyz
    assert 1 <= x <= grid.MAX_X and 1 <= y <= grid.MAX_YZ and 1 <= z <= grid.MAX_YZ, xyz
    assert y * z >= batch > y * (z - 1), xyz  # every clip has a program, less than one row of y to spare


@pytest.mark.parametrize("batch", [1, 8, grid.MAX_YZ, grid.MAX_YZ + 1, BIG, 2**31 - 1])
@pytest.mark.parametrize("block_m, heads", [(32, 1), (32, 4), (64, 2), (128, 1)])
def test_temporal_grid(batch, block_m, heads):
    """70,000 groups of 8 frames (a 70,000-patch diffusion latent) in every batch size."""
    groups = temporal_groups(batch, BIG * 8, 8, 12, 64, "space_major", False)
    assert groups.num_groups == BIG
    xyz = temporal.grid(groups, 8, block_m, heads)
    _within_limits(xyz, batch)
    assert xyz[0] == -(-12 // heads) * -(-BIG // (block_m // 8))


@pytest.mark.parametrize("batch", [1, BIG])
def test_spatial_grid(batch):
    """The flash kernels: 70,000 frame groups (spatial), and 70,000 temporal groups of 256
    frames with the cls key (temporal attention longer than 128 frames)."""
    for groups in (spatial_groups(batch, 1 + 196 * BIG, BIG, 12, 64, "space_major"),
                   temporal_groups(batch, 1 + BIG * 256, 256, 8, 64, "time_major", True)):
        for tiles in (1, 7):
            xyz = spatial.grid(groups, tiles)
            _within_limits(xyz, batch)
            assert xyz[0] == tiles * groups.num_groups * groups.num_heads


def test_a_clip_too_large_for_one_grid_is_refused():
    groups = temporal_groups(1, 2**31 * 32, 32, 1, 64, "space_major", False)
    with pytest.raises(ValueError, match="more than the 2147483647 of a grid's x"):
        temporal.grid(groups, 32, 32, 1)


@pytest.mark.parametrize("op", ["temporal", "spatial", "temporal_long"])
def test_batch_split_over_y_and_z(monkeypatch, op):
    """With y and z capped at 2, a batch of 5 runs as y = 2, z = 3: one program row past the
    last clip, which must write nothing, and every clip's output and gradient as the torch
    backend's."""
    monkeypatch.setattr(grid, "MAX_YZ", 2)
    b, h, dh = 5, 2, 16
    t, n = (3, 4) if op != "temporal_long" else (temporal.MAX_SEQ + 1, 1)
    qkv = torch.randn(b, 1 + n * t, 3 * h * dh, dtype=torch.float64, requires_grad=True)

    def run(backend):
        if op == "spatial":
            out, cls_out = tk.spatial_attention(qkv, t, h, backend=backend)
            loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + cls_out.sum()
        else:
            out = tk.temporal_attention(qkv, t, h, with_cls=True, token_order="time_major", backend=backend)
            loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        return out, torch.autograd.grad(loss, qkv)[0]

    out, dqkv = run("triton")
    ref, dref = run("torch")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(dqkv, dref, atol=1e-10, rtol=1e-10)
