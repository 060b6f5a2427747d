"""The byte counters of ``benchmarks.bytes`` on tiny shapes: the Triton interpreter hook counts
exactly the unmasked lanes (a hand-checkable kernel, and the temporal forward, which reads qkv
and writes out and lse once each), the fused temporal forward stays within 5% of the work
model's minimum, the whole-group spatial backward's kernel at it, and the dispatch-mode
counter sees a known copy and no bytes for a view."""
import os
import sys

import pytest
import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bytes as bb, peers  # noqa: E402 - after the sys.path line
from benchmarks.config import Shape  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts under the interpreter")


@triton.jit
def _masked_copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(src + offs, mask=offs < n, other=0.0)
    tl.store(dst + offs, x * 2, mask=offs < n)
    tl.store(dst + n + tl.program_id(0), tl.sum(x, axis=0))  # one unmasked scalar per program


def test_kernel_counter_counts_unmasked_lanes():
    n, block = 37, 16  # 3 programs, the last one 11 lanes masked off
    src = torch.randn(n, dtype=torch.float16)
    dst = torch.zeros(n + 3, dtype=torch.float16)
    with bb.KernelCounter() as kc:
        _masked_copy[(3,)](src, dst, n, BLOCK=block)
    (launch,) = kc.launches
    assert launch.kernel == "_masked_copy" and launch.meta == {"BLOCK": block}
    assert launch.tensors["src"] == bb.Traffic(loaded=2 * n, distinct_loaded=2 * n)
    assert launch.tensors["dst"] == bb.Traffic(stored=2 * (n + 3), distinct_stored=2 * (n + 3))
    torch.testing.assert_close(dst[:n], src * 2)


def test_kernel_counter_forces_meta_parameters():
    """A forced tile size replaces the launch's own and the grid follows it."""
    n = 37
    src, dst = torch.randn(n), torch.zeros(n + 3)
    with bb.KernelCounter({"_masked_copy": {"BLOCK": 64}}) as kc:
        _masked_copy[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](src, dst, n, BLOCK=16)
    (launch,) = kc.launches
    assert launch.meta == {"BLOCK": 64}
    assert launch.tensors["dst"].stored == 4 * (n + 1)  # one program: one scalar store
    torch.testing.assert_close(dst[:n], src * 2)


@pytest.mark.parametrize("frames", [3, 8])  # 3: each group padded to 4 rows, the padding masked off
def test_temporal_forward_moves_qkv_out_lse_exactly_once(frames):
    shape = Shape("t", 2, frames, 5, 32, 2)
    qkv, x = bb.op_input("temporal", shape, torch.float32)
    import timesformer_kernels as tk

    with bb.KernelCounter() as kc, torch.no_grad():
        tk.temporal_attention(x, frames, shape.heads, backend="triton")
    rows, d = shape.batch * shape.patches * frames, shape.dim
    (launch,) = kc.launches
    by_role = {name.split("_")[0]: t for name, t in launch.tensors.items()}
    assert by_role["qkv"] == bb.Traffic(loaded=4 * rows * 3 * d, distinct_loaded=4 * rows * 3 * d)  # not row 0
    assert by_role["out"] == bb.Traffic(stored=4 * rows * d, distinct_stored=4 * rows * d)
    assert by_role["lse"] == bb.Traffic(stored=4 * rows * shape.heads, distinct_stored=4 * rows * shape.heads)
    assert launch.traffic.total == bb.minimum_bytes("temporal", shape, "fwd", 4)


def test_fused_temporal_forward_within_5_percent_of_minimum():
    shape = Shape("small", 1, 8, 16, 128, 2)
    _, x = bb.op_input("temporal", shape, torch.float16)
    res = bb.run_op(peers.build("triton", "temporal", shape, torch.device("cpu")), x)
    records, launches = res["fwd"]
    kernel, torch_bytes, copies = bb._fused_total(records, launches)
    assert kernel + torch_bytes <= 1.05 * bb.minimum_bytes("temporal", shape, "fwd", 2)
    assert copies == 0


@pytest.mark.parametrize("whole", [True, False], ids=["whole-group", "dq-dkdv-pair"])
def test_fused_spatial_backward_bytes(monkeypatch, whole):
    """The whole-group backward moves exactly the minimum in its kernel (qkv, dout and out read
    once), and within 1.2x of it with the op's torch work (zero fills, the cls row's sum: fixed
    costs, large at this tiny shape). The dQ + dK/dV pair (forced here; what every group the
    whole-group kernel does not take runs) reads them twice, and more on a split group."""
    from timesformer_kernels.triton import spatial

    if not whole:
        monkeypatch.setattr(spatial, "whole_group", lambda *args: False)
    shape = Shape("small", 1, 2, 20, 64, 2)  # 21 queries a frame group: one 32-row tile, two 16-row ones
    _, x = bb.op_input("spatial", shape, torch.float16)
    res = bb.run_op(peers.build("triton", "spatial", shape, torch.device("cpu")), x)
    records, launches = res["bwd"]
    kernel, torch_bytes, copies = bb._fused_total(records, launches)
    minimum = bb.minimum_bytes("spatial", shape, "bwd", 2)
    names = {la.kernel for la in launches}
    if whole:
        assert names == {"_spatial_bwd_group_kernel"}, names
        assert kernel == minimum and kernel + torch_bytes <= 1.2 * minimum, (kernel, torch_bytes, minimum)
    else:
        assert names == {"_spatial_bwd_dq_kernel", "_spatial_bwd_dkdv_kernel"}, names
        assert kernel > 1.5 * minimum, (kernel, minimum)


def test_aten_counter_counts_a_copy_and_no_view_bytes():
    x = torch.randn(4, 6)
    with bb.AtenCounter() as counter:
        y = x.t()  # a view: no bytes
        z = y.contiguous()  # a copy: reads and writes 24 floats
        x.expand(3, 4, 6).sum()  # a broadcast input counts its 24 distinct elements once
    assert z.is_contiguous()
    s = bb.summarize(counter.records)
    assert s["view"]["read"] + s["view"]["written"] == 0
    assert s["copy"] == {"read": 96, "written": 96, "ops": 1, "copies": 1, "copy_bytes": 192}
    assert s["compute"]["read"] == 96 and s["compute"]["written"] == 4


def test_aten_counter_in_place_ops():
    """copy_ writes its destination without reading it; add_ reads and writes it."""
    a, b = torch.zeros(10), torch.ones(10)
    with bb.AtenCounter() as counter:
        a.copy_(b)
        a.add_(b)
    copy, add = counter.records
    assert (copy.category, copy.read, copy.written) == ("copy", 40, 40)
    assert (add.category, add.read, add.written) == ("compute", 80, 40)


def test_every_kernel_has_its_gpu_autotune_configs():
    """The GPU tilings come from the modules' GPU build: every kernel of both modules has some."""
    from timesformer_kernels.triton import spatial, temporal

    kernels = {name for module in (temporal, spatial) for name, obj in vars(module).items()
               if name.endswith("_kernel") and hasattr(obj, "run")}
    configs = bb.gpu_autotune_configs()
    assert kernels and kernels <= set(configs)
    assert all(len(configs[k][0]) > 1 for k in kernels)
