"""PNG plots from a benchmark CSV: ``python -m benchmarks.plot results.csv``.

    time_vs_batch.png  median time (p20–p80 bars) against the batch, per op and mode, one line
                       per provider, at the shape family measured at the most batches
    speedup.png        ours over each peer, bars per shape, per op and mode
    e2e.png            clips/s of each end-to-end variant, inference and training

The first dtype in the CSV is plotted (bf16 in a default GPU run); the settings are written
under each title. Needs matplotlib; without it the plots are skipped with a message.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from typing import Callable

from .report import OURS, PROVIDER_ORDER, read_csv

OPS = ("temporal_attention", "spatial_attention")
MODES = ("fwd", "bwd", "fwd+bwd")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_all(csv_path: str, out_dir: str | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Write every plot the CSV has data for; returns the paths written."""
    plt = _pyplot()
    if plt is None:
        log("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    rows = read_csv(csv_path)
    out_dir = out_dir or os.path.dirname(os.path.abspath(csv_path))
    written = []
    for name, fn in (("time_vs_batch.png", _time_vs_batch), ("speedup.png", _speedup), ("e2e.png", _e2e)):
        path = os.path.join(out_dir, name)
        try:
            if fn(plt, rows, path):
                written.append(path)
        except Exception as e:  # noqa: BLE001 - a plot must never cost the results
            log(f"plot {name} failed: {type(e).__name__}: {e}")
        finally:
            plt.close("all")
    return written


def _device(rows) -> str:
    return rows[0]["gpu_name"] if rows else ""


def _times(rows):
    return [r for r in rows if r["metric"] == "time_ms" and r["kernel_name"] in OPS]


def _time_vs_batch(plt, rows, path) -> bool:
    times = _times(rows)
    if not times:
        return False
    dtype = times[0]["config"]["dtype"]
    times = [r for r in times if r["config"]["dtype"] == dtype]
    batches: dict = {}
    for r in times:
        batches.setdefault(r["config"]["shape"], set()).add(r["config"]["B"])
    family = max(batches, key=lambda f: len(batches[f]))
    times = [r for r in times if r["config"]["shape"] == family]
    modes = [m for m in MODES if any(r["config"]["mode"] == m for r in times)]
    ops = [o for o in OPS if any(r["kernel_name"] == o for r in times)]
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(4.2 * len(modes), 3.4 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in times if r["kernel_name"] == op and r["config"]["mode"] == mode]
            for p in [p for p in PROVIDER_ORDER if any(r["kernel_provider"] == p for r in sel)]:
                pts = sorted((r["config"]["B"], r["y_value_50"], r["y_value_20"], r["y_value_80"])
                             for r in sel if r["kernel_provider"] == p)
                xs = [q[0] for q in pts]
                ys = [q[1] for q in pts]
                err = [[q[1] - q[2] for q in pts], [q[3] - q[1] for q in pts]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, lw=2.2 if p in OURS else 1.2, label=p)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op} {mode}", fontsize=10)
            ax.set_xlabel("batch (clips)")
            ax.set_ylabel("median time (ms)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    cfg = times[0]["config"]
    timer = "perf_counter on CPU" if _device(rows) == "cpu" else "do_bench"
    fig.suptitle(f"{_device(rows)}: {family} (T={cfg['T']}, N={cfg['N']}, D={cfg['D']}, H={cfg['H']}), {dtype}; "
                 f"{timer} median, p20–p80 bars", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _speedup(plt, rows, path) -> bool:
    speed = [r for r in rows if r["metric"].startswith("speedup_vs_") and r["kernel_name"] in OPS]
    if not speed:
        return False
    dtype = speed[0]["config"]["dtype"]
    speed = [r for r in speed if r["config"]["dtype"] == dtype]
    ours = next(p for p in OURS if any(r["kernel_provider"] == p for r in speed))
    speed = [r for r in speed if r["kernel_provider"] == ours]
    modes = [m for m in MODES if any(r["config"]["mode"] == m for r in speed)]
    ops = [o for o in OPS if any(r["kernel_name"] == o for r in speed)]
    peers = [p for p in PROVIDER_ORDER if any(r["metric"] == f"speedup_vs_{p}" for r in speed)]
    fig, axes = plt.subplots(len(ops), len(modes), figsize=(4.6 * len(modes), 3.4 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in speed if r["kernel_name"] == op and r["config"]["mode"] == mode]
            cases = list(OrderedDict.fromkeys((r["config"]["shape"], r["config"]["B"]) for r in sel))
            width = 0.8 / max(1, len(peers))
            for k, peer in enumerate(peers):
                ys = []
                for shape, b in cases:
                    r = next((r for r in sel if r["metric"] == f"speedup_vs_{peer}" and r["config"]["shape"] == shape
                              and r["config"]["B"] == b), None)
                    ys.append(r["y_value_50"] if r else 0.0)
                ax.bar([c + k * width - 0.4 + width / 2 for c in range(len(cases))], ys, width, label=f"vs {peer}")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels([f"{s}\nB={b}" for s, b in cases], fontsize=8)
            ax.set_title(f"{op} {mode}", fontsize=10)
            ax.set_ylabel(f"speed-up of {ours} (×)")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{_device(rows)}: {ours} speed-up over each peer (median / median), {dtype}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _e2e(plt, rows, path) -> bool:
    clips = [r for r in rows if r["metric"] == "clips_per_s" and r["kernel_name"].startswith("e2e_")]
    if not clips:
        return False
    panels = list(OrderedDict.fromkeys((r["kernel_name"], r["config"].get("mode")) for r in clips))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.4), squeeze=False)
    for ax, (model, mode) in zip(axes[0], panels):
        sel = [r for r in clips if r["kernel_name"] == model and r["config"].get("mode") == mode]
        names = [r["kernel_provider"] for r in sel]
        ys = [r["y_value_50"] for r in sel]
        err = [[r["y_value_50"] - r["y_value_20"] for r in sel], [r["y_value_80"] - r["y_value_50"] for r in sel]]
        ax.bar(range(len(sel)), ys, yerr=err, capsize=3,
               color=["tab:orange" if "patched" in n else "tab:blue" for n in names])
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        b = sel[0]["config"].get("B")
        ax.set_title(f"{model.replace('e2e_', '')} {mode}, B={b}", fontsize=10)
        ax.set_ylabel("clips / s (median)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{_device(rows)}: end to end, bf16 autocast (orange: tk.patch)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Plot a benchmark CSV.")
    ap.add_argument("csv")
    ap.add_argument("--out", default=None, help="folder for the PNGs (default: beside the CSV)")
    args = ap.parse_args(argv)
    for p in plot_all(args.csv, args.out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
