"""CSV rows in the Liger-Kernel format, and the markdown table built from them.

One CSV format for every measurement, so one plotting script and one table builder serve
all of them::

    kernel_name, kernel_provider, metric, x_name, x_value, y_value_50, y_value_20, y_value_80,
    extra_benchmark_config, gpu_name, timestamp, timesformer_kernels_version

``extra_benchmark_config`` is JSON: the shape (shape, B, T, N, D, H, Dh), dtype, mode and,
for error/skipped rows, the message. Row kinds (kernel_name / metric):

    temporal_attention, spatial_attention   time_ms (median, p20, p80), tflops, gbps,
        pct_mem_roofline, pct_compute_roofline, peak_mem_mb, rel_err, speedup_vs_<peer>
        (kernel_provider is ours), error, skipped
    e2e_hf_timesformer, e2e_lucidrains_timesformer   step_ms, clips_per_s, peak_mem_mb,
        peak_mem_delta_mb, rel_err, speedup_vs_<variant>, error, skipped
    roofline   copy_gbps, matmul_tflops (measured in the same run)
    environment   info (versions and device, in extra_benchmark_config)

Derived metrics keep the percentiles meaningful: a throughput's y_value_20 comes from the
80th-percentile time (the slow end) and its y_value_80 from the 20th. speedup_vs_<peer> is
peer median / ours median; its y_value_20 is peer p20 / ours p80 and y_value_80 is
peer p80 / ours p20 (the pessimistic and optimistic ends).

``python -m benchmarks.report results.csv`` rebuilds results.md (and the plots) from a CSV.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import OrderedDict
from typing import Iterable, Optional

COLUMNS = ["kernel_name", "kernel_provider", "metric", "x_name", "x_value", "y_value_50", "y_value_20",
           "y_value_80", "extra_benchmark_config", "gpu_name", "timestamp", "timesformer_kernels_version"]
CSV_NAME = "results.csv"
MD_NAME = "results.md"

PROVIDER_ORDER = ("triton", "cuda", "torch", "hf_eager", "sdpa", "compiled", "flex", "flash_attn", "xformers")
OURS = ("triton", "cuda")
E2E_VARIANTS = ("eager", "patched", "compiled", "compiled_patched")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        return f"{value:.6g}"
    return str(value)


class CsvWriter:
    """Appends rows to ``path`` as they are measured (flushed each row, so a run stopped by
    its time limit still leaves every finished row behind)."""

    def __init__(self, path: str, gpu_name: str, timestamp: str, version: str):
        self.path, self.gpu_name, self.timestamp, self.version = path, gpu_name, timestamp, version
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._file = open(path, "w", newline="")
        self._csv = csv.writer(self._file)
        self._csv.writerow(COLUMNS)
        self._file.flush()
        self.rows: list[dict] = []

    def add(self, kernel_name: str, provider: str, metric: str, x_name: str, x_value, y50=None, y20=None,
            y80=None, config: Optional[dict] = None) -> dict:
        row = {
            "kernel_name": kernel_name, "kernel_provider": provider, "metric": metric, "x_name": x_name,
            "x_value": x_value, "y_value_50": y50, "y_value_20": y20, "y_value_80": y80,
            "extra_benchmark_config": json.dumps(config or {}, sort_keys=True, default=str),
            "gpu_name": self.gpu_name, "timestamp": self.timestamp, "timesformer_kernels_version": self.version,
        }
        self._csv.writerow([_fmt(row[c]) for c in COLUMNS])
        self._file.flush()
        self.rows.append(row)
        return row

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------- reading
def _num(text: str) -> Optional[float]:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def read_csv(path: str) -> list[dict]:
    """Rows with y values as floats (None when empty) and ``config`` parsed from the JSON."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a benchmark CSV, missing columns {missing}")
        for raw in reader:
            row = dict(raw)
            for key in ("y_value_50", "y_value_20", "y_value_80"):
                row[key] = _num(row[key])
            row["config"] = json.loads(row["extra_benchmark_config"] or "{}")
            rows.append(row)
    return rows


def _case_key(row: dict) -> tuple:
    c = row["config"]
    return (c.get("shape"), int(c.get("B", row.get("x_value") or 0)), c.get("mode"))


def _metric(rows: Iterable[dict], kernel: str, provider: str, metric: str, dtype: str, key: tuple) -> Optional[dict]:
    for r in rows:
        if (r["kernel_name"] == kernel and r["kernel_provider"] == provider and r["metric"] == metric
                and r["config"].get("dtype") == dtype and _case_key(r) == key):
            return r
    return None


def _us(ms: Optional[float]) -> str:
    if ms is None:
        return "–"
    us = ms * 1e3
    return f"{us:.1f}" if us < 1000 else f"{us:,.0f}"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.0f}%"


def _mib(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.0f}"


def _x(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


# ------------------------------------------------------------------------ markdown
def markdown(rows: list[dict]) -> str:
    """The results table for the README: environment, rooflines, per-op tables, end-to-end,
    targets, failures; built from the CSV rows alone."""
    out: list[str] = []
    env = next((r["config"] for r in rows if r["kernel_name"] == "environment"), {})
    device = env.get("device") or (rows[0]["gpu_name"] if rows else "unknown device")
    stamp = rows[0]["timestamp"] if rows else ""
    out.append(f"# timesformer_kernels benchmarks on {device}\n")
    out.append(f"Measured {stamp} by `{env.get('command', 'python -m benchmarks.run')}`.\n")
    out.append("| device | torch | triton | CUDA | cuDNN | timesformer_kernels | CUDA extension | python |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    def e(key: str) -> str:
        return "–" if env.get(key) in (None, "") else str(env[key])

    cap = f" (sm {e('capability')}, {e('sms')} SMs, {e('memory_gib')} GiB)" if env.get("capability") else ""
    out.append(f"| {device}{cap} | {e('torch')} | {e('triton')} | {e('cuda')} | {e('cudnn')} "
               f"| {e('timesformer_kernels')} | {'built' if env.get('tk_cuda_extension') else 'not built'} "
               f"| {e('python')} |")
    if env.get("TRITON_INTERPRET") == "1":
        out.append("\nTriton ran under its CPU interpreter (TRITON_INTERPRET=1): these times are not kernel speed.")
    out.append("")

    roof = [r for r in rows if r["kernel_name"] == "roofline"]
    if roof:
        out.append("## Measured ceilings (this run)\n")
        for r in roof:
            if r["metric"] == "copy_gbps":
                out.append(f"- device-to-device copy: **{r['y_value_50']:.0f} GB/s** (bytes read + written; "
                           f"{float(r['x_value']) / 2**20:.0f} MiB moved per copy): the memory roofline")
            elif r["metric"] == "matmul_tflops":
                out.append(f"- {r['x_value']}³ matmul, {r['config'].get('dtype')}: **{r['y_value_50']:.1f} TFLOP/s**: "
                           "the compute roofline")
        out.append("")

    micro = [r for r in rows if r["kernel_name"] in ("temporal_attention", "spatial_attention")]
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in micro:
        groups.setdefault((r["kernel_name"], r["config"].get("dtype")), []).append(r)
    if groups:
        out.append("## Kernels\n")
        timer = ("`triton.testing.do_bench`, L2 cleared between repeats" if device != "cpu"
                 else "a perf_counter loop on the CPU: harness check only, not kernel speed")
        out.append(f"Median time in µs ({timer}). "
                   "Speed-up = best peer's median / ours. % mem / % mm = the fewest bytes / measured copy "
                   "bandwidth, and FLOPs / measured matmul peak, over the measured time. Peak memory: "
                   "allocated during one call above its inputs. FLOPs and bytes: `benchmarks/config.py`.\n")
    for (kernel, dtype), grows in groups.items():
        out.extend(_micro_table(kernel, dtype, grows))

    e2e = [r for r in rows if r["kernel_name"].startswith("e2e_")]
    if e2e:
        out.append("## End to end\n")
        out.append("One inference forward and one training step (forward, backward, AdamW step), "
                   "bf16 autocast, random init. Median step time (p20–p80), clips/s from the median. "
                   "Peak MiB: most allocated during the steps; Δ: above what was allocated before the "
                   "step (parameters, gradients, optimizer state).\n")
        models: "OrderedDict[str, list]" = OrderedDict()
        for r in e2e:
            models.setdefault(r["kernel_name"], []).append(r)
        for model, mrows in models.items():
            out.extend(_e2e_table(model, mrows))

    diffusion = [r for r in rows if r["kernel_name"].startswith("diffusion_")]
    if diffusion:
        out.extend(_diffusion_table(diffusion))

    targets = _targets(rows)
    if targets:
        out.append("## Targets (bf16, TimeSformer-base B=8)\n")
        out.append("| target | measured | met |")
        out.append("| --- | --- | --- |")
        out.extend(targets)
        out.append("")

    problems: "OrderedDict[tuple, OrderedDict]" = OrderedDict()
    for r in rows:
        if r["metric"] not in ("error", "skipped"):
            continue
        c = r["config"]
        msg = c.get("error") or c.get("reason", "")
        where = " ".join(str(c[k]) if k != "B" else f"B={c[k]}" for k in ("shape", "B", "dtype") if k in c)
        cases = problems.setdefault((r["kernel_name"], r["kernel_provider"], r["metric"], msg), OrderedDict())
        cases.setdefault(where, [])
        if c.get("mode") and c["mode"] not in cases[where]:
            cases[where].append(c["mode"])
    if problems:
        out.append("## Not measured\n")
        for (kernel, provider, metric, msg), cases in problems.items():
            where = "; ".join(f"{w} {', '.join(m)}".strip() for w, m in cases.items())
            out.append(f"- {kernel} / {provider}: {metric}: {msg}" + (f" ({where})" if where else ""))
        out.append("")
    return "\n".join(out) + "\n"


def _micro_table(kernel: str, dtype: str, rows: list[dict]) -> list[str]:
    times = [r for r in rows if r["metric"] == "time_ms"]
    present = [p for p in PROVIDER_ORDER if any(r["kernel_provider"] == p for r in rows)]
    ours = [p for p in OURS if any(r["kernel_provider"] == p for r in times)]
    peers = [p for p in present if p not in OURS]
    keys = list(OrderedDict.fromkeys(_case_key(r) for r in rows if r["metric"] in ("time_ms", "error")))
    head = ["shape", "B", "mode"] + [f"{p}" for p in present] + ["best peer"]
    for p in ours:
        head += [f"{p} speed-up", f"{p} GB/s", f"{p} TFLOP/s", f"{p} % mem", f"{p} % mm"]
    head += ["peak MiB (ours / best peer)"]
    lines = [f"### {kernel}, {dtype}\n", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key in keys:
        cells = [str(key[0]), str(key[1]), str(key[2])]
        best_name, best = None, None
        for p in present:
            t = _metric(rows, kernel, p, "time_ms", dtype, key)
            if t is not None:
                cells.append(_us(t["y_value_50"]))
                if p in peers and (best is None or t["y_value_50"] < best):
                    best_name, best = p, t["y_value_50"]
            elif _metric(rows, kernel, p, "error", dtype, key) is not None:
                cells.append("error")
            else:
                cells.append("–")
        cells.append(f"{best_name} {_us(best)}" if best_name else "–")
        peak_ours = None
        for p in ours:
            t = _metric(rows, kernel, p, "time_ms", dtype, key)
            speed = best / t["y_value_50"] if (t and best) else None
            vals = {m: _metric(rows, kernel, p, m, dtype, key) for m in ("gbps", "tflops", "pct_mem_roofline",
                                                                            "pct_compute_roofline", "peak_mem_mb")}
            get = {m: (v["y_value_50"] if v else None) for m, v in vals.items()}
            cells += [_x(speed), "–" if get["gbps"] is None else f"{get['gbps']:.0f}",
                      "–" if get["tflops"] is None else f"{get['tflops']:.1f}",
                      _pct(get["pct_mem_roofline"]), _pct(get["pct_compute_roofline"])]
            if peak_ours is None and get["peak_mem_mb"] is not None:
                peak_ours = get["peak_mem_mb"]
        peer_row = _metric(rows, kernel, best_name, "peak_mem_mb", dtype, key) if best_name else None
        peak_peer = peer_row["y_value_50"] if peer_row else None
        cells.append(f"{_mib(peak_ours)} / {_mib(peak_peer)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _diffusion_table(rows: list[dict]) -> list[str]:
    """Video diffusion (``benchmarks/diffusion.py``): median ms per case, mode and variant."""
    lines = ["## Video diffusion (diffusers' temporal transformers)\n",
             "Upstream (eager / sdpa) vs `tk.patch` (patched) / `tk.temporal_attention` (tk); shapes in "
             "`benchmarks/diffusion.py`. Median ms (p20–p80), peak MiB of one call, speed-up vs the first variant.\n",
             "| case | mode | variant | ms (p20–p80) | peak MiB | speed-up |",
             "| --- | --- | --- | --- | --- | --- |"]
    keys = OrderedDict.fromkeys((r["kernel_name"], r["config"].get("mode"), r["kernel_provider"]) for r in rows)
    for kernel, mode, variant in keys:
        get = {r["metric"]: r for r in rows if (r["kernel_name"], r["config"].get("mode"), r["kernel_provider"])
               == (kernel, mode, variant)}
        case = kernel.replace("diffusion_", "")
        if "step_ms" not in get:
            lines.append(f"| {case} | {mode or ''} | {variant} | {'error' if 'error' in get else 'skipped'} | | |")
            continue
        s = get["step_ms"]
        peak = f"{get['peak_mem_mb']['y_value_50']:.0f}" if "peak_mem_mb" in get else "–"
        speed = next((r for m, r in get.items() if m.startswith("speedup_vs_")), None)
        lines.append(f"| {case} | {mode} | {variant} | {s['y_value_50']:.3f} ({s['y_value_20']:.3f}–"
                     f"{s['y_value_80']:.3f}) | {peak} | {_x(speed['y_value_50'] if speed else None)} |")
    return lines + [""]


def _e2e_table(model: str, rows: list[dict]) -> list[str]:
    cfg = next((r["config"] for r in rows if r["metric"] == "step_ms"), {})
    title = model.replace("e2e_", "")
    desc = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("mode", "variant"))
    lines = [f"### {title}" + (f" ({desc})" if desc else "") + "\n",
             "| mode | variant | step ms (p20–p80) | clips/s | peak MiB | Δ MiB | speed-up vs eager | vs compiled |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    modes = list(OrderedDict.fromkeys(r["config"].get("mode") for r in rows))
    for mode in modes:
        for variant in E2E_VARIANTS:
            sel = [r for r in rows if r["kernel_provider"] == variant and r["config"].get("mode") == mode]
            if not sel:
                continue
            get = {r["metric"]: r for r in sel}
            if "step_ms" not in get:
                what = "error" if "error" in get else "skipped"
                lines.append(f"| {mode} | {variant} | {what} | | | | | |")
                continue
            s = get["step_ms"]

            def y(metric: str, get=get):
                return get[metric]["y_value_50"] if metric in get else None

            clips = y("clips_per_s")
            lines.append(f"| {mode} | {variant} | {s['y_value_50']:.2f} ({s['y_value_20']:.2f}–{s['y_value_80']:.2f}) "
                         f"| {'–' if clips is None else f'{clips:.1f}'} | {_mib(y('peak_mem_mb'))} "
                         f"| {_mib(y('peak_mem_delta_mb'))} | {_x(y('speedup_vs_eager'))} "
                         f"| {_x(y('speedup_vs_compiled'))} |")
    lines.append("")
    return lines


def _targets(rows: list[dict]) -> list[str]:
    """The issue's targets, checked where this run measured the rows they need."""
    lines = []
    dtype = "bfloat16"

    def best_ours_and_peer(kernel: str, mode: str):
        key = ("base", 8, mode)
        ours = [r for p in OURS if (r := _metric(rows, kernel, p, "time_ms", dtype, key))]
        peers = [r for p in PROVIDER_ORDER if p not in OURS and (r := _metric(rows, kernel, p, "time_ms", dtype, key))]
        o = min(ours, key=lambda r: r["y_value_50"]) if ours else None
        q = min(peers, key=lambda r: r["y_value_50"]) if peers else None
        return o, q

    for kernel, goal in (("temporal_attention", 5.0), ("spatial_attention", 1.5)):
        o, q = best_ours_and_peer(kernel, "fwd+bwd")
        if o and q:
            s = q["y_value_50"] / o["y_value_50"]
            lines.append(f"| {kernel} fwd+bwd ≥{goal:g}× best peer | {o['kernel_provider']} {s:.2f}× over "
                         f"{q['kernel_provider']} | {'yes' if s >= goal else 'no'} |")
    for kernel, goal in (("temporal_attention", 85.0), ("spatial_attention", 70.0)):
        o, _ = best_ours_and_peer(kernel, "fwd")
        if o:
            pct = _metric(rows, kernel, o["kernel_provider"], "pct_mem_roofline", dtype, ("base", 8, "fwd"))
            if pct and pct["y_value_50"] is not None:
                v = pct["y_value_50"]
                lines.append(f"| {kernel} fwd ≥{goal:g}% of memory roofline | {o['kernel_provider']} {v:.0f}% | "
                             f"{'yes' if v >= goal else 'no'} |")
    hf = [r for r in rows if r["kernel_name"] == "e2e_hf_timesformer" and r["config"].get("mode") == "train"
          and int(float(r["x_value"] or 0)) == 8]

    def get(variant, metric):
        r = next((r for r in hf if r["kernel_provider"] == variant and r["metric"] == metric), None)
        return r["y_value_50"] if r else None

    eager, patched = get("eager", "step_ms"), get("patched", "step_ms")
    compiled, cpatched = get("compiled", "step_ms"), get("compiled_patched", "step_ms")
    ours = min([t for t in (patched, cpatched) if t is not None], default=None)
    if eager and ours:
        s = eager / ours
        lines.append(f"| HF training step ≥1.4× HF eager | {s:.2f}× | {'yes' if s >= 1.4 else 'no'} |")
    if compiled and ours:
        s = compiled / ours
        lines.append(f"| HF training step ≥1.15× torch.compile(HF) | {s:.2f}× | {'yes' if s >= 1.15 else 'no'} |")
    pe, pp = get("eager", "peak_mem_mb"), get("patched", "peak_mem_mb")
    if pe and pp:
        saving = 100.0 * (1.0 - pp / pe)
        lines.append(f"| HF training peak memory ≥30% below eager | {saving:.0f}% less (patched) | "
                     f"{'yes' if saving >= 30 else 'no'} |")
    return lines


def write_markdown(csv_path: str, md_path: Optional[str] = None) -> str:
    md_path = md_path or os.path.join(os.path.dirname(os.path.abspath(csv_path)), MD_NAME)
    with open(md_path, "w") as f:
        f.write(markdown(read_csv(csv_path)))
    return md_path


def _measure_key(row: dict) -> tuple:
    """What a row measures: kernel, provider and configuration; every metric of one
    measurement shares the key (and its error/skipped rows stand for all of them), except
    the speed-ups, which compare with another provider and are keyed by their metric."""
    c = {k: v for k, v in row["config"].items() if k not in ("error", "reason", "vs")}
    family = row["metric"] if row["metric"].startswith("speedup_vs_") else "main"
    return (row["kernel_name"], row["kernel_provider"], family, json.dumps(c, sort_keys=True))


def merge_csvs(paths: list[str], out_path: str) -> int:
    """Merge the rows of several runs (e.g. two calls of gpu.sh, or a --resume run) into
    ``out_path``. For each measured thing (kernel, provider, configuration) the rows of the
    last file that measured it are kept; where no file measured it, the 'error'/'skipped'
    rows of the last file that mentions it. The last file's environment row comes first.
    Returns the number of rows written."""
    files = [read_csv(p) for p in paths]
    last_measured: dict = {}
    last_seen: dict = {}
    for i, rows in enumerate(files):
        for r in rows:
            if r["kernel_name"] == "environment":
                continue
            key = _measure_key(r)
            last_seen[key] = i
            if r["metric"] not in ("error", "skipped"):
                last_measured[key] = i
    env = [r for rows in files for r in rows if r["kernel_name"] == "environment"][-1:]
    kept = list(env)
    for i, rows in enumerate(files):
        for r in rows:
            if r["kernel_name"] == "environment":
                continue
            key = _measure_key(r)
            if key in last_measured:
                if last_measured[key] == i and r["metric"] not in ("error", "skipped"):
                    kept.append(r)
            elif last_seen[key] == i:
                kept.append(r)
    tmp = out_path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in kept:
            w.writerow([_fmt(r[c]) if c.startswith("y_value") else r[c] for c in COLUMNS])
    os.replace(tmp, out_path)
    return len(kept)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                 description="Rebuild results.md and the plots from benchmark CSVs; several CSVs "
                                             "are merged into --out/results.csv first.")
    ap.add_argument("csv", nargs="+", help="results.csv of one or more runs")
    ap.add_argument("--out", default=None, help="folder for the merged CSV, results.md and plots "
                                                "(default: beside the first CSV when there is one)")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    csv_path = args.csv[0]
    if len(args.csv) > 1 or args.out:
        if not args.out:
            ap.error("--out is needed to merge several CSVs")
        csv_path = os.path.join(args.out, CSV_NAME)
        if [os.path.abspath(p) for p in args.csv] == [os.path.abspath(csv_path)]:
            pass  # rebuilding in place
        else:
            print(f"merged {merge_csvs(args.csv, csv_path)} rows into {csv_path}")
    print(f"wrote {write_markdown(csv_path)}")
    if not args.no_plots:
        from . import plot

        for path in plot.plot_all(csv_path):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
