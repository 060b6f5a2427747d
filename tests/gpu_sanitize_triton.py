"""Small runs of every Triton kernel of timesformer_kernels, forward and backward, for
compute-sanitizer (a script, not a pytest file; needs a CUDA GPU)::

    compute-sanitizer --tool memcheck  python tests/gpu_sanitize_triton.py
    compute-sanitizer --tool racecheck python tests/gpu_sanitize_triton.py
    compute-sanitizer --tool initcheck python tests/gpu_sanitize_triton.py
    compute-sanitizer --tool synccheck python tests/gpu_sanitize_triton.py

Kernels: ``_temporal_fwd_kernel``, ``_temporal_bwd_kernel`` (triton/temporal.py) and
``_spatial_fwd_kernel``, ``_spatial_bwd_dq_kernel``, ``_spatial_bwd_dkdv_kernel``,
``_spatial_bwd_group_kernel`` (Hopper only; triton/spatial.py). Cases: both ops, both token
orders, temporal with and without the cls key, temporal with T > 128 (the flash kernel with
the cls key and no cls query, whose backward takes no dcls_out), fp16, bf16 and fp32, ragged
tiles (T and N not powers of two, head_dim 24/40 masked to the next power of two, one-token
groups), head_dim 128, qkv read in place through a strided slice with a storage offset and
through a batch-inner layout, and upstream gradients that are random, broadcast
(``out.sum()``), or only reach one output.

Autotuning is replaced by a forced choice, so that every config of every kernel is compiled
and sanitized (pass i launches config i of each kernel, cycling; the autotuner's own pruning
still applies) and nothing is benchmarked under the sanitizer: ``--configs first`` runs only
the first config (quick), ``--configs auto`` lets the autotuner choose (slow under a sanitizer).

The caching allocator is switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1), so every tensor is
its own allocation and memcheck sees accesses past a tensor's end. References are computed on
the CPU, so the only GPU kernels are the package's and a few of torch's elementwise/copy
kernels. To check only the package's kernels, add e.g. ``--kernel-name kns=_spatial_``
(compute-sanitizer's kernel-name filter). Exits non-zero if an output or gradient is not
finite or is off the float64 reference; prints a summary of the launches and configs.

``--device cpu`` runs the same cases under the Triton interpreter (no sanitizer; fp16 and
fp32 only, one config): a check of this script itself.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")


def _parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", choices=["all", "first", "auto"], default="all")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32", help="comma-separated torch dtypes")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    return ap.parse_args()


ARGS = _parse()
if ARGS.device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timesformer_kernels as tk  # noqa: E402
from reference import ref_spatial_attention, ref_temporal_attention  # noqa: E402
from timesformer_kernels.triton import spatial as triton_spatial  # noqa: E402
from timesformer_kernels.triton import temporal as triton_temporal  # noqa: E402

DEVICE = ARGS.device

# ----------------------------------------------------------------- forced autotune choice
_FORCE: dict = {"index": None}
_LAUNCHES: collections.Counter = collections.Counter()
_CONFIGS_SEEN: dict = collections.defaultdict(set)
_original_run = Autotuner.run


def _forced_run(self, *args, **kwargs):
    """Autotuner.run without benchmarking: config _FORCE["index"] (mod the number left after
    the autotuner's own pruning) of this kernel."""
    name = self.base_fn.__name__
    _LAUNCHES[name] += 1
    if _FORCE["index"] is None:
        ret = _original_run(self, *args, **kwargs)
        _CONFIGS_SEEN[name].add(str(self.best_config))
        return ret
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = self.prune_configs(kwargs)
        config = configs[_FORCE["index"] % len(configs)]
        _CONFIGS_SEEN[name].add(str(config))
        if config.pre_hook is not None:
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())
    finally:
        self.nargs = None


Autotuner.run = _forced_run


def _autotuned_kernels():
    found = {}
    for mod in (triton_temporal, triton_spatial):
        for name, value in vars(mod).items():
            if isinstance(value, Autotuner):
                found[name] = value
    return found


def _count_plain_launches():
    """Kernels that are not autotuned (the temporal ones under the interpreter) are counted by
    wrapping their module-level launches."""
    for mod in (triton_temporal, triton_spatial):
        for name, value in list(vars(mod).items()):
            if name.endswith("_kernel") and not isinstance(value, Autotuner) and hasattr(value, "__getitem__"):
                class Counted:
                    def __init__(self, fn, kname):
                        self.fn, self.kname = fn, kname

                    def __getitem__(self, grid):
                        launch = self.fn[grid]

                        def run(*a, **k):
                            _LAUNCHES[self.kname] += 1
                            _CONFIGS_SEEN[self.kname].add("interpreter config")
                            return launch(*a, **k)
                        return run
                setattr(mod, name, Counted(value, name))


# ----------------------------------------------------------------------------- cases
TEMPORAL = [  # (B, T, N, H, Dh)
    (2, 3, 5, 3, 40),   # T_PAD 4 with a masked row per group, Dh masked to 64, H not a multiple of HEADS
    (1, 8, 7, 2, 64),   # TimeSformer's T = 8
    (2, 16, 3, 1, 16),  # one group per 16 rows, smallest head_dim
    (1, 1, 9, 2, 128),  # one-token groups, largest head_dim
]
LONG_TEMPORAL = [(1, 130, 2, 1, 32)]  # T > 128: the flash kernel
SPATIAL = [  # (B, T, N, H, Dh)
    (2, 3, 5, 2, 24),    # 6 rows per group: one partial tile
    (1, 2, 70, 2, 64),   # 71 rows: 2 tiles of 64, partial last tile
    (1, 1, 1, 1, 8),     # [cls, one patch]
    (1, 2, 140, 1, 128), # several tiles of every config, head_dim 128
]
LAYOUTS = ["contiguous", "wide", "batch_inner"]
TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_qkv(b, length, channels, dtype, layout, seed):
    """Cast first, then view: ``to()`` would make a non-dense view contiguous."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return torch.randn(b, length, channels, generator=g).to(DEVICE, dtype)
    if layout == "wide":  # a slice of a wider buffer, storage offset 2 rows + 8 channels
        buf = torch.randn(b, length + 3, channels + 24, generator=g).to(DEVICE, dtype)
        return buf[:, 2:2 + length, 8:8 + channels]
    buf = torch.randn(length, b, channels, generator=g).to(DEVICE, dtype)  # (L, B, C) memory
    return buf.transpose(0, 1)


def _upstream(outs, how, seed):
    """(indices of the outputs that get a gradient, their gradients)."""
    g = torch.Generator().manual_seed(seed)
    rand = [torch.randn(o.shape, generator=g).to(DEVICE, o.dtype) for o in outs]
    if how == "random":
        return list(range(len(outs))), rand
    if how == "sum":  # broadcast (stride 0) gradients, as out.sum() produces
        return list(range(len(outs))), [torch.ones((), device=DEVICE, dtype=o.dtype).expand(o.shape) for o in outs]
    if how == "out_only":  # cls_out unused: its gradient reaches the op as None
        return [0], rand[:1]
    if how == "cls_only":  # out unused
        return [1], rand[1:]
    raise ValueError(how)


FAILURES: list = []


def check(label, got, want, dtype):
    got = got.detach().double().cpu()
    if not torch.isfinite(got).all():
        FAILURES.append(f"{label}: {int((~torch.isfinite(got)).sum())} non-finite values")
        return
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    if err > TOL[dtype]:
        FAILURES.append(f"{label}: error {err:.2e} of the reference's max > {TOL[dtype]:.0e}")


def run_case(op, shape, dtype, order, with_cls, layout, grads, seed):
    b, t, n, h, dh = shape
    length = (1 if with_cls else 0) + n * t
    qkv = make_qkv(b, length, 3 * h * dh, dtype, layout, seed)
    leaf = qkv.detach().requires_grad_(True)  # keeps qkv's strides and storage offset
    assert leaf.stride() == qkv.stride() and (layout != "wide" or not leaf.is_contiguous())
    if op == "spatial":
        outs = tk.spatial_attention(leaf, t, h, token_order=order, backend="triton")
        ref_fn = lambda x: ref_spatial_attention(x, t, h, token_order=order)  # noqa: E731
    else:
        outs = (tk.temporal_attention(leaf, t, h, token_order=order, with_cls=with_cls, backend="triton"),)
        ref_fn = lambda x: (ref_temporal_attention(x, t, h, token_order=order, with_cls=with_cls),)  # noqa: E731
    used, upstream = _upstream(outs, grads, seed + 1)
    (dq,) = torch.autograd.grad([outs[i] for i in used], leaf, upstream)
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # a fault is reported against this case
    x64 = qkv.detach().double().cpu().requires_grad_(True)
    refs = ref_fn(x64)
    (dref,) = torch.autograd.grad([refs[i] for i in used], x64, [u.double().cpu() for u in upstream])
    label = f"{op} B,T,N,H,Dh={shape} {str(dtype)[6:]} {order} cls={with_cls} {layout} grads={grads}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        check(f"{label} output {i}", o, r, dtype)
    check(f"{label} dqkv", dq, dref, dtype)


def cases(dtypes):
    i = 0
    for dtype in dtypes:
        for order in ("space_major", "time_major"):
            for with_cls in (False, True):
                for shape in TEMPORAL:
                    yield ("temporal", shape, dtype, order, with_cls, LAYOUTS[i % 3], ("random", "sum")[i % 2], i)
                    i += 1
                for shape in LONG_TEMPORAL:
                    yield ("temporal", shape, dtype, order, with_cls, LAYOUTS[i % 3], "random", i)
                    i += 1
            for shape in SPATIAL:
                for grads in ("random", "sum", "out_only", "cls_only"):
                    yield ("spatial", shape, dtype, order, True, LAYOUTS[i % 3], grads, i)
                    i += 1


def main():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_sanitize_triton.py needs a CUDA device (or --device cpu for the interpreter)")
    dtypes = [getattr(torch, d) for d in ARGS.dtypes.split(",")]
    if DEVICE == "cpu":
        dtypes = [d for d in dtypes if d != torch.bfloat16]  # bf16 tl.dot is broken in the interpreter
        _count_plain_launches()
    tuned = _autotuned_kernels()
    if ARGS.configs == "auto" or DEVICE == "cpu":
        passes = [None]
    elif ARGS.configs == "first":
        passes = [0]
    else:
        passes = list(range(max(len(k.configs) for k in tuned.values())))
    print(f"device {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu (interpreter)'}, "
          f"torch {torch.__version__}, dtypes {[str(d)[6:] for d in dtypes]}, "
          f"{len(passes)} config pass(es); autotuned kernels: "
          + ", ".join(f"{n} ({len(k.configs)} configs)" for n, k in tuned.items()), flush=True)
    n_cases = 0
    for index in passes:
        _FORCE["index"] = index
        start = time.time()
        for case in cases(dtypes):
            run_case(*case)
            n_cases += 1
        print(f"pass {index}: {time.time() - start:.1f}s", flush=True)
    print(f"\n{n_cases} cases, kernel launches:")
    for name in sorted(_LAUNCHES):
        print(f"  {name}: {_LAUNCHES[name]} launches, {len(_CONFIGS_SEEN[name])} distinct configs")
    expected = {"_temporal_fwd_kernel", "_temporal_bwd_kernel", "_spatial_fwd_kernel", "_spatial_bwd_dq_kernel",
                "_spatial_bwd_dkdv_kernel"}
    from timesformer_kernels.devices import of
    from timesformer_kernels.triton import pools
    if DEVICE == "cpu" or any(e.claim(of(torch.device("cuda"))) is not None for p in pools.SPATIAL_GROUP.values() for e in p):
        expected.add("_spatial_bwd_group_kernel")  # see triton.spatial.whole_group
    missing = expected - set(_LAUNCHES)
    if missing:
        FAILURES.append(f"kernels never launched: {sorted(missing)}")
    if FAILURES:
        print(f"\n{len(FAILURES)} FAILURES:")
        for f in FAILURES:
            print("  " + f)
        sys.exit(1)
    print("\nall outputs and gradients finite and within tolerance of the float64 reference")


if __name__ == "__main__":
    main()
