"""Guard zones around every buffer a Triton kernel touches, and the edge-case calls of both
ops that run inside them (issue 11 §3; used by test_guard_zones.py and test_sanitizer.py).

Every guard zone holds a *sentinel*: a NaN with a payload no arithmetic produces. A kernel
that reads one element of a zone puts a NaN into what it computes (an output or gradient
that is no longer finite; ``tl.dot`` spreads it even where the other factor is 0), one that
writes an element changes the sentinel's bits. Zones:

* inputs (qkv, dout, dcls_out) are views of a larger sentinel-filled storage: sentinel rows
  before the first row and between batches, sentinel columns before and after every row,
  and sentinel space before and after the whole buffer; the whole storage, view included,
  must be bit-identical after the call;
* the buffers the Triton wrappers allocate (out, lse, cls_out, cls_lse, dqkv, the cls
  partial sums, delta) come from ``GuardZones.torch``, which stands in for the ``torch``
  module of ``timesformer_kernels.triton.temporal`` / ``spatial``: each ``empty``/``zeros``
  is a contiguous slice of a larger buffer, sentinel before and after it, filled with NaN
  (``empty``: a read of an element no kernel wrote shows up too) or zeros.

Not seen here: a read whose value is discarded unused (e.g. by ``tl.where``), and an access
that stays inside its buffer but hits another row's or head's elements (the reference
comparison catches it when it changes a result). triton-viz's Sanitizer checks addresses
instead (test_sanitizer.py).
"""
from __future__ import annotations

import dataclasses
import math
import sys

import torch
import triton
import triton.language as tl

from reference import ref_spatial_attention, ref_temporal_attention
from timesformer_kernels import backends
from timesformer_kernels import triton as kernels
from timesformer_kernels.layout import spatial_groups, temporal_groups

# The sentinel's bits per dtype: exponent all ones, a mantissa payload (a quiet NaN).
_SENTINEL_BITS = {
    torch.float16: (torch.int16, 0x7E5A),
    torch.bfloat16: (torch.int16, 0x7FDA),
    torch.float32: (torch.int32, 0x7FC5A5A5),
    torch.float64: (torch.int64, 0x7FF85A5A5A5A5A5A),
}
_PAD = 64  # sentinel elements before and after every allocation (plus its own size)
_PAD_COLS = 8  # sentinel columns before and after every input row
_PAD_ROWS = 2  # sentinel rows before each batch's first row


def sentinel(numel: int, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """A 1-d buffer of ``numel`` sentinels."""
    if dtype not in _SENTINEL_BITS:
        raise TypeError(f"dtype {dtype} has no sentinel (floating dtypes only)")
    int_dtype, bits = _SENTINEL_BITS[dtype]
    return torch.full((numel,), bits, dtype=int_dtype, device=device).view(dtype)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_SENTINEL_BITS[x.dtype][0])


def _first_change(name: str, before: torch.Tensor, after: torch.Tensor, where) -> str | None:
    """A message naming the first element whose bits changed (``where(i)`` says where index
    ``i`` is), or None."""
    changed = (_bits(before) != _bits(after)).nonzero()
    if not len(changed):
        return None
    i = int(changed[0])
    return f"{name}: {len(changed)} element(s) overwritten, the first {where(i)}, now {after[i].item()!r}"


class GuardZones:
    """The guarded buffers of one kernel call and the check that no zone was touched."""

    def __init__(self):
        self._inputs = []  # (name, storage, snapshot, view mask)
        self._allocs = []  # (name, buffer, start, end, snapshot)
        self.torch = _GuardedTorch(self)

    def input(self, name: str, values: torch.Tensor, batch_inner: bool = False) -> torch.Tensor:
        """``values`` (B, L, C) copied into a view of a sentinel-filled storage with padding
        around every row; ``batch_inner`` lays the batches out inside each row block."""
        b, rows, cols = values.shape
        row_stride = cols + 2 * _PAD_COLS
        outer, inner = (rows, b) if batch_inner else (b, rows)
        block = (_PAD_ROWS + inner) * row_stride  # sentinel rows, then the rows of one batch (token)
        strides = (row_stride, block, 1) if batch_inner else (block, row_stride, 1)
        offset = _PAD + _PAD_ROWS * row_stride + _PAD_COLS
        size = _PAD + outer * block + _PAD
        storage = sentinel(size, values.dtype, values.device)
        view = storage.as_strided(values.shape, strides, offset)
        view.copy_(values)
        inside = torch.zeros(size, dtype=torch.bool)
        inside.as_strided(values.shape, strides, offset).fill_(True)
        self._inputs.append((name, storage, storage.clone(), inside))
        return view

    def alloc(self, name: str, shape, dtype, device, fill: float) -> torch.Tensor:
        """A contiguous tensor of ``shape`` filled with ``fill``, between two sentinel zones."""
        numel = math.prod(shape)
        pad = _PAD + numel
        buf = sentinel(pad + numel + pad, dtype, device)
        view = buf[pad:pad + numel].view(shape)
        view.fill_(fill)
        name = f"{name} #{len(self._allocs)} {tuple(shape)} {str(dtype)[6:]}"
        self._allocs.append((name, buf, pad, pad + numel, buf.clone()))
        return view

    def check(self):
        """AssertionError naming every buffer whose guard zone (or, for inputs, any element) changed."""
        errors = []
        for name, storage, snapshot, inside in self._inputs:
            errors.append(_first_change(f"input {name}", snapshot, storage, lambda i: (
                f"at storage index {i} ({'inside the view' if inside[i] else 'guard zone'})")))
        for name, buf, start, end, snapshot in self._allocs:
            errors.append(_first_change(name, snapshot[:start], buf[:start],
                                        lambda i: f"{start - i} element(s) before its start"))
            errors.append(_first_change(name, snapshot[end:], buf[end:],
                                        lambda i: f"{i + 1} element(s) past its end"))
        errors = [e for e in errors if e]
        assert not errors, "guard zones touched:\n" + "\n".join(errors)

    def guarded(self, x: torch.Tensor) -> bool:
        """Whether ``x`` lies in one of the guarded allocations."""
        return any(x.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                   for _, buf, _, _, _ in self._allocs)


class _GuardedTorch:
    """Stands in for ``torch`` inside a Triton wrapper module: ``empty``/``zeros`` return
    guarded allocations, everything else is torch's."""

    def __init__(self, zones: GuardZones):
        self._zones = zones

    def __getattr__(self, name):
        return getattr(torch, name)

    def _alloc(self, size, dtype, device, fill):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        caller = sys._getframe(2).f_code.co_name  # the wrapper that allocates
        return self._zones.alloc(caller, size, dtype or torch.get_default_dtype(), device or "cpu", fill)

    def empty(self, *size, dtype=None, device=None):
        return self._alloc(size, dtype, device, float("nan"))

    def zeros(self, *size, dtype=None, device=None):
        return self._alloc(size, dtype, device, 0.0)


def guard_allocations(monkeypatch, zones: GuardZones):
    """Route the Triton wrappers' allocations through ``zones``."""
    monkeypatch.setattr(kernels.temporal, "torch", zones.torch)
    monkeypatch.setattr(kernels.spatial, "torch", zones.torch)


# --------------------------------------------------------------------------- edge cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One call of an op, forward and backward, through ``timesformer_kernels.triton``."""

    op: str  # "temporal" or "spatial" (always the cls key and query)
    t: int
    n: int
    h: int
    dh: int
    order: str = "space_major"
    with_cls: bool = False  # temporal: the cls key
    dtype: torch.dtype = torch.float32
    b: int = 2
    batch_inner: bool = False  # qkv and dout laid out (L, B, C) in memory
    cls_grad: bool = True  # spatial: a gradient reaches cls_out (False: dcls_out is None)
    tiles: tuple | None = None  # see use_tiles; None: the interpreter's

    def __str__(self):
        extra = "-cls" if self.with_cls else ""
        extra += "-batch_inner" if self.batch_inner else ""
        extra += "" if self.cls_grad else "-no_dcls"
        extra += f"-tiles{self.tiles[0]}x{self.tiles[1]}" if self.tiles else ""
        return (f"{self.op}-T{self.t}-N{self.n}-H{self.h}-Dh{self.dh}-{self.order}{extra}"
                f"-{str(self.dtype)[6:]}")

    @property
    def length(self) -> int:
        return self.n * self.t + int(self.op == "spatial" or self.with_cls)

    def groups(self):
        if self.op == "spatial":
            return spatial_groups(self.b, self.length, self.t, self.h, self.dh, self.order)
        return temporal_groups(self.b, self.length, self.t, self.h, self.dh, self.order, self.with_cls)


def use_tiles(monkeypatch, case: Case):
    """Launches ``case`` with tiles a GPU's autotuner may pick instead of the interpreter's:
    ``tiles`` = (BLOCK_M, HEADS) for the short-group temporal kernels, (BLOCK_M, BLOCK_N)
    for the flash kernels (spatial, and temporal with T > 128)."""
    if case.tiles is None:
        return
    if case.op == "temporal" and case.t <= kernels.temporal.MAX_SEQ:
        monkeypatch.setattr(kernels.temporal, "INTERPRET_CONFIG", {"BLOCK_M": case.tiles[0], "HEADS": case.tiles[1]})
        return
    config = triton.Config({"BLOCK_M": case.tiles[0], "BLOCK_N": case.tiles[1]}, num_warps=4, num_stages=1)
    for kernel in (kernels.spatial._spatial_fwd_kernel, kernels.spatial._spatial_bwd_dq_kernel,
                   kernels.spatial._spatial_bwd_dkdv_kernel):
        monkeypatch.setattr(kernel, "configs", [config])
    # the whole-group backward's query tile is the group's; only its key blocks are a choice
    group = triton.Config({"BLOCK_N": case.tiles[1]}, num_warps=4, num_stages=1)
    monkeypatch.setattr(kernels.spatial._spatial_bwd_group_kernel, "configs", [group])


def skip_reason(case: Case) -> str | None:
    if case.dh not in backends.TRITON_HEAD_DIMS:
        return f"head_dim {case.dh} is not in backends.TRITON_HEAD_DIMS (yet)"
    return None


# (forward, gradient) tolerances against the float64 reference
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5), torch.float16: (3e-3, 2e-2)}


def run_case(case: Case, zones: GuardZones | None = None, check_values: bool = True, seed: int = 0):
    """Forward and backward of ``case``, then (``check_values``) outputs and dqkv against the
    float64 reference, finite and close. With ``zones`` (and ``guard_allocations`` active):
    inputs in guard zones, every result allocated in one, and the zones checked after each
    pass; without: plain contiguous tensors (for a tool that checks each access against the
    bounds of the kernel's tensor arguments, and computes no values)."""
    gen = torch.Generator().manual_seed(seed)
    d = case.h * case.dh

    def tensor(name, *shape, batch_inner=False):
        values = torch.randn(*shape, generator=gen, dtype=torch.float64).to(case.dtype)
        return values if zones is None else zones.input(name, values, batch_inner)

    def check_zones():
        if zones is not None:
            zones.check()

    groups, scale = case.groups(), case.dh ** -0.5
    qkv = tensor("qkv", case.b, case.length, 3 * d, batch_inner=case.batch_inner)
    out, cls_out, lse, cls_lse = kernels.attention_fwd(qkv, groups, scale)
    check_zones()
    dout = tensor("dout", case.b, case.n * case.t, d, batch_inner=case.batch_inner)
    dcls = tensor("dcls_out", case.b, case.t, d) if cls_out is not None and case.cls_grad else None
    dqkv = kernels.attention_bwd(dout, dcls, qkv, out, cls_out, lse, cls_lse, groups, scale)
    check_zones()
    results = {"out": out, "cls_out": cls_out, "lse": lse, "cls_lse": cls_lse, "dqkv": dqkv}
    for name, value in results.items():
        assert zones is None or value is None or zones.guarded(value), f"{name} is not in a guard zone"
    if not check_values:
        return

    x = qkv.detach().double().requires_grad_(True)
    if case.op == "spatial":
        refs = ref_spatial_attention(x, case.t, case.h, scale, case.order)
    else:
        refs = (ref_temporal_attention(x, case.t, case.h, scale, case.order, case.with_cls),)
    got = (out, cls_out)[:len(refs)]
    grads = [g for g in (dout, dcls)[:len(refs)] if g is not None]
    (dref,) = torch.autograd.grad(refs[:len(grads)], x, [g.double() for g in grads])
    fwd_tol, grad_tol = TOL[case.dtype]
    for name, value in (("lse", lse), ("cls_lse", cls_lse)):
        assert value is None or torch.isfinite(value).all(), f"{name} is not finite"
    for name, value, ref in zip(("out", "cls_out"), got, refs):
        torch.testing.assert_close(value.double(), ref, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(dqkv.double(), dref, atol=grad_tol, rtol=grad_tol, msg=lambda m: f"dqkv: {m}")


# ------------------------------------------------------------- a planted bug, for the checks
@triton.jit
def planted_row_sums(src, dst, stride_src, cols, READ_SHIFT: tl.constexpr, WRITE_SHIFT: tl.constexpr,
                     BLOCK: tl.constexpr):
    """dst[r] = sum(src[r, :cols]), with the loads and the store shifted by READ_SHIFT /
    WRITE_SHIFT elements (0, 0: correct; otherwise one element outside a row or dst)."""
    r = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    x = tl.load(src + r * stride_src + c + READ_SHIFT, mask=c < cols, other=0.0)
    tl.store(dst + r + WRITE_SHIFT, tl.sum(x, axis=0))


def run_planted(src: torch.Tensor, dst: torch.Tensor, read_shift: int, write_shift: int):
    """``planted_row_sums`` over the rows of 2-d ``src`` into ``dst``."""
    rows, cols = src.shape
    planted_row_sums[(rows,)](src, dst, src.stride(0), cols, READ_SHIFT=read_shift, WRITE_SHIFT=write_shift,
                              BLOCK=triton.next_power_of_2(cols))
