"""Memory safety of every Triton kernel without a tool (issue 11 §3): each call runs with every
buffer it touches inside guard zones (``guard_zones.py``), forward and backward, and fails if
an output or gradient picks up a guard zone's NaN or a guard zone's bits change.

Edge shapes under the interpreter's tiles (temporal: INTERPRET_CONFIG, 32-row tiles of whole
groups; spatial: 16 x 16): both ops and token orders, the cls key (temporal ``with_cls``)
and query (spatial), T = 1, N = 1, groups and row counts that end inside a tile or one row
past it, T > 128 (the flash kernel without a cls query), the backward without dcls_out, head
dims 8 ... 128 (plus 160 and 256 where the Triton backend lists them), float32, float16 and
float64, qkv and dout batch-outer and batch-inner, and the larger tiles a GPU can pick.
The planted kernels at the end show that a read or a write one element off is caught.
"""
from __future__ import annotations

import pytest
import torch

import timesformer_kernels as tk
from guard_zones import Case, GuardZones, guard_allocations, run_case, run_planted, skip_reason, use_tiles
from timesformer_kernels.triton import temporal

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not temporal._INTERPRET,
                                reason="guard zones are CPU tensors under TRITON_INTERPRET=1")

T, S = "temporal", "spatial"
SM, TM = "space_major", "time_major"
CASES = [
    # temporal, short-group kernel: T_PAD 4 (a masked row per group), 8 groups a tile, 13 = 1.6 tiles,
    # H = 3 leaves the second head block half empty
    Case(T, t=3, n=13, h=3, dh=40, order=SM, with_cls=True),
    Case(T, t=3, n=13, h=3, dh=24, order=TM, batch_inner=True),
    Case(T, t=1, n=37, h=1, dh=8, order=TM, with_cls=True, batch_inner=True),  # T = 1: 32 groups a tile
    Case(T, t=8, n=1, h=2, dh=72, order=TM, with_cls=True),  # N = 1
    Case(T, t=8, n=1, h=2, dh=56, order=SM),
    Case(T, t=5, n=7, h=1, dh=96, order=SM, with_cls=True, dtype=torch.float16),
    Case(T, t=16, n=3, h=1, dh=80, order=TM, with_cls=True, dtype=torch.float64),
    Case(T, t=33, n=2, h=1, dh=128, order=SM, with_cls=True, b=1),  # T_PAD 64: one group a 64-row tile
    # temporal, T > 128: the flash kernel, cls key without cls query
    Case(T, t=130, n=1, h=1, dh=16, order=TM, with_cls=True, b=1),
    # spatial: 1 + N query rows and N (+ cls) key rows on 16-row tiles
    Case(S, t=2, n=17, h=2, dh=80, order=SM),  # 18 rows: the last tile holds 2
    Case(S, t=2, n=15, h=1, dh=96, order=TM, batch_inner=True, dtype=torch.float64),  # 16 rows: one full tile
    Case(S, t=2, n=16, h=2, dh=8, order=SM, cls_grad=False),  # 17 rows: one row past a tile
    Case(S, t=3, n=1, h=1, dh=128, order=TM),  # N = 1
    Case(S, t=1, n=33, h=1, dh=72, order=SM, dtype=torch.float16),  # T = 1
    Case(S, t=2, n=5, h=3, dh=40, order=TM, cls_grad=False, batch_inner=True),
    # tiles a GPU's autotuner may pick: temporal 64/128-row tiles (several cls partial chunks a
    # tile) with one or four heads a program; spatial query and key tiles of different sizes
    Case(T, t=8, n=19, h=3, dh=40, order=TM, with_cls=True, b=1, tiles=(64, 1)),
    Case(T, t=8, n=19, h=3, dh=40, order=TM, with_cls=True, b=1, tiles=(128, 4)),
    Case(S, t=2, n=40, h=1, dh=40, order=SM, b=1, tiles=(16, 32)),
    Case(S, t=2, n=40, h=1, dh=40, order=SM, b=1, tiles=(32, 16)),
    # head dims being added to the Triton backend
    Case(T, t=3, n=5, h=1, dh=160, order=TM, with_cls=True, b=1),
    Case(S, t=2, n=17, h=1, dh=160, order=SM, b=1),
    Case(T, t=3, n=5, h=1, dh=256, order=SM, with_cls=True, b=1),
    Case(S, t=2, n=17, h=1, dh=256, order=TM, b=1),
]


@pytest.fixture
def zones(monkeypatch, one_thread):
    """Guard zones for one test, with the Triton wrappers allocating inside them."""
    z = GuardZones()
    guard_allocations(monkeypatch, z)
    return z


@pytest.mark.parametrize("case", CASES, ids=str)
def test_edge_shapes(monkeypatch, case, zones):
    reason = skip_reason(case)
    if reason:
        pytest.skip(reason)
    use_tiles(monkeypatch, case)
    run_case(case, zones)


@pytest.mark.parametrize("op", [T, S])
def test_public_ops(zones, op):
    """The same guards through tk.temporal_attention / tk.spatial_attention and autograd."""
    b, t, n, h, dh = 2, 3, 6, 2, 24
    gen = torch.Generator().manual_seed(0)
    qkv = zones.input("qkv", torch.randn(b, 1 + n * t, 3 * h * dh, generator=gen)).requires_grad_(True)
    dout = zones.input("dout", torch.randn(b, n * t, h * dh, generator=gen))
    if op == T:
        outs = (tk.temporal_attention(qkv, t, h, token_order=TM, with_cls=True, backend="triton"),)
        grads = (dout,)
    else:
        outs = tk.spatial_attention(qkv, t, h, token_order=TM, backend="triton")
        grads = (dout, zones.input("dcls_out", torch.randn(b, t, h * dh, generator=gen)))
    (dqkv,) = torch.autograd.grad(outs, qkv, grads)
    zones.check()
    assert all(zones.guarded(o) for o in outs)
    assert all(torch.isfinite(x).all() for x in (*outs, dqkv))


# ------------------------------------------------------- the checks can fail: planted bugs
def _row_sums(zones, read_shift, write_shift):
    values = torch.randn(1, 5, 12, generator=torch.Generator().manual_seed(0))
    dst = zones.torch.empty(5, dtype=torch.float32)
    run_planted(zones.input("src", values)[0], dst, read_shift, write_shift)
    zones.check()
    torch.testing.assert_close(dst, values[0].sum(1))


def test_planted_correct_kernel_passes(zones):
    _row_sums(zones, 0, 0)


@pytest.mark.parametrize("read_shift, write_shift, caught", [
    (1, 0, "Tensor-likes are not close"),  # reads one past each row: the sentinel column's NaN
    (-1, 0, "Tensor-likes are not close"),  # one before each row
    (0, 1, "guard zones touched"),  # the last program writes one past the end
    (0, -1, "guard zones touched"),  # the first one writes one before the start
])
def test_planted_out_of_bounds_is_caught(zones, read_shift, write_shift, caught):
    with pytest.raises(AssertionError, match=caught):
        _row_sums(zones, read_shift, write_shift)
