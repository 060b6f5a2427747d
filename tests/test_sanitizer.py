"""Every Triton kernel under triton-viz's Sanitizer (Triton-Sanitizer, ASPLOS 2026; issue 11 §3).

The Sanitizer runs a kernel symbolically and asks z3 whether any program id and loop index
makes an unmasked load or store address fall outside every tensor argument (the union of
the arguments' address ranges, one range per row of a strided view). The edge cases of
``guard_zones.py`` run with the same layout as test_guard_zones.py: qkv and dout are views
with sentinel rows and columns between their rows, so an access to another row's padding
is reported. triton-viz 3.0 supports Triton 3.6 only, so these tests run in the lent
machine's stack (``.venv-h200``, ``pip install triton-viz==3.0``) and skip elsewhere.

Two triton-viz 3.0 bugs are patched here, in the child process only; the kernels need no
change:

* it wraps the result of the ``tl``-level ops it intercepts (``tl.trans``,
  ``tl.sum``/``max``/``min``, ``tl.cumsum``) as a tensor of *scalar* type
  (``PatchOp.__call__`` builds ``tl.core.tensor(handle, args[0].dtype)``), so
  ``tl.dot(q, tl.trans(k))`` fails with "input and other must have equal ranks >= 2" and
  reductions lose their shape: ``_typed_lang_ops`` gives those results their real type;
* it counts a strided view's storage offset twice: ``_exact_view_bounds``;
* it gives all ``tl.arange`` of equal bounds one z3 variable, so a 2-d access whose row and
  column ranges have the same length is checked on its diagonal only: ``_distinct_aranges``.

triton-viz patches Triton's interpreter for the whole process when imported, so everything
runs in one child process (this file run as a script) that prints its findings as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guard_zones import Case
from timesformer_kernels.triton.spatial import whole_group

SUPPORTED_TRITON = "3.6."  # what triton-viz 3.0 runs with


def _why_not() -> str | None:
    import importlib.metadata as md

    try:
        viz = md.version("triton-viz")
    except md.PackageNotFoundError:
        return "triton-viz is not installed (the Triton 3.6 stack: pip install triton-viz==3.0)"
    triton_version = md.version("triton")
    if not triton_version.startswith(SUPPORTED_TRITON):
        return f"triton-viz {viz} runs with Triton {SUPPORTED_TRITON}x only, this is Triton {triton_version}"
    return None


# ---------------------------------------------------------------- the child process
def _typed_lang_ops():
    """Makes triton-viz's intercepted ``tl`` ops return tensors of their real type (the
    Sanitizer's symbolic value stays the handle)."""
    import triton.language as tl
    from triton_viz.core import patch
    from triton_viz.core.data import CumSum, ReduceMax, ReduceMin, ReduceSum, Trans

    def value(x):
        return x.value if isinstance(x, tl.constexpr) else x

    def result_shape(op_type, shape, args, kwargs):
        if op_type is Trans:  # tl.trans(x, *dims), dims possibly one tuple; none: reversed
            dims = [value(d) for d in args]
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = [value(d) for d in dims[0]]
            return [shape[d] for d in dims or reversed(range(len(shape)))]
        if op_type is CumSum:
            return shape
        axis = value(args[0] if args else kwargs.get("axis"))  # tl.sum/max/min(x, axis, ..., keep_dims=)
        keep = value(kwargs.get("keep_dims", False))
        if axis is None:
            return [1] * len(shape) if keep else []
        axis %= len(shape)
        return [1 if i == axis else s for i, s in enumerate(shape) if keep or i != axis]

    untyped = patch.PatchOp.__call__

    def typed(self, *args, **kwargs):
        ret = untyped(self, *args, **kwargs)
        if self.op_type in (Trans, ReduceSum, ReduceMax, ReduceMin, CumSum) and self.callbacks.op_overrider:
            x = args[0]
            shape = result_shape(self.op_type, [int(value(s)) for s in x.shape], args[1:], kwargs)
            ret = tl.core.tensor(ret.handle, tl.block_type(x.dtype, shape) if shape else x.dtype)
        return ret

    patch.PatchOp.__call__ = typed


def _exact_view_bounds():
    """triton-viz 3.0 bounds a strided view (unit inner stride) by one address range per row,
    but counts the storage offset twice (``data_ptr()`` already includes it): an in-bounds
    access to ``big[1:5, 4:16]`` is reported. The ranges here start at ``data_ptr()``."""
    import itertools

    from triton_viz.clients.sanitizer import sanitizer

    def row_ranges(tensor):
        inner = min(range(tensor.dim()), key=tensor.stride)
        outer = [d for d in range(tensor.dim()) if d != inner]
        size, last = tensor.element_size(), (tensor.size(inner) - 1) * tensor.element_size()
        starts = (tensor.data_ptr() + size * sum(i * tensor.stride(d) for i, d in zip(index, outer))
                  for index in itertools.product(*(range(tensor.size(d)) for d in outer)))
        return [(start, start + last) for start in starts]

    sanitizer.get_physical_addr_from_tensor_slice = row_ranges


def _distinct_aranges():
    """triton-viz 3.0 models every ``tl.arange(start, end)`` as one z3 variable keyed by
    (start, end), so a row arange and a column arange of the same length are one variable
    and only the diagonal of a 2-d access is checked: a one-column overrun of a 32 x 32 tile
    goes unreported. Here each call site gets its own variable."""
    from triton_viz.clients.sanitizer import report, sanitizer

    cls, table = sanitizer.ArangeSymbolicExpr, sanitizer.SymbolicExpr.ARANGE_DICT
    init = cls.__init__

    def call_site():
        """(file, line) of the kernel code that called tl.arange (past triton, triton-viz and
        the patches in this file)."""
        frame = sys._getframe(2)
        while frame.f_code.co_filename.startswith("<") or frame.f_code.co_filename == __file__ or any(
                p in Path(frame.f_code.co_filename).as_posix() for p in report._FRAMEWORK_PATHS):
            frame = frame.f_back
        return frame.f_code.co_filename, frame.f_lineno

    def with_site(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.site = call_site()

    def to_z3(self):
        start, end = self.start.to_py(), self.end.to_py()
        key = (start, end, getattr(self, "site", None))
        if key not in table:
            var = sanitizer.Int(f"arange_{start}_{end}_{len(table)}")
            table[key] = var, sanitizer._and_constraints(var >= start, var < end)
        return table[key]

    cls.__init__, cls._to_z3_impl = with_site, to_z3


def _sanitize_kernels():
    """Wraps every kernel of the Triton backend in a Sanitizer that records, not aborts;
    returns {kernel name: (sanitizer, launch counter)}."""
    import triton_viz
    from triton.runtime import Autotuner
    from triton_viz.clients import Sanitizer

    from timesformer_kernels.triton import spatial, temporal

    clients = {}
    for module in (temporal, spatial):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            kernel, client, launches = getattr(module, name), Sanitizer(abort_on_error=False), [0]
            grid_callback = client.grid_callback

            def counted(grid, grid_callback=grid_callback, launches=launches):
                launches[0] += 1
                return grid_callback(grid)

            client.grid_callback = counted
            if isinstance(kernel, Autotuner):  # trace the function the autotuner launches
                kernel.fn = triton_viz.trace(client=client)(kernel.fn)
            else:
                setattr(module, name, triton_viz.trace(client=client)(kernel))
            clients[name] = client, launches
    return clients


def _records(client) -> list[str]:
    return [f"{r.op_type.__name__} outside the arguments, via {r.tensor_name}" for r in client.records]


def _child():
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import triton_viz
    from triton_viz.clients import Sanitizer

    import guard_zones

    torch.set_num_threads(1)
    _typed_lang_ops()
    _exact_view_bounds()
    _distinct_aranges()
    result = {"planted": {}, "cases": {}}
    planted = guard_zones.planted_row_sums
    for shifts in ((0, 0), (1, 0), (-1, 0), (0, 1)):
        client = Sanitizer(abort_on_error=False)
        guard_zones.planted_row_sums = triton_viz.trace(client=client)(planted)  # what run_planted launches
        zones = guard_zones.GuardZones()
        src = zones.input("src", torch.randn(1, 5, 12))[0]  # rows with padding in between
        guard_zones.run_planted(src, zones.torch.empty(5, dtype=torch.float32), *shifts)
        result["planted"][str(shifts)] = _records(client)
    clients = _sanitize_kernels()
    for case in CASES:
        before = {name: (len(c.records), n[0]) for name, (c, n) in clients.items()}
        with pytest.MonkeyPatch.context() as monkeypatch:
            zones = guard_zones.GuardZones()
            guard_zones.guard_allocations(monkeypatch, zones)
            guard_zones.use_tiles(monkeypatch, case)
            guard_zones.run_case(case, zones, check_values=False)  # the Sanitizer computes no values
        result["cases"][str(case)] = {
            name: {"launches": n[0] - before[name][1], "records": _records(c)[before[name][0]:]}
            for name, (c, n) in clients.items() if n[0] > before[name][1]}
    print("SANITIZER " + json.dumps(result))


# ---------------------------------------------------------------------------- tests
T, S, SM, TM = "temporal", "spatial", "space_major", "time_major"
CASES = [  # a subset of test_guard_zones.py's, both ops, plus GPU tiles
    Case(T, t=3, n=13, h=3, dh=40, order=SM, with_cls=True),
    Case(T, t=3, n=13, h=3, dh=24, order=TM, batch_inner=True),
    Case(T, t=1, n=37, h=1, dh=8, order=TM, with_cls=True),
    Case(T, t=8, n=1, h=2, dh=72, order=SM, with_cls=True),
    Case(T, t=33, n=2, h=1, dh=96, order=TM, b=1),
    Case(T, t=130, n=1, h=1, dh=16, order=SM, with_cls=True, b=1),
    Case(S, t=2, n=17, h=2, dh=80, order=SM),
    Case(S, t=3, n=1, h=1, dh=128, order=TM, cls_grad=False),
    Case(S, t=1, n=15, h=1, dh=56, order=TM, batch_inner=True),
    Case(T, t=8, n=19, h=3, dh=40, order=TM, with_cls=True, b=1, tiles=(128, 4)),
    Case(S, t=2, n=40, h=1, dh=24, order=SM, b=1, tiles=(32, 16)),
]
KERNELS = {"temporal": ["_temporal_fwd_kernel", "_temporal_bwd_kernel"],
           "spatial": ["_spatial_fwd_kernel", "_spatial_bwd_dq_kernel", "_spatial_bwd_dkdv_kernel"],
           "spatial whole group": ["_spatial_fwd_kernel", "_spatial_bwd_group_kernel"]}


@pytest.fixture(scope="module")
def findings():
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, env=env,
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SANITIZER ")]
    assert proc.returncode == 0 and lines, f"the sanitizer run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("SANITIZER "):])


def test_planted_out_of_bounds_is_reported(findings):
    """One element past or before a row of a padded view (inside its storage), or past dst."""
    planted = findings["planted"]
    assert planted["(0, 0)"] == []
    for shifts, op in (("(1, 0)", "Load"), ("(-1, 0)", "Load"), ("(0, 1)", "Store")):
        assert planted[shifts] and all(r.startswith(op) for r in planted[shifts]), planted


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_clean(findings, case):
    """Every kernel of the op ran under the Sanitizer and reported nothing."""
    kernels = findings["cases"][str(case)]
    # T > 128 runs the flash (spatial) kernels; their backward is one kernel where a group fits a tile
    op = "spatial" if case.op == "spatial" or case.t > 128 else "temporal"
    if op == "spatial" and whole_group(case.groups(), case.dtype, torch.device("cpu")):
        op = "spatial whole group"
    assert sorted(kernels) == sorted(KERNELS[op]), f"kernels run under the sanitizer: {sorted(kernels)}"
    assert all(k["records"] == [] for k in kernels.values()), kernels


if __name__ == "__main__":
    _child()
