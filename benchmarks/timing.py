"""Timers, peak memory, the device's measured rooflines and the environment of a run.

On CUDA, ``bench`` is ``triton.testing.do_bench`` asked for the 50th, 20th and 80th
percentiles: it warms up, times every repeat with CUDA events and clears the L2 cache
between repeats, so a kernel whose inputs fit in L2 is not timed on a warm cache. A
backward is timed by the same method in our own loop (CUDA events around each call, L2
cleared before it) with a fresh, untimed forward before every repeat, which also serves
when Triton is absent. On the CPU it is a plain perf_counter loop (the smoke run only keeps
the harness working there; CPU times are not the point of this benchmark).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Optional

import torch


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of the samples, linear interpolation."""
    xs = sorted(samples)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return statistics.median(xs), q(0.2), q(0.8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[..., object], device: torch.device, warmup_ms: float = 25.0, rep_ms: float = 100.0,
          min_reps: int = 3, setup: Optional[Callable[[], object]] = None) -> tuple[float, float, float]:
    """(median, p20, p80) of one call of ``fn`` in milliseconds, after warm-up.

    The caller runs ``fn`` once before (compilation, autotuning, allocation stay out of the
    numbers); warm-up and repeat budgets are in milliseconds like do_bench's. With ``setup``,
    every repeat first calls ``setup()`` untimed and then times ``fn(setup's result)``: a
    backward timed on a fresh forward each time, so no provider needs ``retain_graph``.
    """
    if setup is not None:
        return _bench_with_setup(fn, setup, device, warmup_ms, rep_ms, min_reps)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _bench_with_setup(lambda _: fn(), lambda: None, device, warmup_ms, rep_ms, min_reps)
        try:
            p50, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        except TypeError:  # a Triton whose do_bench lacks quantiles: the same method, our loop
            return _bench_with_setup(lambda _: fn(), lambda: None, device, warmup_ms, rep_ms, min_reps)
        return float(p50), float(p20), float(p80)
    return _bench_with_setup(lambda _: fn(), lambda: None, device, warmup_ms, rep_ms, min_reps)


def _bench_with_setup(fn, setup, device: torch.device, warmup_ms: float, rep_ms: float,
                      min_reps: int) -> tuple[float, float, float]:
    """Like do_bench (CUDA events per repeat, L2 cleared before each timed call), with an
    untimed ``setup`` before every repeat; a perf_counter loop on the CPU."""
    cuda = device.type == "cuda"
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if cuda else None

    def once() -> float:
        state = setup()
        if cuda:
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(state)
        return (time.perf_counter() - t0) * 1e3

    begin = time.perf_counter()
    while (time.perf_counter() - begin) * 1e3 < warmup_ms:  # the caller has run fn once already
        once()
    # Repeats are counted in time spent, setup included, so a slow setup cannot blow the budget.
    samples: list[float] = []
    begin = time.perf_counter()
    while len(samples) < min_reps or ((time.perf_counter() - begin) * 1e3 < rep_ms and len(samples) < 1000):
        samples.append(once())
    return quantiles(samples)


def peak_memory_mb(fn: Callable[..., object], device: torch.device,
                   setup: Optional[Callable[[], object]] = None) -> Optional[float]:
    """Peak device memory allocated during one call of ``fn`` (of ``setup()``'s result when
    given), above what was allocated before it (its outputs count, its inputs do not), in
    MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    state = setup() if setup is not None else None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn(state) if setup is not None else fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result, state
    return peak / 2**20


# ---------------------------------------------------------------------------- rooflines
def measure_rooflines(device: torch.device, dtypes: list[torch.dtype], log=print) -> dict:
    """Measure the device's two ceilings in this run, rather than trusting a spec sheet.

    copy_gbps: a large device-to-device copy, bytes read plus bytes written over the median
    time (GB/s, 1e9). matmul_tflops[dtype]: a large square matrix product in that dtype,
    2·M·N·K over the median time (TFLOP/s, 1e12); random data, never zeros (a product of
    zeros can run faster). On CPU both are measured at small sizes, only to keep the code path
    working.
    """
    cuda = device.type == "cuda"
    result: dict = {"copy_bytes": 0, "copy_gbps": None, "matmul_size": 0, "matmul_tflops": {}}
    n = (1 << 28) if cuda else (1 << 22)  # 512 MiB of bf16 (1 GiB moved per copy) on GPU
    src = torch.randn(n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    dst.copy_(src)
    p50, _, _ = bench(lambda: dst.copy_(src), device, warmup_ms=50 if cuda else 5, rep_ms=200 if cuda else 20)
    result.update(copy_bytes=moved, copy_gbps=moved / (p50 * 1e-3) / 1e9)
    log(f"roofline: device-to-device copy {result['copy_gbps']:.1f} GB/s ({moved / 2**20:.0f} MiB moved per copy)")
    src = dst = None  # 1 GiB back before the matmuls
    size = 8192 if cuda else 256
    result["matmul_size"] = size
    for dtype in dtypes:
        if not cuda and dtype in (torch.float16, torch.bfloat16):
            dtype_run = torch.float32  # CPU half matmul is not what anyone measures a roofline with
        else:
            dtype_run = dtype
        a = torch.randn(size, size, device=device, dtype=dtype_run)
        b = torch.randn(size, size, device=device, dtype=dtype_run)
        a @ b
        p50, _, _ = bench(lambda a=a, b=b: a @ b, device, warmup_ms=50 if cuda else 5, rep_ms=300 if cuda else 20)
        tflops = 2.0 * size ** 3 / (p50 * 1e-3) / 1e12
        result["matmul_tflops"][str(dtype).replace("torch.", "")] = tflops
        log(f"roofline: {size}³ matmul in {str(dtype_run).replace('torch.', '')}: {tflops:.1f} TFLOP/s")
    if cuda:
        torch.cuda.empty_cache()
    return result


# -------------------------------------------------------------------------- environment
def device_name(device: torch.device) -> str:
    """The name torch reports (e.g. 'NVIDIA H100 80GB HBM3'), or 'cpu'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def slug(name: str) -> str:
    """A folder name from a device name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "device"


def _version(module: str) -> Optional[str]:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - a broken optional install is just "absent" here
        return None
    return str(getattr(mod, "__version__", "unknown"))


def environment(device: torch.device) -> dict:
    """Everything the markdown header and a reader of the CSV need to reproduce the run."""
    import timesformer_kernels as tk

    env = {
        "device": device_name(device),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timesformer_kernels": tk.__version__,
        "tk_cuda_extension": cuda_extension_available(),
        "transformers": _version("transformers"),
        "timesformer_pytorch": _version("timesformer_pytorch"),
        "flash_attn": _version("flash_attn"),
        "xformers": _version("xformers"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "command": _command(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
    return env


def _command() -> str:
    """How this run was started, as a user would type it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("benchmarks", "run.py")):
        argv[0] = "python -m benchmarks.run"
    return " ".join(argv)


def cuda_extension_available() -> bool:
    """Whether timesformer_kernels' CUDA extension is built and loadable (its public probe)."""
    try:
        from timesformer_kernels.cuda import available
    except Exception:  # noqa: BLE001 - the module may be absent in a build without CUDA
        return False
    try:
        return bool(available())
    except Exception:  # noqa: BLE001
        return False


def env_json(env: dict) -> str:
    return json.dumps(env, sort_keys=True, default=str)
