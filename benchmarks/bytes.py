"""Counted bytes, not timings: what the fused kernels and the unfused peers move, on the CPU.

    python -m benchmarks.bytes --out benchmarks/results/bytes     # bytes.md + bytes.csv

Three counters, all exact counts of what the code asks for (no cache model, no timing):

* ``KernelCounter`` hooks Triton's interpreter (TRITON_INTERPRET=1): every ``tl.load`` and
  ``tl.store`` of every launch, summing element bytes of the lanes whose mask is true, per
  tensor argument (attributed by storage: arguments sharing a storage are one entry, named
  ``a/b``). "distinct" is the number of different bytes touched (the footprint: what an
  ideal cache would fetch from DRAM); loaded + stored counts every request (re-reads
  included: the traffic into the SMs). Kernel and argument names come from the launches.
* ``AtenCounter`` is a ``TorchDispatchMode``: each aten op reads its tensor inputs and writes
  its outputs once. A tensor counts its distinct elements (broadcast dims with stride 0 count
  once); the same tensor passed twice counts once. Views (``func.is_view``) and allocations
  (``empty*``) move nothing. An in-place or ``out=`` op writes its mutated argument and reads
  it too, except the pure overwrites (copy_, fill_, zero_), which only write it. Copies
  (clone, copy_, _to_copy, cat, repeat, ..., and the scatter of a view's backward) are also
  counted as copies. Our custom ops (namespace ``timesformer_kernels``) are one op each: their
  kernels are counted by ``KernelCounter`` and the torch ops inside them (allocations, the cls
  row reduction) by a nested ``AtenCounter``, labelled ``inside <op>``.
* ``saved_for_backward`` sums, with ``torch.autograd.graph.saved_tensors_hooks``, the bytes of
  every distinct storage a forward keeps for its backward, parameters excluded.

The fused ops run in fp16 (bf16 ``tl.dot`` is wrong in the interpreter; fp16 and bf16 are both
2-byte elements and the softmax statistics are fp32 in both, so the counts are bf16's). The
peers run in fp16 on the CPU aten kernels: the same ops, inputs and outputs a CUDA run
dispatches, except that SDPA's CPU kernel stands for the CUDA flash kernel (same inputs and
outputs) and the aten count is each op's floor (a matmul reading each input once).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import time
from collections import defaultdict
from typing import Callable, Optional
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from . import peers
from .config import SHAPE_FAMILIES, Shape, bytes_moved

MIB = 2.0 ** 20
CSV_NAME, MD_NAME = "bytes.csv", "bytes.md"
CSV_COLUMNS = ["table", "op", "mode", "provider", "kernel", "tiling", "item", "loaded_bytes", "stored_bytes",
               "distinct_bytes", "minimum_bytes", "ratio", "copies", "copy_bytes", "dtype", "shape"]


# ------------------------------------------------------------------ Triton interpreter hook
@dataclasses.dataclass
class Traffic:
    """Bytes one launch (or a sum of launches) moved through one tensor argument."""

    loaded: int = 0
    stored: int = 0
    distinct_loaded: int = 0
    distinct_stored: int = 0

    def add(self, other: "Traffic") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def total(self) -> int:
        return self.loaded + self.stored

    @property
    def distinct(self) -> int:
        return self.distinct_loaded + self.distinct_stored


@dataclasses.dataclass
class Launch:
    """One kernel launch under the interpreter: its name, meta-parameters and traffic per tensor."""

    kernel: str
    meta: dict
    args: dict  # every non-tensor argument, for pruning autotune configs like a real launch
    tensors: dict  # name -> Traffic

    @property
    def traffic(self) -> Traffic:
        t = Traffic()
        for v in self.tensors.values():
            t.add(v)
        return t

    @property
    def tiling(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(self.meta.items()) if k.startswith(("BLOCK", "HEADS")))


class _Spans:
    """The storages of a launch's tensor arguments, to attribute pointers and mark touched bytes."""

    def __init__(self, named: dict):
        by_storage: dict = {}
        for name, t in named.items():
            s = t.untyped_storage()
            entry = by_storage.setdefault(s.data_ptr(), [s.nbytes(), []])
            entry[1].append(name)
        items = sorted(by_storage.items())
        self.starts = np.array([p for p, _ in items], dtype=np.uint64)
        self.ends = np.array([p + e[0] for p, e in items], dtype=np.uint64)
        self.names = ["/".join(e[1]) for _, e in items]
        self.loaded = [0] * len(items)
        self.stored = [0] * len(items)
        self.seen = {"load": [np.zeros(e[0], dtype=bool) for _, e in items],
                     "store": [np.zeros(e[0], dtype=bool) for _, e in items]}
        self.unattributed = 0

    def record(self, kind: str, ptrs, mask, itemsize: int) -> None:
        addr = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
        if mask is not None:
            addr = addr[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).reshape(-1)]
        if addr.size == 0:
            return
        idx = np.searchsorted(self.starts, addr, side="right").astype(np.int64) - 1
        inside = (idx >= 0) & (addr < self.ends[np.maximum(idx, 0)])
        self.unattributed += int((~inside).sum()) * itemsize
        idx, addr = idx[inside], addr[inside]
        counts = np.bincount(idx, minlength=len(self.names)) * itemsize
        totals = self.loaded if kind == "load" else self.stored
        for i in np.nonzero(counts)[0]:
            totals[i] += int(counts[i])
            offs = (addr[idx == i] - self.starts[i]).astype(np.int64)
            for k in range(itemsize):
                self.seen[kind][i][offs + k] = True

    def traffic(self) -> dict:
        return {name: Traffic(self.loaded[i], self.stored[i], int(self.seen["load"][i].sum()),
                              int(self.seen["store"][i].sum()))
                for i, name in enumerate(self.names)}


class KernelCounter:
    """Context manager: records a ``Launch`` for every Triton kernel run under the interpreter.

    ``force`` maps a kernel name to meta-parameters that replace the launch's own (e.g. a GPU
    autotune config's BLOCK_M), so the interpreter runs the tiling a GPU would pick; the grid
    follows, as it is computed from the same meta-parameters. It may also be a function of
    (kernel name, the launch's arguments) returning that dict. Torch dispatch modes are off
    during a launch: the interpreter's own host copies are not the program's traffic.
    """

    def __init__(self, force: Optional[dict] = None):
        self.launches: list[Launch] = []
        self.force = force or {}
        self._spans: Optional[_Spans] = None
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        interp = _interpreter()
        counter = self
        call, masked_load, masked_store = (interp.GridExecutor.__call__, interp.InterpreterBuilder.create_masked_load,
                                           interp.InterpreterBuilder.create_masked_store)

        def grid_call(executor, *args, **kwargs):
            name = executor.fn.__name__
            params = inspect.signature(executor.fn).parameters  # launch options (num_warps...) are not arguments

            def bind():
                return inspect.signature(executor.fn).bind_partial(
                    *args, **{k: v for k, v in kwargs.items() if k in params}).arguments

            forced = counter.force(name, bind()) if callable(counter.force) else counter.force.get(name, {})
            kwargs = {k: forced.get(k, v) for k, v in kwargs.items()}
            bound = bind()
            tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
            meta = {k: v for k, v in bound.items() if k in executor.constexprs}
            scalars = {k: v for k, v in bound.items() if k not in tensors and k not in meta}
            outer, counter._spans = counter._spans, _Spans(tensors)
            try:
                with _disable_current_modes():
                    result = call(executor, *args, **kwargs)
                spans = counter._spans
            finally:
                counter._spans = outer
            if spans.unattributed:
                raise RuntimeError(f"{name}: {spans.unattributed} bytes accessed outside its tensor arguments")
            counter.launches.append(Launch(name, meta, scalars, spans.traffic()))
            return result

        def load(builder, ptrs, mask, *args, **kwargs):
            if counter._spans is not None:
                counter._spans.record("load", ptrs.data, mask.data, _itemsize(ptrs))
            return masked_load(builder, ptrs, mask, *args, **kwargs)

        def store(builder, ptrs, value, mask, *args, **kwargs):
            if counter._spans is not None:
                counter._spans.record("store", ptrs.data, mask.data, _itemsize(ptrs))
            return masked_store(builder, ptrs, value, mask, *args, **kwargs)

        self._stack.enter_context(mock.patch.object(interp.GridExecutor, "__call__", grid_call))
        self._stack.enter_context(mock.patch.object(interp.InterpreterBuilder, "create_masked_load", load))
        self._stack.enter_context(mock.patch.object(interp.InterpreterBuilder, "create_masked_store", store))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False


def _interpreter():
    """triton.runtime.interpreter, after checking that the kernels will run interpreted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("counting kernel bytes needs TRITON_INTERPRET=1 set before triton is imported")
    return importlib.import_module("triton.runtime.interpreter")


def _itemsize(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


# ------------------------------------------------------------------ aten-level counter
COPY_OPS = {"clone", "copy_", "copy", "_to_copy", "cat", "stack", "repeat", "index_select", "_reshape_copy",
            "slice_scatter", "select_scatter", "as_strided_scatter", "slice_backward", "select_backward",
            "permute_copy", "expand_copy", "transpose_copy", "view_copy", "unsqueeze_copy", "narrow_copy"}
OVERWRITE_OPS = {"copy_", "fill_", "zero_"}  # in place, but the old values are not read
VIEW_OPS = {"_unsafe_view", "lift_fresh"}  # alias their input like views, but are not marked as views
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
FUSED_NAMESPACE = "timesformer_kernels"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a (strided) tensor addresses: stride-0 dims count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(tree) -> list:
    out, seen = [], set()
    for t in torch.utils._pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if key not in seen:
                seen.add(key)
                out.append(t)
    return out


@dataclasses.dataclass
class OpRecord:
    name: str  # e.g. "aten.bmm.default"
    category: str  # view, alloc, copy, compute, fused
    region: str
    read: int
    written: int


class AtenCounter(TorchDispatchMode):
    """Sums each aten op's bytes (module docstring); ``region`` labels the records (module hooks
    set it, see ``label_regions``)."""

    def __init__(self, records: Optional[list] = None, region: str = ""):
        super().__init__()
        self.records: list[OpRecord] = [] if records is None else records
        self.region = region

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        base = func._schema.name.split("::")[-1]
        if func.namespace == FUSED_NAMESPACE:
            # The op's Python implementation, run directly so that a nested counter sees the
            # torch ops inside it (the dispatcher would hide them from any mode).
            impl = torch._library.custom_ops.OPDEFS[f"{func.namespace}::{base}"]._init_fn
            with AtenCounter(self.records, f"inside {base}"):
                result = impl(*args, **kwargs)
            self.records.append(OpRecord(str(func), "fused", self.region, 0, 0))
            return result
        result = func(*args, **kwargs)
        if func.is_view or base in VIEW_OPS:
            category, read, written = "view", 0, 0
        elif base in ALLOC_OPS:
            category, read, written = "alloc", 0, 0
        else:
            category = "copy" if base in COPY_OPS else "compute"
            mutated = [a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            bound = dict(zip([a.name for a in func._schema.arguments], args), **kwargs)
            out_tensors = _tensors([bound[m] for m in mutated if m in bound]) if mutated else _tensors(result)
            inputs = [bound[a.name] for a in func._schema.arguments if a.name in bound
                      and (a.name not in mutated or base not in OVERWRITE_OPS)]
            read = sum(tensor_bytes(t) for t in _tensors(inputs))
            written = sum(tensor_bytes(t) for t in out_tensors)
            if base in ("fill_", "zero_") or base.startswith(("zeros", "ones", "full", "new_zeros", "new_full")):
                category = "fill"
        self.records.append(OpRecord(str(func), category, self.region, read, written))
        return result


@contextlib.contextmanager
def label_regions(counter: AtenCounter, modules: dict):
    """While a module in ``modules`` (label -> module) runs forward, records get its label;
    nested labels win (the innermost module)."""
    handles, stack = [], []

    def pre(label):
        def hook(module, args):
            stack.append(counter.region)
            counter.region = label
        return hook

    def post(module, args, output):
        counter.region = stack.pop()

    for label, m in modules.items():
        handles.append(m.register_forward_pre_hook(pre(label)))
        handles.append(m.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def summarize(records: list, by: Callable = lambda r: r.category) -> dict:
    """key -> {read, written, ops, copies, copy_bytes} over the records."""
    out: dict = defaultdict(lambda: {"read": 0, "written": 0, "ops": 0, "copies": 0, "copy_bytes": 0})
    for r in records:
        s = out[by(r)]
        s["read"] += r.read
        s["written"] += r.written
        s["ops"] += r.read + r.written > 0
        if r.category == "copy":
            s["copies"] += 1
            s["copy_bytes"] += r.read + r.written
    return dict(out)


# ------------------------------------------------------------------ saved for backward
def saved_for_backward(fn: Callable[[], object], params, modules: Optional[dict] = None) -> dict:
    """Runs ``fn`` (a forward) and returns label -> [bytes, tensors] over the distinct storages
    it saves for backward (parameters excluded), labelled by the innermost module of
    ``modules`` (label -> module) running when first saved; parameters under "parameters"."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict = {}
    labels = AtenCounter()  # only its ``region``, set by the module hooks; never entered

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen[ptr] = (_fused_caller() or labels.region, t.untyped_storage().nbytes(), tuple(t.shape),
                         str(t.dtype).replace("torch.", ""), ptr in param_ptrs)
        return t

    with label_regions(labels, modules or {}), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    out: dict = defaultdict(lambda: [0, []])
    for label, nbytes, shape, dtype, is_param in seen.values():
        key = "parameters" if is_param else (label.strip() or "glue")
        out[key][0] += nbytes
        out[key][1].append(f"{dtype}{list(shape)}")
    return dict(out)


def _fused_caller() -> str:
    """"fused attention" when called from timesformer_kernels.ops (our custom ops save their
    tensors there, outside any module of the model), else ""."""
    ops_file = importlib.import_module("timesformer_kernels.ops").__file__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename == ops_file:
            return "fused attention"
        frame = frame.f_back
    return ""


# ------------------------------------------------------------------ the work model's minimum
def minimum_bytes(op: str, shape: Shape, mode: str, itemsize: int) -> int:
    """The fewest bytes an op must move (``config.bytes_moved``) plus the fp32 softmax statistics
    a fused forward writes and its backward reads (lse; spatial also cls_lse) and, backward of
    spatial, the fp32 per-group cls gradient partials (B·T·3·D) of the deterministic reduction."""
    b, t, h, d = shape.batch, shape.frames, shape.heads, shape.dim
    p = shape.patches * t
    stats = 4 * b * h * (p + (t if op == "spatial" else 0))
    partials = 4 * b * t * 3 * d if op == "spatial" and mode == "bwd" else 0
    return int(bytes_moved(op, shape, mode, itemsize)) + stats + partials


# ------------------------------------------------------------------ runs
def base_shape(batch: int = 1) -> Shape:
    _, t, n, d, h = SHAPE_FAMILIES["base"]
    return Shape("base", batch, t, n, d, h)


def op_input(op: str, shape: Shape, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(qkv leaf (B, 1 + N·T, 3·D), the op's input: qkv[:, 1:] for temporal (as in the models), qkv
    for spatial), as ``peers`` defines them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(shape.batch, shape.tokens, 3 * shape.dim, generator=g).to(dtype).requires_grad_()
    return qkv, (qkv[:, 1:] if op == "temporal" else qkv)


def run_op(fn: Callable, x: torch.Tensor, grads_seed: int = 1, force=None):
    """Forward and backward of one provider, each under its own ``AtenCounter`` and
    ``KernelCounter(force)``. Returns {mode: (records, launches)}."""
    fwd, bwd = AtenCounter(), AtenCounter()
    k_fwd, k_bwd = KernelCounter(force), KernelCounter(force)
    with k_fwd, fwd:
        outs = fn(x)
    g = torch.Generator().manual_seed(grads_seed)
    grads = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    with k_bwd, bwd:
        torch.autograd.grad(outs, x, grads)
    return {"fwd": (fwd.records, k_fwd.launches), "bwd": (bwd.records, k_bwd.launches)}


def gpu_autotune_configs() -> dict:
    """kernel name -> (autotune configs, prune function or None) of the GPU build of the Triton
    modules: each module is executed again as if no interpreter were active (the interpreter
    path replaces the lists with one small config), without touching the live modules."""
    from timesformer_kernels import backends
    from triton.runtime.autotuner import Autotuner

    found = {}
    for name in ("timesformer_kernels.triton.temporal", "timesformer_kernels.triton.spatial"):
        spec = importlib.util.find_spec(name)
        module = importlib.util.module_from_spec(spec)
        with mock.patch.object(backends, "interpreting", lambda: False), \
                mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
            spec.loader.exec_module(module)
        for obj in vars(module).values():
            if isinstance(obj, Autotuner):
                found[obj.base_fn.__name__] = (list(obj.configs), obj.early_config_prune)
    return found


class GpuTiling:
    """``KernelCounter`` force function: launches each kernel with the tile sizes (the BLOCK_*
    meta-parameters) of its ``index``-th distinct GPU autotune config among those the config
    pruning keeps for the launch's own arguments (all of them if pruning fails; the last one
    when it has fewer). Other meta-parameters (HEADS, heads per program) keep the launch's
    value. ``counts`` records how many distinct tilings each kernel has."""

    def __init__(self, configs: dict, index: int = 0):
        self.configs, self.index, self.counts = configs, index, {}

    def __call__(self, name: str, bound: dict) -> dict:
        if name not in self.configs:
            return {}
        cfgs, prune = self.configs[name]
        if prune is not None:
            with contextlib.suppress(Exception):
                cfgs = prune(cfgs, bound)
        tiles = []
        for c in cfgs:
            tile = {k: v for k, v in c.kwargs.items() if k in bound and k.startswith("BLOCK")}
            if tile not in tiles:
                tiles.append(tile)
        self.counts[name] = len(tiles)
        return tiles[min(self.index, len(tiles) - 1)] if tiles else {}


def kernel_rows(op: str, mode: str, launches: list) -> list[dict]:
    """One row per kernel (launches of one kernel summed) and one per tensor argument."""
    by_kernel: dict = {}
    for la in launches:
        entry = by_kernel.setdefault(la.kernel, {"tiling": la.tiling, "tensors": defaultdict(Traffic), "n": 0})
        entry["n"] += 1
        for name, t in la.tensors.items():
            entry["tensors"][name].add(t)
    rows = []
    for kernel, e in by_kernel.items():
        total = Traffic()
        for t in e["tensors"].values():
            total.add(t)
        rows.append(dict(op=op, mode=mode, kernel=kernel, tiling=e["tiling"],
                         launches=e["n"], traffic=total, tensors=dict(e["tensors"])))
    return rows


def hf_layer(shape: Shape, dtype: torch.dtype):
    """A Hugging Face TimesformerLayer of ``shape`` (16-pixel patches, random weights, no hub),
    and the label -> submodule map of the region breakdown."""
    from transformers import TimesformerConfig
    from transformers.models.timesformer.modeling_timesformer import TimesformerLayer

    side = round(shape.patches ** 0.5)
    if side * side != shape.patches:
        raise ValueError(f"shape: N={shape.patches} patches per frame is not a square")
    torch.manual_seed(0)
    config = TimesformerConfig(num_frames=shape.frames, image_size=16 * side, patch_size=16, hidden_size=shape.dim,
                               num_attention_heads=shape.heads, intermediate_size=4 * shape.dim,
                               attention_type="divided_space_time")
    layer = TimesformerLayer(config, 0).to(dtype).train()
    regions = {
        "temporal LayerNorm": layer.temporal_layernorm, "temporal qkv Linear": layer.temporal_attention.attention.qkv,
        "temporal attention": layer.temporal_attention.attention,
        "temporal proj, temporal_dense": layer.temporal_attention.output.dense,
        "temporal proj, temporal_dense ": layer.temporal_dense,
        "spatial LayerNorm": layer.layernorm_before, "spatial qkv Linear": layer.attention.attention.qkv,
        "spatial attention": layer.attention.attention, "spatial proj": layer.attention.output.dense,
        "MLP LayerNorm": layer.layernorm_after, "MLP": layer.intermediate, "MLP ": layer.output,
    }  # trailing spaces: two modules, one label
    x = torch.randn(shape.batch, shape.tokens, shape.dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    return layer, x.requires_grad_(), regions


def layer_counts(shape: Shape, dtype: torch.dtype, patched: bool, force: Optional[dict] = None) -> dict:
    """Aten records (forward, backward) and kernel launches of one HF layer, eager or patched."""
    import timesformer_kernels as tk

    layer, x, regions = hf_layer(shape, dtype)
    if patched:
        tk.patch(layer, backend="triton")
    fwd, bwd, kf, kb = AtenCounter(), AtenCounter(), KernelCounter(force), KernelCounter(force)
    with kf, fwd, label_regions(fwd, regions):
        y = layer(x)[0]
    with kb, bwd:
        torch.autograd.grad(y, [x, *layer.parameters()], torch.ones_like(y))
    return {"fwd": (fwd.records, kf.launches), "bwd": (bwd.records, kb.launches)}


def saved_counts(shape: Shape, patched: bool, force: Optional[dict] = None) -> dict:
    """saved_for_backward of one HF layer in fp32, train mode."""
    import timesformer_kernels as tk

    layer, x, regions = hf_layer(shape, torch.float32)
    if patched:
        tk.patch(layer, backend="triton")
    with KernelCounter(force):  # only for ``force``: what is saved does not depend on the tiling
        return saved_for_backward(lambda: layer(x), list(layer.parameters()), regions)


# ------------------------------------------------------------------ the report
def _mib(x: float) -> str:
    return f"{x / MIB:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else ""


class Report:
    """Collects CSV rows and markdown lines."""

    def __init__(self, shape: Shape, dtype: torch.dtype):
        self.rows: list[dict] = []
        self.md: list[str] = []
        self.shape_text = (f"B={shape.batch} T={shape.frames} N={shape.patches} D={shape.dim} H={shape.heads} "
                           f"Dh={shape.head_dim}")
        self.dtype = str(dtype).replace("torch.", "")

    def row(self, **kw) -> None:
        row = {c: "" for c in CSV_COLUMNS}
        row.update(dtype=self.dtype, shape=self.shape_text)
        row.update(kw)
        self.rows.append(row)

    def table(self, header: list, lines: list) -> None:
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md.extend("| " + " | ".join(str(c) for c in line) + " |" for line in lines)
        self.md.append("")

    def write(self, out: str) -> None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, CSV_NAME), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        with open(os.path.join(out, MD_NAME), "w") as f:
            f.write("\n".join(self.md).rstrip() + "\n")


def _fused_total(records: list, launches: list) -> tuple[int, int, int]:
    """(kernel bytes, torch bytes around/inside the op, copies) of our provider in one mode."""
    kernel = sum(la.traffic.total for la in launches)
    s = summarize(records)
    torch_bytes = sum(v["read"] + v["written"] for v in s.values())
    return kernel, torch_bytes, sum(v["copies"] for v in s.values())


def section_kernels(rep: Report, shape: Shape, itemsize: int, counts: dict, tilings: dict) -> None:
    """Per kernel vs minimum, per tensor, and the GPU tilings."""
    rep.md += ["## Fused kernels vs the minimum", "",
               "Counted under Triton's interpreter, each kernel launched with the tile sizes of its first GPU "
               "autotune config that pruning keeps (`tiling`; the interpreter's own small tiles, 32-row temporal and "
               "16x16 spatial, would take over an hour at this size on 2 cores). loaded / stored: every "
               "unmasked lane of every `tl.load` / `tl.store`; distinct: different bytes touched (what an ideal "
               "cache would fetch from DRAM); x distinct = (loaded + stored) / distinct, the re-read factor. "
               "Minimum per op and direction: forward qkv + out + lse (spatial: + cls_out, cls_lse), backward "
               "qkv + dout + lse + dqkv (temporal: `out` need not be read, see benchmarks/config.py; spatial: "
               "+ out, dcls_out, cls_out, cls_lse and the fp32 per-frame-group cls partials), each once. `torch ops in the op` are the op's own allocations, zero fills and the cls "
               "row reduction; `autograd` is the zero gradient autograd makes for the non-differentiable lse.", ""]
    lines = []
    for (op, mode), (records, launches) in counts.items():
        for r in kernel_rows(op, mode, launches):
            t = r["traffic"]
            lines.append([op, mode, f"`{r['kernel']}`", r["tiling"], r["launches"], _mib(t.loaded), _mib(t.stored),
                          _mib(t.distinct), _ratio(t.total, t.distinct)])
            rep.row(table="kernel", op=op, mode=mode, provider="triton", kernel=r["kernel"], tiling=r["tiling"],
                    item="all tensors", loaded_bytes=t.loaded, stored_bytes=t.stored, distinct_bytes=t.distinct,
                    ratio=_ratio(t.total, t.distinct))
    rep.table(["op", "mode", "kernel", "tiling", "launches", "loaded MiB", "stored MiB", "distinct MiB",
               "x distinct"], lines)

    lines = []
    for (op, mode), (records, launches) in counts.items():
        kernel, torch_bytes, _ = _fused_total(records, launches)
        inside = sum(r.read + r.written for r in records if r.region.startswith("inside"))
        minimum = minimum_bytes(op, shape, mode, itemsize)
        lines.append([op, mode, _mib(kernel), _mib(inside), _mib(torch_bytes - inside), _mib(kernel + torch_bytes),
                      _mib(minimum), _ratio(kernel, minimum), _ratio(kernel + torch_bytes, minimum)])
        rep.row(table="op_vs_minimum", op=op, mode=mode, provider="triton", item="kernels",
                loaded_bytes=sum(la.traffic.loaded for la in launches),
                stored_bytes=sum(la.traffic.stored for la in launches), minimum_bytes=minimum,
                ratio=_ratio(kernel, minimum))
        rep.row(table="op_vs_minimum", op=op, mode=mode, provider="triton", item="kernels + torch ops",
                loaded_bytes=kernel + torch_bytes, minimum_bytes=minimum, ratio=_ratio(kernel + torch_bytes, minimum))
    rep.table(["op", "mode", "kernels MiB", "torch ops in the op MiB", "autograd MiB", "total MiB", "minimum MiB",
               "kernels / minimum", "total / minimum"], lines)

    rep.md += ["### Per tensor argument", "",
               "Where the bytes above the minimum come from: a tensor loaded more than its distinct bytes is "
               "re-read (spatial: every query tile of a frame group reads all its keys and values again).", ""]
    lines = []
    for (op, mode), (records, launches) in counts.items():
        for r in kernel_rows(op, mode, launches):
            for name, t in sorted(r["tensors"].items()):
                lines.append([op, mode, f"`{r['kernel']}`", f"`{name}`", _mib(t.loaded), _mib(t.stored),
                              _mib(t.distinct), _ratio(t.total, t.distinct)])
                rep.row(table="kernel_tensor", op=op, mode=mode, provider="triton", kernel=r["kernel"],
                        tiling=r["tiling"], item=name, loaded_bytes=t.loaded, stored_bytes=t.stored,
                        distinct_bytes=t.distinct, ratio=_ratio(t.total, t.distinct))
    rep.table(["op", "mode", "kernel", "tensor", "loaded MiB", "stored MiB", "distinct MiB", "x distinct"], lines)

    if not tilings:
        return
    rep.md += ["### GPU autotune tilings", "",
               "The same kernels launched under the interpreter with the tile sizes of every GPU autotune "
               "config that the kernels' config pruning keeps at this shape (the config a GPU picks is not known "
               "without one): the distinct BLOCK_* values; HEADS (heads per program) keeps the interpreter's "
               "value and num_warps / num_stages do not change what is loaded. Only re-reads depend on the tile "
               "shape.", ""]
    lines = []
    for (op, mode, kernel, tiling), t in sorted(tilings.items(), key=lambda kv: kv[0][:3]):
        lines.append([op, mode, f"`{kernel}`", tiling, _mib(t.loaded), _mib(t.stored), _mib(t.distinct),
                      _ratio(t.total, t.distinct)])
        rep.row(table="kernel_gpu_tiling", op=op, mode=mode, provider="triton", kernel=kernel, tiling=tiling,
                item="all tensors", loaded_bytes=t.loaded, stored_bytes=t.stored, distinct_bytes=t.distinct,
                ratio=_ratio(t.total, t.distinct))
    rep.table(["op", "mode", "kernel", "tiling", "loaded MiB", "stored MiB", "distinct MiB", "x distinct"], lines)


def section_peers(rep: Report, shape: Shape, itemsize: int, peer_counts: dict) -> None:
    rep.md += ["## Fused op vs the unfused peers", "",
               "Op level, from the op's input to its outputs (and back): temporal reads `qkv[:, 1:]`, spatial "
               "`qkv`, as in `benchmarks/peers.py`. Peers: each aten op's inputs and outputs once (a floor: a GPU "
               "matmul may read more). Ours (`triton`): kernel bytes from the interpreter plus the torch ops in and "
               "around the op. copies: count and bytes of data-movement ops (clone of a non-contiguous "
               "reshape/matmul operand, cat, repeat, stack, dtype casts, slice/select backward scatters).", ""]
    lines = []
    for (op, mode), by_provider in peer_counts.items():
        minimum = minimum_bytes(op, shape, mode, itemsize)
        ours = None
        for provider, (records, launches) in by_provider.items():
            s = summarize(records)
            kernel = sum(la.traffic.total for la in launches)
            total = kernel + sum(v["read"] + v["written"] for v in s.values())
            copies = sum(v["copies"] for v in s.values())
            copy_bytes = sum(v["copy_bytes"] for v in s.values())
            ours = total if provider == "triton" else ours
            lines.append([op, mode, provider, _mib(total), f"{copies} ({_mib(copy_bytes)} MiB)", _mib(minimum),
                          _ratio(total, minimum), _ratio(total, ours) if ours else ""])
            rep.row(table="peers", op=op, mode=mode, provider=provider, item="total", loaded_bytes=total,
                    minimum_bytes=minimum, ratio=_ratio(total, minimum), copies=copies, copy_bytes=copy_bytes)
    rep.table(["op", "mode", "provider", "bytes MiB", "copies (bytes)", "minimum MiB", "/ minimum", "/ ours"], lines)


def section_layer(rep: Report, layer: dict, force: dict) -> None:
    tiling = "; ".join(f"`{k}` " + ",".join(f"{m}={v}" for m, v in t.items()) for k, t in force.items())
    rep.md += ["## One Hugging Face TimesformerLayer: eager vs patched", "",
               "`TimesformerLayer` (divided space-time, random weights, train mode), forward by the submodule "
               "running each op (`glue`: the layer's own code: rearranges, cat, residual adds, cls mean), "
               "backward by op category; patched with `tk.patch(layer, backend=\"triton\")`, whose attention "
               "ops are counted by their kernels (`fused attention`), launched with the first GPU autotune "
               f"tiling of each kernel ({tiling or 'the interpreter tiling'}).", ""]
    regions = []
    for variant in layer:
        for r in layer[variant]["fwd"][0]:
            name = _layer_region(r)
            if name not in regions:
                regions.append(name)
    lines = []
    for name in regions:
        cells = [name]
        for variant, modes in layer.items():
            records, launches = modes["fwd"]
            s = summarize([r for r in records if _layer_region(r) == name])
            sel = s.values()
            kernel = sum(la.traffic.total for la in launches) if name == "fused attention" else 0
            b = kernel + sum(v["read"] + v["written"] for v in sel)
            cells += [_mib(b), str(sum(v["copies"] for v in sel))]
            rep.row(table="layer_fwd", mode="fwd", provider=variant, item=name, loaded_bytes=b,
                    copies=sum(v["copies"] for v in sel), copy_bytes=sum(v["copy_bytes"] for v in sel))
        lines.append(cells)
    totals = ["**total**"]
    for variant, modes in layer.items():
        for mode in ("fwd",):
            records, launches = modes[mode]
            s = summarize(records)
            totals += [f"**{_mib(sum(la.traffic.total for la in launches) + sum(v['read'] + v['written'] for v in s.values()))}**",
                       f"**{sum(v['copies'] for v in s.values())}**"]
    lines.append(totals)
    header = ["forward, by submodule"] + [c for v in layer for c in (f"{v} MiB", f"{v} copies")]
    rep.table(header, lines)

    cats = ["compute", "copy", "fill", "fused (kernels)"]
    lines = []
    for cat in cats:
        cells = [cat]
        for variant, modes in layer.items():
            records, launches = modes["bwd"]
            if cat == "fused (kernels)":
                b, n = sum(la.traffic.total for la in launches), sum(r.category == "fused" for r in records)
            else:
                s = summarize([r for r in records if r.category == cat]).get(cat, {"read": 0, "written": 0, "ops": 0})
                b, n = s["read"] + s["written"], s["ops"]
            cells += [_mib(b), str(n)]
            rep.row(table="layer_bwd", mode="bwd", provider=variant, item=cat, loaded_bytes=b, copies=n)
        lines.append(cells)
    totals = ["**total**"]
    for variant, modes in layer.items():
        records, launches = modes["bwd"]
        b = sum(la.traffic.total for la in launches) + sum(r.read + r.written for r in records)
        totals += [f"**{_mib(b)}**", ""]
    lines.append(totals)
    rep.table(["backward, by op category"] + [c for v in layer for c in (f"{v} MiB", f"{v} ops")], lines)


def _layer_region(r: OpRecord) -> str:
    if r.category == "fused" or r.region.startswith("inside"):
        return "fused attention"
    return r.region.strip() if r.region else "glue"


def section_saved(rep: Report, saved: dict) -> None:
    rep.md += ["## Saved for backward, per layer", "",
               "fp32, B=1, train mode: the distinct storages the forward keeps for backward "
               "(`saved_tensors_hooks`), by the submodule that saved them first; parameters listed apart.", ""]
    labels = []
    for s in saved.values():
        labels += [k for k in s if k not in labels]
    lines = []
    for label in sorted(labels, key=lambda k: (k == "parameters", k)):
        cells = [label]
        for variant, s in saved.items():
            b, tensors = s.get(label, [0, []])
            cells += [_mib(b), ", ".join(sorted(set(tensors)))[:160]]
            rep.row(table="saved", provider=variant, item=label, loaded_bytes=b, dtype="float32")
        lines.append(cells)
    for variant, s in saved.items():
        rep.row(table="saved", provider=variant, item="total without parameters", dtype="float32",
                loaded_bytes=sum(v[0] for k, v in s.items() if k != "parameters"))
    lines.append(["**total without parameters**"] + [c for s in saved.values() for c in (
        f"**{_mib(sum(v[0] for k, v in s.items() if k != 'parameters'))}**", "")])
    lines.append(["total with parameters"] + [c for s in saved.values() for c in (
        _mib(sum(v[0] for v in s.values())), "")])
    rep.table(["saved by"] + [c for v in saved for c in (f"{v} MiB", f"{v} tensors")], lines)


def _log(msg: str) -> None:
    print(f"[bytes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def count_ops(shape: Shape, dtype: torch.dtype, providers: list, tilings: bool) -> tuple:
    """Forward and backward of each op for each provider. Our kernels run with the first GPU
    autotune tiling of each kernel, and with ``tilings`` again with every other one. Returns
    (counts {(op, mode): {provider: counts}}, {(op, mode, kernel, tiling): Traffic} of every
    tiling run, the tiling of the first run {kernel: meta})."""
    cpu = torch.device("cpu")
    configs = gpu_autotune_configs()
    peer_counts, traffic, first = defaultdict(dict), {}, {}
    for op in ("temporal", "spatial"):
        for provider in providers:
            fn = peers.build(provider, op, shape, cpu)
            index, runs = 0, 1
            while index < runs:
                _log(f"{op} {provider}" + (f" GPU tiling #{index + 1}" if provider == "triton" else ""))
                tiling = GpuTiling(configs, index)
                res = run_op(fn, op_input(op, shape, dtype)[1], force=tiling)
                for mode, (_, launches) in res.items():
                    if index == 0:
                        peer_counts[(op, mode)][provider] = res[mode]
                        first.update({la.kernel: la.meta for la in launches})
                    for r in kernel_rows(op, mode, launches):
                        traffic[(op, mode, r["kernel"], r["tiling"])] = r["traffic"]
                runs = max(tiling.counts.values(), default=1) if tilings else 1
                index += 1
    first = {k: {m: v for m, v in meta.items() if m.startswith("BLOCK")} for k, meta in first.items()}
    return dict(peer_counts), traffic, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bytes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "bytes"))
    ap.add_argument("--shape", default="base", help=f"one of {', '.join(SHAPE_FAMILIES)} (N a square)")
    ap.add_argument("--batch", type=int, default=1, help="clips (bytes scale with it)")
    ap.add_argument("--sections", default="kernels,tilings,peers,layer,saved",
                    help="kernels (ours vs minimum), tilings (GPU autotune tile sizes), peers, layer, saved")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _interpreter()
    import transformers
    import triton

    sections = {s.strip() for s in args.sections.split(",")}
    if args.shape not in SHAPE_FAMILIES:
        raise ValueError(f"--shape: unknown shape {args.shape!r} (known: {', '.join(SHAPE_FAMILIES)})")
    _, t, n, d, h = SHAPE_FAMILIES[args.shape]
    shape, dtype = Shape(args.shape, args.batch, t, n, d, h), torch.float16
    itemsize = torch.empty((), dtype=dtype).element_size()
    rep, times, started = Report(shape, dtype), {}, time.monotonic()

    peer_counts, tilings, first = {}, {}, {}
    if sections & {"kernels", "tilings", "peers"}:
        t0 = time.monotonic()
        providers = ["triton"] + (["hf_eager", "sdpa"] if "peers" in sections else [])
        peer_counts, tilings, first = count_ops(shape, dtype, providers, "tilings" in sections)
        times["ops"] = time.monotonic() - t0
    # The layer runs launch the fused kernels with their first GPU tiling: fewer, larger programs
    # than the interpreter's 16-row tiles (much faster to interpret); what is saved does not depend on it.
    layer, saved = {}, {}
    if "layer" in sections:
        t0 = time.monotonic()
        for variant, patched in (("eager", False), ("patched", True)):
            _log(f"HF layer {variant}")
            layer[variant] = layer_counts(shape, dtype, patched, first)
        times["HF layer"] = time.monotonic() - t0
    if "saved" in sections:
        t0 = time.monotonic()
        for variant, patched in (("eager", False), ("patched", True)):
            _log(f"saved for backward {variant}")
            saved[variant] = saved_counts(shape, patched, first)
        times["saved for backward"] = time.monotonic() - t0
    total = time.monotonic() - started

    rep.md += ["# Counted bytes, not timings", "",
               f"TimeSformer-{shape.name} attention, {rep.shape_text}, {rep.dtype} (2-byte elements, as bf16; "
               f"fp32 softmax statistics), counted on the CPU: Triton {triton.__version__} interpreter, torch "
               f"{torch.__version__}, transformers {transformers.__version__}. Every number is a count of the "
               "bytes the code asks to load or store, not a measurement of time or of DRAM traffic; bytes scale "
               "with B. MiB = 2^20 bytes. How each counter works: the docstring of `benchmarks/bytes.py`.", "",
               f"Regenerate: `python -m benchmarks.bytes {' '.join(argv if argv is not None else sys.argv[1:])}` "
               f"({total:.0f} s on this "
               "machine: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ").", ""]
    if "kernels" in sections:
        section_kernels(rep, shape, itemsize, {k: v["triton"] for k, v in peer_counts.items()},
                        tilings if "tilings" in sections else {})
    if "peers" in sections:
        section_peers(rep, shape, itemsize, peer_counts)
    if layer:
        section_layer(rep, layer, first)
    if saved:
        section_saved(rep, saved)
    rep.write(args.out)
    print("\n".join(rep.md))
    _log(f"wrote {os.path.join(args.out, MD_NAME)} and {CSV_NAME} in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
