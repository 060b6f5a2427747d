"""Run the benchmarks: ``python -m benchmarks.run [options]`` (``--help`` lists them).

On a CUDA device: the device's copy bandwidth and matmul peak, then the microbenchmarks of
both ops for every provider × mode × shape × dtype, then the end-to-end models, written to
benchmarks/results/<device name>/ (``--out`` to change): results.csv (Liger format, one row
per measurement, written as measured), results.md (the README's table) and PNG plots.

``--smoke`` runs a tiny configuration on the CPU in seconds (the torch backend, hf_eager,
sdpa, and Triton under TRITON_INTERPRET=1), so CI keeps the harness working. It never
produces GPU numbers.

``--budget-s`` bounds the whole run: the most important measurements come first (the first
dtype at the first shape, i.e. bf16 TimeSformer-base B=8 by default, then the end-to-end
models, then the other shapes and dtypes), and whatever no longer fits is written as a
'skipped' row with the reason instead of being started.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

_STARTED = time.monotonic()  # the time budget counts from here, imports included


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny CPU configuration for CI (seconds)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    ap.add_argument("--op", "--ops", dest="ops", default="temporal,spatial", help="temporal,spatial")
    ap.add_argument("--shapes", default=None,
                    help="shape families and batches, e.g. 'base,hr,l' (default) or 'base:8,32' or 'tiny'")
    ap.add_argument("--providers", default=None,
                    help="comma list of triton,cuda,torch,hf_eager,sdpa,compiled,flex,flash_attn,xformers or 'all' "
                         "(default: all but torch on GPU; torch,hf_eager,sdpa,triton with --smoke)")
    ap.add_argument("--dtype", "--dtypes", dest="dtypes", default=None, help="bf16,fp16 (default; fp32 with --smoke)")
    ap.add_argument("--modes", default="fwd,bwd,fwd+bwd", help="fwd,bwd,fwd+bwd")
    ap.add_argument("--sections", default="roofline,micro,e2e,diffusion", help="roofline,micro,e2e,diffusion")
    ap.add_argument("--e2e-models", default="hf,lucidrains", help="hf,lucidrains")
    ap.add_argument("--e2e-variants", default=None,
                    help="eager,patched,compiled,compiled_patched (default; eager,patched with --smoke)")
    ap.add_argument("--e2e-modes", default="inference,train", help="inference,train")
    ap.add_argument("--e2e-batch", type=int, default=None, help="clips per step (default 8; 2 with --smoke)")
    ap.add_argument("--e2e-reps", type=int, default=None, help="timed steps per variant (default 10; 2 with --smoke)")
    ap.add_argument("--e2e-warmup", type=int, default=None, help="warm-up steps (default 3; 1 with --smoke)")
    ap.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (default 25; 0 with --smoke)")
    ap.add_argument("--rep-ms", type=float, default=None, help="do_bench repeat budget (default 100; 5 with --smoke)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new work after this many seconds")
    ap.add_argument("--out", default=None,
                    help="output folder (default benchmarks/results/<device name>/; a temporary folder with --smoke)")
    ap.add_argument("--resume", default=None, metavar="CSV",
                    help="an earlier run's results.csv: measure only what it lacks, then merge both into --out")
    ap.add_argument("--no-plots", action="store_true", help="write the CSV and results.md only")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any provider errored (skips are fine)")
    return ap


def _split(spec: str, known: tuple, what: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if s not in known]
    if bad:
        raise SystemExit(f"{what}: unknown {bad} (known: {', '.join(known)})")
    return items


def main(argv=None) -> int:
    args = _parser().parse_args(argv)

    import torch

    if args.device == "auto":
        device_str = "cuda" if (torch.cuda.is_available() and not args.smoke) else "cpu"
    else:
        device_str = args.device
    if device_str.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    if device_str == "cpu" and not args.smoke:
        print("no CUDA device: running the CPU smoke configuration (--smoke); GPU numbers need a GPU")
        args.smoke = True
    if device_str == "cpu":
        # Many threads on a small CPU job mostly measure contention; one is steadier.
        torch.set_num_threads(1)
        # Triton's interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("note: triton was imported before TRITON_INTERPRET=1 could be set; the triton provider will skip")
        else:
            os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device(device_str)

    from . import config, diffusion, e2e, micro, peers, report, timing

    smoke = args.smoke
    try:
        ops = config.parse_ops(args.ops)
        shapes = config.parse_shapes(args.shapes or (config.SMOKE_SHAPES if smoke else config.DEFAULT_SHAPES))
        dtype_names = config.parse_dtypes(args.dtypes or ("fp32" if smoke else "bf16,fp16"))
        modes = config.parse_modes(args.modes)
        providers = peers.parse(args.providers) if args.providers else list(
            peers.DEFAULT_SMOKE if smoke else peers.DEFAULT_GPU)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    sections = _split(args.sections, ("roofline", "micro", "e2e", "diffusion"), "--sections")
    e2e_models = _split(args.e2e_models, e2e.MODELS, "--e2e-models")
    e2e_variants = _split(args.e2e_variants or ("eager,patched" if smoke else ",".join(e2e.VARIANTS)), e2e.VARIANTS,
                          "--e2e-variants")
    e2e_modes = _split(args.e2e_modes, e2e.MODES, "--e2e-modes")
    dtypes = [getattr(torch, d) for d in dtype_names]
    warmup_ms = args.warmup_ms if args.warmup_ms is not None else (0.0 if smoke else 25.0)
    rep_ms = args.rep_ms if args.rep_ms is not None else (5.0 if smoke else 100.0)
    e2e_batch = args.e2e_batch or (2 if smoke else 8)
    e2e_reps = args.e2e_reps or (2 if smoke else 10)
    e2e_warmup = args.e2e_warmup or (1 if smoke else 3)

    import timesformer_kernels as tk

    gpu_name = timing.device_name(device)
    if args.out:
        out_dir = args.out
    elif smoke:
        out_dir = tempfile.mkdtemp(prefix="tk_bench_smoke_")
    else:
        out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", timing.slug(gpu_name))
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, report.CSV_NAME)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = resume_copy = None
    if args.resume:
        resume_rows = report.read_csv(args.resume)
        if resume_rows and resume_rows[0]["gpu_name"] != gpu_name:
            raise SystemExit(f"--resume: {args.resume} was measured on {resume_rows[0]['gpu_name']!r}, "
                             f"this is {gpu_name!r}")
        previous = micro.Previous(resume_rows)
        # A copy, read before this run's CSV is opened: --resume may name the very same file.
        resume_copy = csv_path + ".previous"
        report.merge_csvs([args.resume], resume_copy)
    writer = report.CsvWriter(csv_path, gpu_name, stamp, tk.__version__)
    deadline = micro.Deadline(args.budget_s, start=_STARTED)

    def log(msg: str) -> None:
        print(f"[{deadline.elapsed():6.1f}s] {msg}", flush=True)

    env = timing.environment(device)
    writer.add("environment", "run", "info", "", "", config=env)
    log(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  CUDA {env['cuda']}  "
        f"timesformer_kernels {env['timesformer_kernels']} (CUDA extension: "
        f"{'built' if env['tk_cuda_extension'] else 'not built'})" + ("  [smoke, CPU]" if smoke else ""))
    log(f"writing {csv_path}" + (f"; budget {args.budget_s:.0f} s" if args.budget_s else ""))

    rooflines: dict = {}
    ctx = micro.Context(device, writer, rooflines, deadline, warmup_ms, rep_ms, 1 if smoke else 3, log)
    if previous is not None:
        ctx.previous = previous
        log(f"resuming from {args.resume}: {len(previous.micro)} kernel and {len(previous.e2e)} "
            "end-to-end measurements are kept")
    if "roofline" in sections:
        try:
            rooflines.update(timing.measure_rooflines(device, dtypes, log=lambda m: log(m)))
            writer.add("roofline", "device", "copy_gbps", "bytes", rooflines["copy_bytes"], rooflines["copy_gbps"])
            for dname, tflops in rooflines["matmul_tflops"].items():
                writer.add("roofline", "device", "matmul_tflops", "size", rooflines["matmul_size"], tflops,
                           config={"dtype": dname})
        except Exception as e:  # noqa: BLE001
            writer.add("roofline", "device", "error", "", "", config={"error": micro._short(e)})
            ctx.failures.append(f"roofline: {micro._short(e)}")
            log(f"roofline: ERROR {micro._short(e)}")

    # The plan, most important first: the first dtype at the first shape (all ops), then the
    # end-to-end models, then everything else.
    cases = [(d, s, op) for d in dtypes for s in shapes for op in ops]
    head = [c for c in cases if c[0] == dtypes[0] and c[1] == shapes[0]]
    tail = [c for c in cases if c not in head]
    total = len(cases)

    def run_cases(batch):
        for d, s, op in batch:
            i = cases.index((d, s, op)) + 1
            skip = None
            if device.type == "cpu" and s != shapes[0]:
                # The interpreter simulates every program of a launch in numpy: seconds per call.
                skip = {"triton": "CPU: the Triton interpreter runs on the first shape only"}
            micro.run_case(ctx, op, s, d, providers, modes, label=f"[{i}/{total}] ", skip=skip)

    if "micro" in sections:
        run_cases(head)
    if "e2e" in sections:
        for model_name in e2e_models:
            try:
                e2e.run_model(ctx, model_name, e2e_variants, e2e_modes, e2e_batch, e2e_warmup, e2e_reps, smoke,
                              label="[e2e] ")
            except Exception as e:  # noqa: BLE001 - never lose the rows already written
                ctx.failures.append(f"e2e {model_name}: {micro._short(e)}")
                log(f"[e2e] {model_name}: ERROR {micro._short(e)}")
    if "diffusion" in sections:
        diffusion.run_all(ctx, smoke, label="[diffusion] ")
    if "micro" in sections:
        run_cases(tail)
    writer.close()
    if resume_copy:
        n = report.merge_csvs([resume_copy, csv_path], csv_path)
        os.remove(resume_copy)
        log(f"merged with {args.resume}: {n} rows in {csv_path}")

    md_path = report.write_markdown(csv_path)
    log(f"wrote {md_path}")
    if not args.no_plots:
        from . import plot

        for path in plot.plot_all(csv_path, log=log):
            log(f"wrote {path}")
    print()
    print(_summary(report.read_csv(csv_path)))
    skipped = sum(1 for r in writer.rows if r["metric"] == "skipped")
    log(f"done: {len(writer.rows)} rows, {len(ctx.failures)} errors, {skipped} skipped; results in {out_dir}")
    for f in ctx.failures:
        print(f"  error: {f}")
    return 1 if (args.strict and ctx.failures) else 0


def _summary(rows: list[dict]) -> str:
    """A short table for the end of the console output (the device tool returns the tail):
    fwd+bwd median per provider at each shape of the first dtype, and the e2e steps."""
    from collections import OrderedDict

    lines = []
    micro = [r for r in rows if r["metric"] == "time_ms" and r["kernel_name"].endswith("_attention")]
    if micro:
        dtype = micro[0]["config"].get("dtype")
        mode = "fwd+bwd" if any(r["config"].get("mode") == "fwd+bwd" for r in micro) else micro[0]["config"]["mode"]
        sel = [r for r in micro if r["config"].get("dtype") == dtype and r["config"].get("mode") == mode]
        provs = list(OrderedDict.fromkeys(r["kernel_provider"] for r in sel))
        lines.append(f"summary: {mode} median ms, {dtype}")
        lines.append(f"{'op':9s} {'shape':11s}" + "".join(f"{p:>11s}" for p in provs))
        cases = list(OrderedDict.fromkeys((r["kernel_name"], r["config"].get("shape"), r["config"].get("B"))
                                          for r in sel))
        for kernel, shape, b in cases:
            cells = []
            for p in provs:
                r = next((r for r in sel if r["kernel_provider"] == p and r["kernel_name"] == kernel
                          and r["config"].get("shape") == shape and r["config"].get("B") == b), None)
                cells.append(f"{r['y_value_50']:11.4f}" if r else f"{'-':>11s}")
            lines.append(f"{kernel.split('_')[0]:9s} {f'{shape} B={b}':11s}" + "".join(cells))
    steps = [r for r in rows if r["metric"] == "step_ms"]
    for r in steps:
        lines.append(f"{r['kernel_name']:28s} {r['config'].get('mode'):9s} {r['kernel_provider']:16s} "
                     f"{r['y_value_50']:9.2f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
