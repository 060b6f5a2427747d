"""``python -m benchmarks.static.pools DIR... [--kinds K,...]``: the tables of
``timesformer_kernels/triton/pools.py`` from the CSVs of ``--all-configs`` sweeps (every pool
entry compiled for every target, kept or not).

For every entry of the package's pools (its configs, in their order), per MMA kind: clean when
no row of that kind's targets spills, fails to compile or exceeds the target's shared memory,
over every case, head dim of the entry's class, dtype of its operand class and Triton version
in DIR; its value is the largest shared memory of those rows, in KB rounded up. Kinds with no
row stay out (the entry is not kept there). Prints the tables to paste over pools.py's.
"""
from __future__ import annotations

import argparse
import math
import sys

from timesformer_kernels import devices
from timesformer_kernels.triton import pools, spatial, temporal

from . import aot, report
from .sweep import NO_FIT, config_label

_SHORT = {"mma.sync": "S", "wgmma": "W", "tcgen05": "T", "mfma": "A"}  # pools.py's names of the kinds
_TABLES = {name: (module, kind, getattr(pools, name)) for name, module, kind in (
    ("SPATIAL_FWD", spatial, "fwd"), ("SPATIAL_DQ", spatial, "dq"), ("SPATIAL_DKDV", spatial, "dkdv"),
    ("SPATIAL_GROUP", spatial, "group"), ("TEMPORAL_FWD", temporal, "fwd"), ("TEMPORAL_BWD", temporal, "bwd"))}


def _pool_key(row: dict) -> tuple:
    """The pool a sweep row's launch took its config from (pools.key, as the pruning computes it)."""
    dtype = aot.DTYPES[row["dtype"]]
    precision = "tf32x3" if row["dtype"] == "fp32" else "tf32" if row["dtype"] == "tf32" else "ieee"
    block_d = max(16, 1 << (int(row["head_dim"]) - 1).bit_length())
    return pools.key(block_d, dtype, precision)


def evidence(rows: list[dict], kinds: set[str]) -> dict[tuple, dict[str, list[dict]]]:
    """(table, pool key, config label) -> {MMA kind: rows}."""
    by_name = {module._NAMES[kind]: table for table, (module, kind, _) in _TABLES.items()}
    out: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        table = by_name.get(r["kernel"])
        kind = devices.TARGETS[r["target"]].mma
        if table is None or kind not in kinds or r["error"].startswith(NO_FIT):
            continue
        out.setdefault((table, _pool_key(r), r["config"]), {}).setdefault(kind, []).append(r)
    return out


def _failed(row: dict) -> bool:
    """Spilled, did not compile or does not fit its target (the pool claims aside)."""
    return any(kind in ("compile error", "spills", "shared memory") for kind, _ in report.issues_of(row))


def tables(rows: list[dict], kinds: set[str]) -> str:
    found = evidence(rows, kinds)
    lines = []
    for table, (_, _, pool) in _TABLES.items():
        names = ("_N" if table == "SPATIAL_GROUP" else "_MH" if table.startswith("TEMPORAL") else "_MN")
        lines.append(f"{table}: dict[tuple, list[Entry]] = {{")
        for key, entries in pool.items():
            lines.append(f"    ({key[0]}, {key[1]!r}): _pool({names}, [")
            for e in entries:
                per_kind = found.get((table, key, config_label(e.config)), {})
                clean = {k: math.ceil(max(report._int(r["smem"]) for r in rs) / 1024)
                         for k, rs in per_kind.items() if not any(_failed(r) for r in rs)}
                meta = [*e.config.kwargs.values(), e.config.num_warps, e.config.num_stages]
                cell = ", ".join(f"{_SHORT[k]}: {clean[k]}" for k in _SHORT if k in clean)
                spilled = sorted(_SHORT[k] for k in per_kind if k not in clean)
                lines.append(f"        ({', '.join(map(str, meta))}, {{{cell}}}),"
                             + (f"  # not clean: {', '.join(spilled)}" if spilled else ""))
            lines.append("    ]),")
        lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static.pools", description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="output folders of `python -m benchmarks.static --all-configs`")
    ap.add_argument("--kinds", default="mma.sync,wgmma,tcgen05", help="the MMA kinds the pools may keep")
    args = ap.parse_args(argv)
    rows = [r for folder in args.folders for r in report.read_rows(folder)]
    sys.stdout.write(tables(rows, set(args.kinds.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
