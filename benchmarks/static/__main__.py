"""``python -m benchmarks.static [--out DIR] [--quick]``: the static kernel report (see the package
docstring). Writes DIR/kernels-triton-<version>.csv and meta-triton-<version>.json for the Triton
it runs under, then DIR/kernels.md from every version's CSV in DIR. Exit status 2 when Triton's
bundled ptxas or cuobjdump is missing."""
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

COMMAND = ("TRITON_INTERPRET=0 .venv/bin/python -m benchmarks.static --out benchmarks/results/static && "
           "TRITON_INTERPRET=0 .venv-h200/bin/python -m benchmarks.static --out benchmarks/results/static")
DEFAULT_HEAD_DIMS = "32,40,64,80,128,160,192,256"  # kept where backends.TRITON_HEAD_DIMS has them


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/static", help="output folder")
    ap.add_argument("--quick", action="store_true",
                    help="CI subset: bf16, head dim 64 (or --head-dims), per kernel the config with the largest "
                         "tiles, both targets (no HR shape)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2, the CI machine's cores)")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--head-dims", default=None,
                    help=f"default {DEFAULT_HEAD_DIMS} (64 with --quick), kept where the Triton backend supports "
                         "them (backends.TRITON_HEAD_DIMS)")
    ap.add_argument("--targets", default="sm_90,sm_80")
    ap.add_argument("--markdown-only", action="store_true",
                    help="only rewrite DIR/kernels.md from the CSVs already in DIR (no compiling)")
    return ap


def _version(path: str) -> str:
    from .sass import run_tool

    m = re.search(r"V(\d+\.\d+\.\d+)", run_tool(path, "--version"))
    return m.group(1) if m else "?"


def _worker(job, tools, quick):
    from . import sweep
    return sweep.run_job(job, tools, largest_only=quick)


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
        csrc = report.csrc_resources(tools["cuobjdump"], libs[0])
        note = (f"`cuobjdump --dump-resource-usage {os.path.basename(libs[0])}` (cuobjdump {_version(tools['cuobjdump'])}). "
                "Static shared memory only: the kernels' dynamic shared memory is set at launch, not in the binary.")
    else:
        csrc, note = None, "Skipped: timesformer_kernels/_C*.so is not built here (scripts/bootstrap.sh builds it)."
    with open(os.path.join(out, "kernels.md.tmp"), "w") as f:
        f.write(report.markdown(out, COMMAND, csrc, note))
    os.replace(os.path.join(out, "kernels.md.tmp"), os.path.join(out, "kernels.md"))


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

    spec = args.head_dims or (str(report.MODEL_HEAD_DIM) if args.quick else DEFAULT_HEAD_DIMS)
    head_dims = [int(d) for d in spec.split(",") if int(d) in TRITON_HEAD_DIMS]
    if not head_dims:
        raise SystemExit(f"--head-dims: none of {spec} is supported (backends.TRITON_HEAD_DIMS)")
    dtypes = args.dtypes.split(",")
    targets = args.targets.split(",")
    for name, values, known in (("--dtypes", dtypes, aot.DTYPES), ("--targets", targets, aot.TARGETS)):
        if unknown := [v for v in values if v not in known]:
            raise SystemExit(f"{name}: unknown {unknown} (known: {', '.join(known)})")
    if args.quick:
        # + HR on sm_90: its 785-row groups take the dQ + dK/dV pair where base takes the whole-group backward
        jobs = [sweep.Job("base", report.MODEL_DTYPE, h, t) for h in head_dims for t in targets]
        jobs += [sweep.Job("hr", report.MODEL_DTYPE, report.MODEL_HEAD_DIM, report.MODEL_TARGET)]
    else:
        # Most telling first, so that a run cut short (it writes after every job) has it: the issue
        # model's launches (bf16, Dh 64, sm_90, both shapes), then Dh 64 and the largest head dim
        # (where tiles spill first) in every dtype, then the other head dims.
        first = [sweep.Job(shape, report.MODEL_DTYPE, report.MODEL_HEAD_DIM, report.MODEL_TARGET)
                 for shape in sweep.SHAPES]
        rest = sorted((sweep.Job("base", d, h, t) for d in dtypes for h in head_dims for t in targets),
                      key=lambda j: (j.head_dim not in (report.MODEL_HEAD_DIM, max(head_dims)), dtypes.index(j.dtype),
                                     j.head_dim, targets.index(j.target)))
        jobs = first + [j for j in rest if j not in first]
    os.makedirs(args.out, exist_ok=True)
    start = time.monotonic()
    rows = []
    meta = dict(triton=triton.__version__, torch=torch.__version__, ptxas=_version(tools["ptxas"]),
                cuobjdump=_version(tools["cuobjdump"]), jobs=args.jobs)
    dims = ",".join(map(str, head_dims))
    scope = (f"quick subset: bf16, Dh {dims}, largest tiles, + hr Dh64 sm_90" if args.quick
             else f"{','.join(dtypes)} x Dh {dims} x {','.join(targets)}, + hr bf16 Dh64 sm_90")
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_worker, job, tools, args.quick) for job in jobs]
        for done, (job, fut) in enumerate(zip(jobs, futures), 1):
            rows.extend(fut.result())
            seconds = time.monotonic() - start
            print(f"[{seconds:6.0f} s] {job.shape} {job.dtype} Dh{job.head_dim} {job.target}",
                  file=sys.stderr, flush=True)
            # Written after every job: a run cut short still leaves a consistent report of what it did.
            meta.update(compiles=len(rows), seconds=round(seconds, 1),
                        scope=scope if done == len(jobs) else f"{scope}: cut short after {done} of {len(jobs)} jobs")
            _write(args.out, rows, meta, tools)
    bad = [r for r in rows if not report.ok(r)]
    print(f"{len(rows)} compiles in {seconds:.0f} s; {len(bad)} failed, spilled or did not fit; "
          f"wrote {args.out}/kernels.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
