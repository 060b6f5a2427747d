"""``python -m benchmarks.static [--out DIR] [--quick | --all-configs] [--update]``: the static kernel
report (see the package docstring). Writes DIR/kernels-triton-<version>.csv and
meta-triton-<version>.json for the Triton it runs under, then DIR/kernels.md and DIR/by-case.md
from every version's CSV in DIR. Exit status 2 when Triton's bundled ptxas or cuobjdump is missing."""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import multiprocessing
import os
import re
import sys
import time

COMMAND = "make static-report  # per venv: TRITON_INTERPRET=0 python -m benchmarks.static --out DIR"
DEFAULT_HEAD_DIMS = "64,128,40,80,160,256"  # swept in this order; kept where backends.TRITON_HEAD_DIMS has them
# --quick, the CI subset: the fast path's targets and dtypes at a head dim of each tile width
# class but the widest, the largest config each kernel keeps.
QUICK = dict(dtypes="bf16,fp32", head_dims="64,128", targets="sm_90,sm_80", cases="base,hr")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/static", help="output folder")
    ap.add_argument("--quick", action="store_true",
                    help="CI subset: per kernel the config with the largest tiles, defaults " +
                         ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2, the CI machine's cores)")
    ap.add_argument("--dtypes", default=None,
                    help="default bf16,fp16,fp32,tf32 (fp32 at torch's float32 matmul precision 'highest', tf32 at "
                         "'high')")
    ap.add_argument("--head-dims", default=None,
                    help=f"default {DEFAULT_HEAD_DIMS}, kept where the Triton backend supports them "
                         "(backends.TRITON_HEAD_DIMS)")
    ap.add_argument("--targets", default=None, help="default every row of the device table (devices.TARGETS)")
    ap.add_argument("--cases", default=None, help="default every model shape (aot.CASES)")
    ap.add_argument("--all-configs", action="store_true",
                    help="compile every config of each kernel's pool for every target, kept or not: the evidence "
                         "the pools (timesformer_kernels/triton/pools.py) are made from")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows already in DIR for the (dtype, head dim, target) jobs not run now")
    ap.add_argument("--markdown-only", action="store_true",
                    help="only rewrite DIR/kernels.md from the CSVs already in DIR (no compiling)")
    return ap


def _version(path: str) -> str:
    from .sass import run_tool

    m = re.search(r"V(\d+\.\d+\.\d+)", run_tool(path, "--version"))
    return m.group(1) if m else "?"


def _worker(job, tools, quick, every):
    from . import sweep
    return sweep.run_job(job, tools, largest_only=quick, every=every)


def _write(out: str, rows: list[dict], meta: dict, tools: dict) -> None:
    """This version's CSV and meta, then kernels.md from every version's CSV in ``out``."""
    from . import report

    report.write_csv(os.path.join(out, report.csv_name(meta["triton"])), rows)
    with open(os.path.join(out, f"meta-triton-{meta['triton']}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    _write_markdown(out, tools)


def _write_markdown(out: str, tools: dict) -> None:
    """kernels.md from every version's CSV in ``out``, with the built CUDA extension's resources."""
    from . import report

    import timesformer_kernels
    libs = glob.glob(os.path.join(os.path.dirname(timesformer_kernels.__file__), "_C*.so"))
    if libs:
        ext = report.csrc_part(tools["cuobjdump"], libs[0])
        note = (f"From `{os.path.basename(libs[0])}`, read with cuobjdump {_version(tools['cuobjdump'])}; built by "
                "scripts/bootstrap.sh with setup.py's flags for sm_80 and sm_90a.")
    else:
        ext, note = None, "Skipped: timesformer_kernels/_C*.so is not built here (scripts/bootstrap.sh builds it)."
    for name, text in (("kernels.md", report.markdown(out, COMMAND, ext, note)),
                       ("by-case.md", report.by_case(report.read_rows(out)))):
        tmp = os.path.join(out, f"{name}.{os.getpid()}.tmp")  # both Triton versions may write at once
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    from . import aot, report, sweep

    tools = {name: aot.tool(name) for name in ("cuobjdump", "ptxas")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        print(f"static report skipped: Triton's bundled {', '.join(missing)} not found", file=sys.stderr)
        return 2
    if args.markdown_only:
        _write_markdown(args.out, tools)
        return 0
    aot.check_not_interpreting()
    import torch
    import triton

    from timesformer_kernels.backends import TRITON_HEAD_DIMS

    quick = QUICK if args.quick else {}
    spec = args.head_dims or quick.get("head_dims", DEFAULT_HEAD_DIMS)
    head_dims = [int(d) for d in spec.split(",") if int(d) in TRITON_HEAD_DIMS]
    if not head_dims:
        raise SystemExit(f"--head-dims: none of {spec} is supported (backends.TRITON_HEAD_DIMS)")
    dtypes = (args.dtypes or quick.get("dtypes", "bf16,fp16,fp32,tf32")).split(",")
    targets = (args.targets or quick.get("targets", ",".join(aot.TARGETS))).split(",")
    cases = tuple((args.cases or quick.get("cases", ",".join(aot.CASES))).split(","))
    for name, values, known in (("--dtypes", dtypes, aot.DTYPES), ("--targets", targets, aot.TARGETS),
                                ("--cases", cases, aot.CASES)):
        if unknown := [v for v in values if v not in known]:
            raise SystemExit(f"{name}: unknown {unknown} (known: {', '.join(known)})")
    # Most telling first and breadth first, so that a run cut short (it writes after every job)
    # has it: the issue model's job (bf16, Dh 64, sm_90), then per head dim (in the order given)
    # and dtype every target: the fast path (sm_90, sm_80), the other NVIDIA targets, AMD last.
    order = [report.MODEL_TARGET, "sm_80", *[t for t in aot.TARGETS if t not in (report.MODEL_TARGET, "sm_80")]]
    jobs = sorted((sweep.Job(d, h, t, cases) for d in dtypes for h in head_dims for t in targets),
                  key=lambda j: ((j.dtype, j.head_dim, j.target) != (report.MODEL_DTYPE, report.MODEL_HEAD_DIM,
                                                                     report.MODEL_TARGET),
                                 head_dims.index(j.head_dim), dtypes.index(j.dtype),
                                 order.index(j.target) if j.target in order else len(order)))
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    rows = []
    earlier, scope_before = 0.0, ""  # of the run whose rows --update keeps
    if args.update:  # keep this version's rows of the jobs not run now
        rerun = {(j.dtype, str(j.head_dim), j.target) for j in jobs}
        rows = [r for r in report.read_rows(args.out) if r["triton"] == triton.__version__
                and (r["dtype"], r["head_dim"], r["target"]) not in rerun]
        meta_path = os.path.join(args.out, f"meta-triton-{triton.__version__}.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            earlier = old.get("seconds", 0.0)
            scope_before = old.get("scope", "")
    meta = dict(triton=triton.__version__, torch=torch.__version__, ptxas=_version(tools["ptxas"]),
                cuobjdump=_version(tools["cuobjdump"]), jobs=args.jobs)
    scope = (f"{scope_before}; rerun: " if args.update and scope_before else "") + (
             f"{'every pool config: ' if args.all_configs else ''}"
             f"{'quick subset, largest config per kernel: ' if args.quick else ''}{','.join(dtypes)} x Dh "
             f"{','.join(map(str, head_dims))} x {','.join(targets)} x cases {','.join(cases)}")
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_worker, job, tools, args.quick, args.all_configs) for job in jobs]
        for done, (job, fut) in enumerate(zip(jobs, futures), 1):
            rows.extend(fut.result())
            seconds = earlier + time.monotonic() - start
            print(f"[{seconds:6.0f} s] {job.dtype} Dh{job.head_dim} {job.target}", file=sys.stderr, flush=True)
            # Written after every job: a run cut short still leaves a consistent report of what it did.
            meta.update(compiles=len({(r["target"], r["binary"]) for r in rows if r.get("binary")}),
                        rows=len(rows), seconds=round(seconds, 1),
                        scope=scope if done == len(jobs) else f"{scope}: cut short after {done} of {len(jobs)} jobs")
            _write(args.out, rows, meta, tools)
    bad = [r for r in rows if not report.ok(r)]
    print(f"{meta['compiles']} compiles for {len(rows)} rows in {seconds:.0f} s; {len(bad)} rows failed, spilled or "
          f"did not fit; wrote {args.out}/kernels.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
