"""Microbenchmarks of one op (temporal or spatial) at one shape and dtype, every provider and
mode measured in the same process, one after the other, on the same input.

Per provider: build it, check its outputs and its gradient against the float32 result of
timesformer_kernels' ``torch`` backend (the reference maths) on the same input, so a
broken provider reports an error instead of winning; then per mode:

    fwd      the forward under torch.no_grad()
    bwd      torch.autograd.grad with a fixed random upstream gradient, of a fresh forward
             made (untimed) before every repeat
    fwd+bwd  forward and that backward

median / p20 / p80 time, TFLOP/s, GB/s, % of the measured memory and compute rooflines and
the peak memory of one call, written as CSV rows; then the speed-up of each of ours over
each peer.
"""
from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import peers
from .config import KERNEL_NAMES, Shape, bytes_moved, flops
from .report import CsvWriter
from .timing import bench, peak_memory_mb, synchronize

# ‖out − ref‖ / ‖ref‖ allowed against the float32 reference, per dtype of the inputs. bf16
# operands land between 1e-3 and 1e-2; float32 allows TF32 dots (Triton's default).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 5e-3, torch.float64: 1e-8}
# Seconds a provider is expected to need, checked against the time budget before starting it.
COST_S = {"compiling_cuda": 45.0, "default": 4.0}


class Deadline:
    """The time left for the whole run; sections and providers ask before they start."""

    def __init__(self, budget_s: Optional[float], start: Optional[float] = None):
        self.start = time.monotonic() if start is None else start
        self.end = None if not budget_s else self.start + budget_s

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Previous:
    """Medians of an earlier run's CSV (``--resume``): what need not be measured again, and
    the times the speed-ups against it need."""

    def __init__(self, rows=()):
        self.micro: dict = {}  # (kernel, provider, shape, B, dtype, mode) -> (p50, p20, p80)
        self.e2e: dict = {}  # (kernel, variant, mode, B) -> (p50, p20, p80)
        for r in rows:
            c, y = r["config"], (r["y_value_50"], r["y_value_20"], r["y_value_80"])
            if r["metric"] == "time_ms":
                self.micro[(r["kernel_name"], r["kernel_provider"], c.get("shape"), c.get("B"), c.get("dtype"),
                            c.get("mode"))] = y
            elif r["metric"] == "step_ms":
                self.e2e[(r["kernel_name"], r["kernel_provider"], c.get("mode"), c.get("B"))] = y


@dataclass
class Context:
    """What every section of a run shares."""

    device: torch.device
    writer: CsvWriter
    rooflines: dict
    deadline: Deadline
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 3
    log: Callable[[str], None] = print
    failures: list = field(default_factory=list)
    previous: Previous = field(default_factory=Previous)

    def dtype_name(self, dtype: torch.dtype) -> str:
        return str(dtype).replace("torch.", "")


class Mismatch(Exception):
    """A provider's result differs from the reference by more than the tolerance."""


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    value = value.detach().to(ref.dtype)
    num = (value - ref).norm().item()
    den = ref.norm().item()
    return num / den if den > 0 else num


def _reference(op: str, shape: Shape):
    """The fp32 (fp64 for fp64 inputs) reference: timesformer_kernels' torch backend."""
    return peers.build("torch", op, shape, torch.device("cpu"))


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def run_case(ctx: Context, op: str, shape: Shape, dtype: torch.dtype, providers: list[str], modes: list[str],
             label: str = "", skip: Optional[dict] = None) -> None:
    """Measure every provider and mode of one (op, shape, dtype); rows go to ctx.writer.
    ``skip`` maps provider names to a reason not to run them in this case."""
    kernel, device, dname = KERNEL_NAMES[op], ctx.device, ctx.dtype_name(dtype)
    base_cfg = {**shape.config(), "dtype": dname}
    times: dict = {}
    done = set()
    for name in providers:
        before = {m: ctx.previous.micro.get((kernel, name, shape.name, shape.batch, dname, m)) for m in modes}
        if all(before.values()):
            done.add(name)
            times.update({(name, m): t for m, t in before.items()})
    if done:
        ctx.log(f"{label}{kernel:18s} {shape.label:10s} {dname:8s} measured before (--resume): "
                f"{', '.join(sorted(done))}")
    if len(done) == len(providers):
        return
    need_grad = any(m != "fwd" for m in modes)
    gen = torch.Generator(device=device).manual_seed(1234 + shape.batch)
    qkv = torch.randn(shape.batch, shape.tokens, 3 * shape.dim, device=device, dtype=dtype, generator=gen)
    op_input = qkv[:, 1:] if op == "temporal" else qkv  # temporal: the patch rows, a strided view
    x = op_input.detach().requires_grad_(need_grad)

    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xr = op_input.detach().to(ref_dtype).requires_grad_(need_grad)
    ref_outs = _reference(op, shape)(xr)
    douts = tuple(torch.randn(o.shape, device=device, dtype=dtype, generator=gen) for o in ref_outs)
    ref_grad = None
    if need_grad:
        ref_grad = torch.autograd.grad(ref_outs, xr, [d.to(ref_dtype) for d in douts])[0].detach()
    ref_outs = tuple(o.detach() for o in ref_outs)
    del xr

    for name in providers:
        if name in done:
            continue
        cfg = dict(base_cfg)
        reasons = [skip[name]] if skip and name in skip else peers.why_not(name, op, shape, device, dtype, modes)
        cost = COST_S["compiling_cuda"] if (name in peers.COMPILING and device.type == "cuda") else COST_S["default"]
        if not reasons and not ctx.deadline.allows(cost):
            reasons = [f"time budget: {ctx.deadline.left():.0f} s left, about {cost:.0f} s needed"]
        if reasons:
            _skip_all(ctx, kernel, name, shape, cfg, modes, "; ".join(reasons), label)
            continue
        try:
            if name in peers.COMPILING:
                torch._dynamo.reset()  # each case compiles its own graphs; keep the cache bounded
            fn = peers.build(name, op, shape, device)
            err = _check(fn, x, douts, ref_outs, ref_grad, dtype)
        except peers.Unavailable as e:
            _skip_all(ctx, kernel, name, shape, cfg, modes, str(e), label)
            continue
        except Exception as e:  # noqa: BLE001 - one provider's failure must not end the run
            _error_all(ctx, kernel, name, shape, cfg, modes, e, label)
            continue
        ctx.writer.add(kernel, name, "rel_err", "B", shape.batch, err, config={**cfg, "vs": "float32 reference"})
        for mode in modes:
            try:
                times[(name, mode)] = _measure(ctx, kernel, name, fn, x, douts, op, shape, dtype, mode, cfg, label)
            except Exception as e:  # noqa: BLE001
                _error(ctx, kernel, name, shape, {**cfg, "mode": mode}, e, label)
        del fn
        _free(device)

    for mode in modes:
        for ours in peers.OURS:
            if (ours, mode) not in times:
                continue
            o50, o20, o80 = times[(ours, mode)]
            for name in providers:
                if name in peers.OURS or (name, mode) not in times or (ours in done and name in done):
                    continue  # both from the earlier run: its speed-up rows are kept by the merge
                p50, p20, p80 = times[(name, mode)]
                ctx.writer.add(kernel, ours, f"speedup_vs_{name}", "B", shape.batch, p50 / o50, p20 / o80, p80 / o20,
                               config={**cfg_mode(base_cfg, mode)})
    del qkv, x, douts, ref_outs, ref_grad, op_input
    _free(device)


def cfg_mode(cfg: dict, mode: str) -> dict:
    return {**cfg, "mode": mode}


def _check(fn, x, douts, ref_outs, ref_grad, dtype) -> float:
    """Run the provider once with gradient and compare everything it returns; the worst
    relative error, or Mismatch."""
    tol = TOLERANCE[dtype]
    outs = fn(x)
    if len(outs) != len(ref_outs):
        raise Mismatch(f"returned {len(outs)} outputs, expected {len(ref_outs)}")
    worst = 0.0
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        if tuple(o.shape) != tuple(r.shape):
            raise Mismatch(f"output {i} has shape {tuple(o.shape)}, expected {tuple(r.shape)}")
        e = rel_err(o, r)
        if not e <= tol:  # NaN fails too
            raise Mismatch(f"output {i}: relative error {e:.3g} > {tol:g} against the float32 reference")
        worst = max(worst, e)
    if ref_grad is not None:
        (g,) = torch.autograd.grad(outs, x, douts)
        e = rel_err(g, ref_grad)
        if not e <= tol:
            raise Mismatch(f"gradient: relative error {e:.3g} > {tol:g} against the float32 reference")
        worst = max(worst, e)
    return worst


def _measure(ctx: Context, kernel: str, name: str, fn, x, douts, op: str, shape: Shape, dtype: torch.dtype,
             mode: str, cfg: dict, label: str) -> tuple[float, float, float]:
    device = ctx.device
    setup = None
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(x)
    elif mode == "bwd":
        def setup():  # a fresh forward, untimed, before every timed backward
            return fn(x)

        def call(outs):
            return torch.autograd.grad(outs, x, douts)
    else:
        def call():
            return torch.autograd.grad(fn(x), x, douts)
    if setup is None:
        call()  # compile / autotune / allocate outside the timing
    else:
        call(setup())
    synchronize(device)
    p50, p20, p80 = bench(call, device, ctx.warmup_ms, ctx.rep_ms, ctx.min_reps, setup=setup)
    peak = peak_memory_mb(call, device, setup=setup)
    cfg = cfg_mode(cfg, mode)
    w = ctx.writer
    b = shape.batch
    w.add(kernel, name, "time_ms", "B", b, p50, p20, p80, config=cfg)
    fl = flops(op, shape, mode)
    by = bytes_moved(op, shape, mode, torch.empty((), dtype=dtype).element_size())
    w.add(kernel, name, "tflops", "B", b, fl / p50 / 1e9, fl / p80 / 1e9, fl / p20 / 1e9, config=cfg)
    w.add(kernel, name, "gbps", "B", b, by / p50 / 1e6, by / p80 / 1e6, by / p20 / 1e6, config=cfg)
    copy_gbps = ctx.rooflines.get("copy_gbps")
    mem_pct = comp_pct = None
    if copy_gbps:
        floor_ms = by / (copy_gbps * 1e9) * 1e3
        mem_pct = 100 * floor_ms / p50
        w.add(kernel, name, "pct_mem_roofline", "B", b, mem_pct, 100 * floor_ms / p80, 100 * floor_ms / p20, config=cfg)
    peak_tflops = ctx.rooflines.get("matmul_tflops", {}).get(ctx.dtype_name(dtype))
    if peak_tflops:
        floor_ms = fl / (peak_tflops * 1e12) * 1e3
        comp_pct = 100 * floor_ms / p50
        w.add(kernel, name, "pct_compute_roofline", "B", b, comp_pct, 100 * floor_ms / p80, 100 * floor_ms / p20,
              config=cfg)
    if peak is not None:
        w.add(kernel, name, "peak_mem_mb", "B", b, peak, config=cfg)
    roof = (f"  {by / p50 / 1e6:8.1f} GB/s" + (f" ({mem_pct:4.0f}% mem)" if mem_pct is not None else "")
            + f"  {fl / p50 / 1e9:7.2f} TFLOP/s" + (f" ({comp_pct:4.1f}% mm)" if comp_pct is not None else "")
            + (f"  peak {peak:.0f} MiB" if peak is not None else ""))
    ctx.log(f"{label}{kernel:18s} {shape.label:10s} {ctx.dtype_name(dtype):8s} {mode:7s} {name:10s} "
            f"{p50:9.4f} ms [{p20:.4f}, {p80:.4f}]{roof}")
    return p50, p20, p80


def _skip_all(ctx, kernel, name, shape, cfg, modes, reason, label):
    for mode in modes:
        ctx.writer.add(kernel, name, "skipped", "B", shape.batch, config={**cfg_mode(cfg, mode), "reason": reason})
    ctx.log(f"{label}{kernel:18s} {shape.label:10s} {cfg['dtype']:8s} {'':7s} {name:10s} skipped: {reason}")


def _error(ctx, kernel, name, shape, cfg, exc, label):
    msg = _short(exc)
    ctx.writer.add(kernel, name, "error", "B", shape.batch, config={**cfg, "error": msg})
    ctx.failures.append(f"{kernel} {name} {shape.label} {cfg.get('dtype')} {cfg.get('mode', '')}: {msg}")
    ctx.log(f"{label}{kernel:18s} {shape.label:10s} {cfg['dtype']:8s} {cfg.get('mode', ''):7s} {name:10s} "
            f"ERROR {msg}")
    if not isinstance(exc, Mismatch):
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        ctx.log("    " + "    ".join(tb[-3:]).rstrip())


def _error_all(ctx, kernel, name, shape, cfg, modes, exc, label):
    for i, mode in enumerate(modes):
        if i == 0:
            _error(ctx, kernel, name, shape, cfg_mode(cfg, mode), exc, label)
        else:
            ctx.writer.add(kernel, name, "error", "B", shape.batch,
                           config={**cfg_mode(cfg, mode), "error": _short(exc)})


def _free(device: torch.device) -> None:
    """Return the last provider's memory to the device, so the next one's peak starts clean."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
