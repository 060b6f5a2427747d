"""kernels.md from the sweep CSVs of every Triton version in the folder, and the csrc part."""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess

from . import model, sass
from .sweep import CSV_FIELDS, SHAPES

MODEL_DTYPE, MODEL_HEAD_DIM, MODEL_TARGET = "bf16", 64, "sm_90"
SCALAR_BYTES = 4  # a hot-loop load this narrow or narrower is a scalar load
FAILURES = ("compile error", "spills", "shared memory")  # the rest of issues_of is waste, not failure


def csv_name(version: str) -> str:
    return f"kernels-triton-{version}.csv"


def write_csv(path: str, rows: list[dict]) -> None:
    """Atomically (another Triton version's run may be reading the folder)."""
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    os.replace(path + ".tmp", path)


def read_rows(folder: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, csv_name("*")))):
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def _int(v) -> int:
    return int(float(v)) if v not in ("", None) else 0


def ok(row: dict) -> bool:
    """Compiled, no spill, fits its target (what tests/test_static_report.py requires)."""
    return not [kind for kind, _ in issues_of(row) if kind in FAILURES]


def scalar_loads(row: dict) -> int:
    """Hot-loop loads (LDG or cp.async) of 4 bytes or fewer per thread."""
    n = 0
    for field in ("loop_ldg", "loop_ldgsts"):
        for item in row[field].split():
            size, count = item.split("Bx")
            n += int(count) if int(size) <= SCALAR_BYTES else 0
    return n


def issues_of(row: dict) -> list[tuple[str, str]]:
    """(kind, detail) of what is wrong or wasteful with one compiled config."""
    if row.get("error"):
        return [("compile error", row["error"])]
    found = []
    if _int(row["stack"]) or _int(row["local"]) or _int(row["spill_stores"]):
        found.append(("spills", f"{row['stack']} B stack, {row['spill_stores']} STL / {row['spill_loads']} LDL"))
    if _int(row["warps_per_sm"]) == 0:
        limit = model.LIMITS[row["target"]]
        found.append(("shared memory", f"{row['smem']} B exceeds {limit.name}'s {limit.smem_per_block} B per block"))
    if row["mma_dup"] and float(row["mma_dup"]) > 1.01:
        found.append(("duplicated work", f"{row['mma_dup']}x the dot FLOPs issued as MMA"))
    if scalar_loads(row):
        found.append(("scalar loads", f"{scalar_loads(row)} loads of <= 4 B per thread in the hot loop"))
    return found


def model_rows(rows: list[dict]) -> list[dict]:
    """Rows of the issue model: sm_90, bf16, Dh 64, at each model shape, with bounds added."""
    out = []
    for row in rows:
        if (row["target"], row["dtype"], _int(row["head_dim"])) != (MODEL_TARGET, MODEL_DTYPE, MODEL_HEAD_DIM):
            continue
        if row["error"] or not row["iterations"] or row["kernel"] not in model.KERNELS:
            continue
        counts = model.Counts(_int(row["prologue"]) + _int(row["epilogue"]), _int(row["body"]),
                              _int(row["mufu_straight"]), _int(row["mufu_body"]),
                              float(row["mma_flops_straight"]), float(row["mma_flops_body"]), row["tf32"] == "True")
        args = (counts, _int(row["warps"]), _int(row["programs"]), _int(row["iterations"]), float(row["min_bytes"]))
        out.append({**row, "h100": model.bounds(*args, model.H100), "h200": model.bounds(*args, model.H200)})
    return out


def best(mrows: list[dict]) -> dict[tuple, dict]:
    """(version, shape, kernel) -> the config with the lowest highest bound on the H100 model,
    among configs that compile without spills (ties: the lower issue bound)."""
    chosen: dict[tuple, dict] = {}
    for r in mrows:
        if not ok(r):
            continue
        key = (r["triton"], r["shape"], r["kernel"])
        rank = (r["h100"].time_s, r["h100"].issue_s)
        if key not in chosen or rank < (chosen[key]["h100"].time_s, chosen[key]["h100"].issue_s):
            chosen[key] = r
    return chosen


def _us(s: float) -> str:
    return f"{s * 1e6:.1f}"


def _merge(values: list[str]) -> str:
    """One cell for several Triton versions: the value if they agree, else 'a / b'."""
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def csrc_resources(cuobjdump: str, library: str) -> list[tuple[str, str, int, int, int, int]]:
    """(arch, kernel, regs, stack, static smem, local) of each kernel in the built extension."""
    text = sass.run_tool(cuobjdump, "--dump-resource-usage", library)
    names = re.findall(r"Function (\S+?):", text)
    demangled = dict(zip(names, subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                                               text=True).stdout.splitlines())) if names else {}
    out, arch, name = [], "", ""
    for line in text.splitlines():
        if m := re.match(r"arch = (\S+)", line.strip()):
            arch = m.group(1)
        elif m := re.search(r"Function (\S+?):", line):
            pretty = demangled.get(m.group(1), m.group(1))
            pretty = pretty.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
            name = re.sub(r"^[\w:]*::", "", pretty)  # drop the namespaces, keep the template arguments
        elif m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line):
            out.append((arch, name, *map(int, m.groups())))
    return sorted(set(out))


def markdown(folder: str, command: str, csrc: list | None, csrc_note: str) -> str:
    rows = read_rows(folder)
    versions = sorted({r["triton"] for r in rows}, key=lambda v: tuple(map(int, re.findall(r"\d+", v))))
    metas = {}
    for path in glob.glob(os.path.join(folder, "meta-triton-*.json")):
        with open(path) as f:
            meta = json.load(f)
        metas[meta["triton"]] = meta
    lines = ["# Static kernel report: the Triton kernels compiled ahead of time, no GPU",
             "",
             "Generated, do not edit. Regenerate (once per Triton version; the markdown merges every",
             "`kernels-triton-*.csv` in this folder):",
             "",
             "```bash", command, "```", ""]
    for v in versions:
        m = metas.get(v, {})
        lines.append(f"- Triton {v}: torch {m.get('torch', '?')}, bundled ptxas {m.get('ptxas', '?')}, "
                     f"cuobjdump {m.get('cuobjdump', '?')}; {m.get('compiles', '?')} compiles in "
                     f"{m.get('seconds', 0) / 60:.1f} min with {m.get('jobs', '?')} worker process(es) "
                     f"({m.get('scope', '')}).")
    lines += ["",
              "Nothing here ran on a GPU. Each kernel launch is recorded from the package's own wrappers on CPU",
              "tensors of TimeSformer-base (B=8, T=8, N=196, H=12; qkv (B, 1+N·T, 3·H·Dh), temporal on",
              "`qkv[:, 1:]`), bound with the JIT function's binder (16-byte aligned pointers, strides divisible",
              "by 16, ints == 1 as constants) and compiled with `triton.compile` for `GPUTarget('cuda', 90|80, 32)`,",
              "for every autotune config the kernel's pruning keeps. Registers, stack/local and static shared",
              "memory come from",
              "`cuobjdump --dump-resource-usage`, dynamic shared memory from the compiled metadata, the rest from",
              "`cuobjdump --dump-sass`. Occupancy: resident warps per SM (H100/H200: 64K regs, 64 warps, 228 KB smem",
              "per SM, 227 KB per block; A100: 164/163 KB; 1 KB reserved per block; registers per warp in units",
              "of 256).",
              "Cells with two values are `" + " / ".join(versions) + "` (Triton versions) where they differ.", ""]

    lines += ["## Findings", ""]
    findings = {}
    for r in rows:
        for kind, detail in issues_of(r):
            findings.setdefault((r["triton"], r["kernel"], kind), []).append(
                f"{r['config']} {r['target']} {r['dtype']} Dh{r['head_dim']} {r['shape']}: {detail}")
    if not findings:
        lines.append("No compile error, spill, shared-memory overflow, duplicated work or scalar hot-loop load.")
    for (v, kernel, kind), items in sorted(findings.items()):
        lines.append(f"- Triton {v}, `{kernel}`, {kind}: {len(items)} compiled configs, e.g. {items[0]}"
                     + (f"; {items[-1]}" if len(items) > 1 else ""))
    lines.append("")

    compiled = [r for r in rows if not r["error"]]
    loops_ok = sum(r["sass_loops"] == r["source_loops"] for r in compiled)
    mrows = model_rows(rows)
    chosen = best(mrows)
    lines += ["## Issue-time model (issue 13 §1): sm_90, bf16, Dh 64", "",
              "Lower bounds per kernel launch, µs: issue = SASS instructions (prologue + epilogue per program, hot",
              "loop × its trip count) × warps / (132 SMs × 4 per clock × 1.755 GHz); MUFU = MUFU instructions",
              "× 32 / (16 per clock per SM); MMA = FLOPs of the HGMMA/HMMA instructions executed (padding and",
              "duplicates included) at 790 TFLOP/s; memory = the kernel's minimum bytes (benchmarks/config.py's",
              "work model; dQ and dK/dV each their own) at 3.0 TB/s (H100) and 4.3 TB/s (H200). H100 and H200",
              "share SMs and clock here.",
              "Best config: lowest highest bound on the H100 among configs that compile without spilling.",
              f"The loop found by its backward branch is the source loop: {loops_ok} of {len(compiled)} compiled",
              "kernels have as many SASS loops as source loops (no unrolled or peeled copy to count twice).",
              "Shapes: base = TimeSformer-base 224 px (B=8, T=8, N=196, D=768, H=12); hr = HR 448 px",
              "(B=4, T=16, N=784).",
              "",
              "| shape | Triton | kernel | best config | warps/SM | issue | MUFU | MMA | memory H100 | memory H200 "
              "| highest H100 | highest H200 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (v, shape, kernel), r in sorted(chosen.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2])):
        b1, b2 = r["h100"], r["h200"]
        lines.append(f"| {shape} | {v} | `{kernel}` | {r['config']} | {r['warps_per_sm']} | {_us(b1.issue_s)} | "
                     f"{_us(b1.mufu_s)} | {_us(b1.mma_s)} | {_us(b1.memory_s)} | {_us(b2.memory_s)} | "
                     f"{b1.highest} ({_us(b1.time_s)}) | {b2.highest} ({_us(b2.time_s)}) |")
    lines += ["", "Per op (best configs; spatial bwd = the whole-group kernel where it runs (base, sm_90), else dQ + "
              "dK/dV; against the op's floor, which reads qkv and dout once):", "",
              "| shape | Triton | op | issue | MUFU | MMA | kernels' minimum bytes (MB) | op floor (MB) "
              "| op floor H100 "
              "| op floor H200 |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_op: dict[tuple, list[dict]] = {}
    for (v, shape, kernel), r in chosen.items():
        by_op.setdefault((shape, v, r["op"]), []).append(r)
    for (shape, v, op), rs in sorted(by_op.items()):
        b, t, n, h = SHAPES[shape]
        op_name, mode = model.OP_BYTES[op]
        floor = model.work.bytes_moved(op_name, model.work.Shape(shape, b, t, n, h * MODEL_HEAD_DIM, h), mode, 2)
        sums = [sum(getattr(r["h100"], f) for r in rs) for f in ("issue_s", "mufu_s", "mma_s")]
        lines.append(f"| {shape} | {v} | {op} | {_us(sums[0])} | {_us(sums[1])} | {_us(sums[2])} | "
                     f"{sum(float(r['min_bytes']) for r in rs) / 1e6:.1f} | {floor / 1e6:.1f} | "
                     f"{_us(floor / model.H100.bandwidth)} | {_us(floor / model.H200.bandwidth)} |")
    lines += ["", "What the model cannot see: latency (dependency chains, barrier and async-copy waits, bank",
              "conflicts), caches, clocks under load and the autotuner's run-time choice. Every instruction counts",
              "once per program even in a branch only some programs take (the cls tails); mma.sync runs below the",
              "wgmma peak on Hopper, so the MMA bound of 32-row tiles is optimistic. Each bound is a floor; the",
              "highest is the one to beat, not a prediction of the time.",
              "", "Every config (issue / MUFU / MMA bound in µs, H100; memory floor in the table above):", "",
              "| shape | kernel | config | " + " | ".join(f"{v}: warps/SM, issue, MUFU, MMA" for v in versions)
              + " |",
              "|---|---|---|" + "---|" * len(versions)]
    table: dict[tuple, dict] = {}
    for r in mrows:
        table.setdefault((r["shape"], r["kernel"], r["config"]), {})[r["triton"]] = r
    for (shape, kernel, cfg), per in sorted(table.items()):
        cells = []
        for v in versions:
            r = per.get(v)
            cells.append("" if r is None else f"{r['warps_per_sm']}, {_us(r['h100'].issue_s)}, "
                         f"{_us(r['h100'].mufu_s)}, {_us(r['h100'].mma_s)}" + ("" if ok(r) else " (spills)"))
        lines.append(f"| {shape} | `{kernel}` | {cfg} | " + " | ".join(cells) + " |")

    lines += ["", "## Resources per kernel (TimeSformer-base launch, every kept config)", "",
              "regs per thread; spill = stack bytes per thread (STL count); smem = dynamic + static bytes per block;",
              "warps/SM = theoretical occupancy (0: does not fit); MMA in the hot loop (dup: MMA FLOPs issued / dot",
              "FLOPs of the TTGIR, > 1 when warps compute the same rows); loads in the hot loop by bytes per thread",
              "(LDG = plain global loads, LDGSTS = cp.async; TMA = UTMALDG/UBLKCP).", ""]
    cols = ["regs", "spill", "smem", "warps/SM", "MMA", "dup", "LDG", "LDGSTS", "TMA"]
    grouped: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        if r["shape"] != "base":
            continue
        key = (r["config"], r["target"], r["dtype"], _int(r["head_dim"]))
        grouped.setdefault(r["kernel"], {}).setdefault(key, {})[r["triton"]] = r
    for kernel, entries in grouped.items():
        lines += [f"### `{kernel}`", "", "| config | target | dtype | Dh | " + " | ".join(cols) + " |",
                  "|---|---|---|---|" + "---|" * len(cols)]
        for (cfg, target, dtype, dh), per in entries.items():
            def cell(r):
                if r is None:
                    return ["-"] * len(cols)
                if r["error"]:
                    return ["error"] + [""] * (len(cols) - 1)
                spill = r["stack"] + (f" ({r['spill_stores']} STL)" if _int(r["spill_stores"]) else "")
                return [r["regs"], spill, r["smem"], r["warps_per_sm"], r["mma"], r["mma_dup"], r["loop_ldg"] or "-",
                        r["loop_ldgsts"] or "-", r["loop_tma"] or "-"]
            per_version = [cell(per.get(v)) for v in versions]
            merged = [_merge([pv[i] for pv in per_version]) for i in range(len(cols))]
            lines.append(f"| {cfg} | {target} | {dtype} | {dh} | " + " | ".join(merged) + " |")
        lines.append("")

    lines += ["## csrc: the built CUDA extension", ""]
    if csrc:
        lines += [csrc_note, "", "| arch | kernel | regs | stack | static smem | local |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {a} | `{k}` | {r} | {s} | {sm} | {lo} |" for a, k, r, s, sm, lo in csrc]
    else:
        lines.append(csrc_note)
    return "\n".join(lines) + "\n"
