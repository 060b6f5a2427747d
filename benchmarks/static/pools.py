"""``python -m benchmarks.static.pools DIR... [--kinds K,...]``: the tables of
``timesformer_kernels/triton/pools.py`` from the CSVs of ``--all-configs`` sweeps (every pool
entry compiled for every target, kept or not).

For every entry of the package's pools (its configs, in their order), per MMA kind: clean when
no row of that kind's targets spills, fails to compile or exceeds the target's shared memory,
over every case, head dim of the entry's class, dtype of its operand class and Triton version
in DIR; its value is the largest shared memory of those rows, in KB rounded up. Kinds with no
row stay out (the entry is not kept there). Prints the tables to paste over pools.py's.

``--correct``: start from the package's pools instead, and only take kinds away from an entry
where a row of DIR fails (as above) or raise its shared memory to what DIR shows: how sweeps of
the kept configs (other targets of a kind, other head dims, the other Triton version) correct
the tables without an ``--all-configs`` sweep of everything.
"""
from __future__ import annotations

import argparse
import math
import sys

from timesformer_kernels import devices
from timesformer_kernels.triton import pools, spatial, temporal, tuning

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
    """(table, pool key, config label) -> {target: rows}."""
    by_name = {module._NAMES[kind]: table for table, (module, kind, _) in _TABLES.items()}
    out: dict[tuple, dict[str, list[dict]]] = {}
    for r in rows:
        table = by_name.get(r["kernel"])
        if table is None or devices.TARGETS[r["target"]].mma not in kinds or r["error"].startswith(NO_FIT):
            continue
        out.setdefault((table, _pool_key(r), r["config"]), {}).setdefault(r["target"], []).append(r)
    return out


def _failed(row: dict, fit: bool = True) -> bool:
    """Spilled, did not compile or (with ``fit``) does not fit its target (the pool claims aside)."""
    failures = ("compile error", "spills", "shared memory") if fit else ("compile error", "spills")
    return any(kind in failures for kind, _ in report.issues_of(row))


def _kb(rows: list[dict]) -> int:
    return math.ceil(max(report._int(r["smem"]) for r in rows) / 1024)


def _claims(entry, per_target: dict[str, list[dict]], kinds: set[str], correct: bool) -> dict[str, int | None]:
    """{MMA kind or target: KB of shared memory, or None where it spills} of one entry."""
    if not correct:  # from scratch: a kind is clean when none of its targets' rows fails
        per_kind: dict[str, list[dict]] = {}
        for name, rs in per_target.items():
            per_kind.setdefault(devices.TARGETS[name].mma, []).extend(rs)
        return {k: _kb(rs) for k, rs in per_kind.items() if not any(_failed(r) for r in rs)}
    # Correcting: a failure on the kind's first target (the one its claim came from) takes the
    # kind away, on another target only that target; a config over a smaller GPU's shared memory
    # only raises the claim (the pruning then leaves it out there).
    claims = {k: None if b is None else math.ceil(b / 1024) for k, b in entry.smem.items()}
    masked = {t: [r for r in rs if tuning.masked(int(r["head_dim"]))] for t, rs in per_target.items()}
    if any(_failed(r, fit=False) for rs in masked.values() for r in rs):
        claims["masked"] = None  # spills at a head dim below its BLOCK_D: judge the rest on the full ones
        per_target = {t: [r for r in rs if not tuning.masked(int(r["head_dim"]))] for t, rs in per_target.items()}
    for kind in kinds:
        if claims.get(kind) is None:
            continue
        names = [t for t, tgt in devices.TARGETS.items() if tgt.mma == kind]
        for name in names:
            rs = per_target.get(name, [])
            if not rs or claims.get(name, 0) is None:
                continue
            if any(_failed(r, fit=False) for r in rs):
                if name == names[0]:
                    claims = {k: v for k, v in claims.items() if k != kind and k not in names}
                    break
                claims[name] = None
            else:
                claims[kind] = max(claims[kind], _kb(rs))
    return claims


def _cell(claims: dict[str, int | None]) -> str:
    kinds = [f"{_SHORT[k]}: {claims[k]}" for k in _SHORT if k in claims]
    return ", ".join(kinds + [f"{t!r}: {claims[t]}" for t in (*devices.TARGETS, "masked") if t in claims])


def tables(rows: list[dict], kinds: set[str], correct: bool = False) -> str:
    found = evidence(rows, kinds)
    lines = []
    for table, (_, _, pool) in _TABLES.items():
        names = ("_N" if table == "SPATIAL_GROUP" else "_MH" if table.startswith("TEMPORAL") else "_MN")
        lines.append(f"{table}: dict[tuple, list[Entry]] = {{")
        for key, entries in pool.items():
            lines.append(f"    ({key[0]}, {key[1]!r}): _pool({names}, [")
            for e in entries:
                per_target = found.get((table, key, config_label(e.config)), {})
                claims = _claims(e, per_target, kinds, correct)
                meta = [*e.config.kwargs.values(), e.config.num_warps, e.config.num_stages]
                tried = kinds if correct else {devices.TARGETS[t].mma for t in per_target}
                spilled = sorted(_SHORT[k] for k in tried if k in _SHORT and k not in claims)
                lines.append(f"        ({', '.join(map(str, meta))}, {{{_cell(claims)}}}),"
                             + (f"  # not clean: {', '.join(spilled)}" if spilled else ""))
            lines.append("    ]),")
        lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.static.pools", description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", help="output folders of `python -m benchmarks.static --all-configs`")
    ap.add_argument("--kinds", default="mma.sync,wgmma,tcgen05", help="the MMA kinds the pools may keep")
    ap.add_argument("--correct", action="store_true",
                    help="start from the package's pools; only remove failing kinds and raise shared memory")
    args = ap.parse_args(argv)
    rows = [r for folder in args.folders for r in report.read_rows(folder)]
    sys.stdout.write(tables(rows, set(args.kinds.split(",")), args.correct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
