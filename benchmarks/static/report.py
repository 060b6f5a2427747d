"""kernels.md from the sweep CSVs of every Triton version in the folder, and the csrc part."""
from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess

from timesformer_kernels import devices

from . import aot, model, sass
from .sweep import CSV_FIELDS, NO_FIT
from .sweep import config_label as sweep_label

MODEL_DTYPE, MODEL_HEAD_DIM, MODEL_TARGET = "bf16", 64, "sm_90"
SCALAR_BYTES = 4  # a hot-loop load this narrow or narrower is a scalar load
# The rest of issues_of is waste, or a launch routed to another backend, not a failure.
FAILURES = ("compile error", "spills", "shared memory", "above its pool entry")


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
        for item in row.get(field, "").split():
            size, count = item.split("Bx")
            n += int(count) if int(size) <= SCALAR_BYTES else 0
    return n


def pool_smem(row: dict) -> int | None:
    """The shared memory pools.py claims for this row's config on its target's MMA kind (what
    the pruning compares with the target's limit), or None where it claims nothing."""
    import torch

    from timesformer_kernels.triton import pools, spatial, temporal
    from timesformer_kernels.triton.target import dot_precision

    module = spatial if row["kernel"].startswith("_spatial") else temporal
    kind = {v: k for k, v in module._NAMES.items()}.get(row["kernel"])
    if kind is None or not row.get("config"):
        return None
    tgt = devices.TARGETS[row["target"]]
    dtype = aot.DTYPES[row["dtype"]]
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(aot.PRECISIONS.get(row["dtype"], saved))
    precision = dot_precision(dtype, tgt)
    torch.set_float32_matmul_precision(saved)
    block_d = max(16, 1 << (_int(row["head_dim"]) - 1).bit_length())
    for entry in module._POOLS[kind].get(pools.key(block_d, dtype, precision), []):
        claim = entry.claim(tgt, _int(row["head_dim"]))
        if sweep_label(entry.config) == row["config"] and claim is not None:
            return claim
    return None


def issues_of(row: dict) -> list[tuple[str, str]]:
    """(kind, detail) of what is wrong or wasteful with one compiled config."""
    if row.get("error", "").startswith(NO_FIT):
        return [(NO_FIT, row["error"][len(NO_FIT) + 2:])]
    if row.get("error"):
        return [("compile error", row["error"])]
    found = []
    if _int(row["stack"]) or _int(row["local"]) or _int(row.get("spill_stores")):
        found.append(("spills", f"{row['stack']} B stack, {row.get('spill_stores', '')} STL / "
                                f"{row.get('spill_loads', '')} LDL"))
    if _int(row["warps_per_sm"]) == 0:
        limit = devices.TARGETS[row["target"]]
        found.append(("shared memory", f"{row['smem']} B exceeds {limit.name}'s {limit.smem_per_block} B per block"))
    claimed = pool_smem(row)
    if claimed is not None and _int(row["smem"]) > claimed:
        found.append(("above its pool entry", f"{row['smem']} B of shared memory, pools.py says {claimed} B"))
    if row.get("mma_dup") and float(row["mma_dup"]) > 1.01:
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


def _position(known, name: str) -> int:
    """Where ``name`` comes in ``known``'s order (unknown names last)."""
    names = list(known)
    return names.index(name) if name in names else len(names)


def _versions(rows: list[dict]) -> list[str]:
    return sorted({r["triton"] for r in rows}, key=lambda v: tuple(map(int, re.findall(r"\d+", v))))


def _header(folder: str, command: str, rows: list[dict], versions: list[str]) -> list[str]:
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
                     f"cuobjdump {m.get('cuobjdump', '?')}; {m.get('compiles', '?')} distinct binaries compiled for "
                     f"{m.get('rows', '?')} rows in {m.get('seconds', 0) / 60:.1f} min with {m.get('jobs', '?')} "
                     f"worker process(es) ({m.get('scope', '')}).")
    targets = ", ".join(f"{t.name} ({t.gpus}, {t.mma}, {t.smem_per_block:,} B per block)"
                        for t in devices.TARGETS.values())
    cases = "; ".join(f"{c.name}: {c.about} (B={c.batch}, T={c.frames}, N={c.patches}, H={c.heads})"
                      for c in aot.CASES.values())
    lines += ["",
              "Nothing here ran on a GPU. Each kernel launch is recorded from the package's own wrappers on CPU",
              "tensors of each case (qkv (B, [1+]N·T, 3·H·Dh)), as a GPU of the target would make it",
              "(`triton.target.compiling_for`: the same kernel choice, pruning and constexprs), bound with the",
              "JIT function's binder (16-byte aligned pointers, strides divisible by 16, ints == 1 as",
              "constants) and compiled with `triton.compile` for the target's `GPUTarget`, for every autotune",
              "config the kernel's pruning keeps there. A binary that several cases launch is compiled once",
              "(its key is Triton's own cache key). NVIDIA: registers, stack/local and static shared memory from",
              "`cuobjdump --dump-resource-usage`, dynamic shared memory from the compiled metadata, the rest from",
              "`cuobjdump --dump-sass`; AMD: VGPRs + AGPRs, scratch (VGPR spills to memory) and LDS from the",
              "compiler's notes in the amdgcn text. Occupancy: resident warps (waves) per SM (CU) by the device",
              "table's limits (`timesformer_kernels/devices.py`; 1 KB reserved per block on NVIDIA).",
              "",
              f"Targets: {targets}.",
              "",
              f"Cases: {cases}.",
              "",
              "Dtypes: bf16, fp16; fp32 at `torch.get_float32_matmul_precision()` \"highest\" (the default: three",
              "TF32 products a dot on NVIDIA, float32 MFMA on AMD); tf32: float32 at \"high\" (one TF32 product).",
              "",
              "Cells with two values are `" + " / ".join(versions) + "` (Triton versions) where they differ.", ""]
    return lines


def unfit(rows: list[dict]) -> set[tuple]:
    """The launches (case, kernel, head dim) none of whose kept configs compiles and fits the
    target's shared memory: where a GPU of it would crash (the autotuner's last launch raises
    OutOfResources) unless the pruning routes the call away (then the launch keeps no config)."""
    launches: dict[tuple, list[dict]] = {}
    for r in rows:
        launches.setdefault((r["shape"], r["kernel"], r["head_dim"]), []).append(r)
    return {key for key, rs in launches.items()
            if not any(r["error"].startswith(NO_FIT) for r in rs)
            and not any(not {"shared memory", "compile error"} & dict(issues_of(r)).keys() for r in rs)}


def _summary(rows: list[dict], versions: list[str]) -> list[str]:
    """Per target and dtype: compiled rows, spilling, over shared memory, compile errors, and
    the launches whose pruning kept no config (routed to another backend by why_not)."""
    dtypes = [d for d in aot.DTYPES if any(r["dtype"] == d for r in rows)]
    lines = ["## Summary per target and dtype", "",
             "Per target and dtype, over every case, head dim and kept config: configs compiled / spilling /",
             "over the target's shared memory / compile errors; unfit: launches (case, kernel, head dim) none of",
             "whose kept configs compiles within the target's shared memory (a crash on that GPU); routed: launches",
             "whose pruning keeps no config (`why_not(\"triton\")` names them, `auto` takes the next backend,",
             "`backend=\"triton\"` raises). Spills, shared-memory overflows and compile errors are failures",
             "(`tests/test_static_report.py`).",
             "", "| target | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    for name, t in devices.TARGETS.items():
        cells = []
        for d in dtypes:
            per = []
            for v in versions:
                rs = [r for r in rows if (r["triton"], r["target"], r["dtype"]) == (v, name, d)]
                if not rs:
                    per.append("-")
                    continue
                kinds = [dict(issues_of(r)) for r in rs]
                compiled = sum(NO_FIT not in k for k in kinds)
                counts = [sum(kind in k for k in kinds) for kind in ("spills", "shared memory", "compile error")]
                routed = sum(NO_FIT in k for k in kinds)
                per.append(f"{compiled} / {'/'.join(map(str, counts))}; unfit {len(unfit(rs))}, routed {routed}")
            cells.append(_merge(per))
        lines.append(f"| {name} ({t.gpus}) | " + " | ".join(cells) + " |")
    return lines + [""]


def _findings(rows: list[dict]) -> list[str]:
    lines = ["## Findings", ""]
    findings = {}
    for r in rows:
        for kind, detail in issues_of(r):
            if kind != NO_FIT:
                findings.setdefault((r["triton"], r["kernel"], kind), []).append(
                    f"{r['config']} {r['target']} {r['dtype']} Dh{r['head_dim']} {r['shape']}: {detail}")
    if not findings:
        lines.append("No compile error, spill, shared-memory overflow, duplicated work or scalar hot-loop load.")
    for (v, kernel, kind), items in sorted(findings.items()):
        lines.append(f"- Triton {v}, `{kernel}`, {kind}: {len(items)} compiled configs, e.g. {items[0]}"
                     + (f"; {items[-1]}" if len(items) > 1 else ""))
    return lines + [""]


def _coverage(rows: list[dict]) -> list[str]:
    """Per dtype, case and target: the head dims whose calls some kernel cannot run (routed)."""
    lines = ["## Which calls take the Triton kernels", "",
             "Per dtype, case and target: `all` when every kernel of the call (forward and backward) keeps a",
             "config at every head dim swept, else the head dims routed to another backend and the kernel that",
             "keeps none (both Triton versions agree: the pruning is Python, the same under both).", ""]
    targets = list(devices.TARGETS)
    for d in [d for d in aot.DTYPES if any(r["dtype"] == d for r in rows)]:
        lines += [f"### {d}", "", "| case | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
        for case in [c for c in aot.CASES if any(r["shape"] == c and r["dtype"] == d for r in rows)]:
            cells = []
            for t in targets:
                rs = [r for r in rows if (r["shape"], r["target"], r["dtype"]) == (case, t, d)]
                routed: dict[str, set] = {}
                for r in rs:
                    if r["error"].startswith(NO_FIT):
                        routed.setdefault(r["kernel"].removeprefix("_").removesuffix("_kernel"), set()).add(
                            _int(r["head_dim"]))
                cells.append("-" if not rs else "all" if not routed else "; ".join(
                    f"Dh {','.join(map(str, sorted(h)))}: {k}" for k, h in sorted(routed.items())))
            lines.append(f"| {case} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def by_case(rows: list[dict]) -> str:
    """by-case.md: for each (kernel, case, target, dtype, head dim): the configs kept, their
    resources and spills, or why none is kept."""
    versions = _versions(rows)
    lines = ["# Static kernel report by case: every kernel, case, target, dtype and head dim", "",
             "Generated with kernels.md (see there for how). Per row: the configs the pruning keeps and, over",
             "them, registers per thread (min-max), the largest stack (spill) in bytes, the largest shared",
             "memory per block against the target's; or the reason no config is kept. "
             + "Cells with two values are `" + " / ".join(versions) + "`.", ""]
    grouped: dict[tuple, dict[str, list]] = {}
    for r in rows:
        key = (r["kernel"], r["shape"], r["target"], r["dtype"], _int(r["head_dim"]))
        grouped.setdefault(key, {}).setdefault(r["triton"], []).append(r)
    kernel = None
    def order(kv):
        k, case, t, d, dh = kv[0]
        return k, _position(aot.CASES, case), _position(devices.TARGETS, t), _position(aot.DTYPES, d), dh

    for (k, case, t, d, dh), per in sorted(grouped.items(), key=order):
        if k != kernel:
            kernel = k
            lines += ["", f"## `{k}`", "",
                      "| case | target | dtype | Dh | configs kept | regs | spill B | smem B / limit |",
                      "|---|---|---|---|---|---|---|---|"]
        cells = []
        for v in versions:
            rs = per.get(v, [])
            if not rs:
                cells.append(["-"] * 4)
            elif rs[0]["error"].startswith(NO_FIT):
                cells.append([f"none: {rs[0]['error'].split(': ', 2)[-1]}", "", "", ""])
            else:
                good = [r for r in rs if not r["error"]]
                regs = sorted(_int(r["regs"]) for r in good) or [0]
                cells.append([", ".join(r["config"] for r in rs), f"{regs[0]}-{regs[-1]}",
                              str(max((_int(r["stack"]) for r in good), default=0)),
                              f"{max((_int(r['smem']) for r in good), default=0):,} / "
                              f"{devices.TARGETS[t].smem_per_block:,}"])
        merged = [_merge([c[i] for c in cells]) for i in range(4)]
        lines.append(f"| {case} | {t} | {d} | {dh} | " + " | ".join(merged) + " |")
    return "\n".join(lines) + "\n"


def markdown(folder: str, command: str, ext: dict | None, ext_note: str) -> str:
    """kernels.md; ``ext``: the CUDA extension's part (``csrc_part``) or None with ``ext_note`` why."""
    rows = read_rows(folder)
    versions = _versions(rows)
    lines = _header(folder, command, rows, versions) + _summary(rows, versions) + _findings(rows) + _coverage(rows)
    lines += ["Every (kernel, case, target, dtype, head dim) with its kept configs and resources:",
              "[by-case.md](by-case.md).", ""]
    compiled = [r for r in rows if not r["error"] and r["sass_loops"] != ""]  # SASS read (sweep.FULL_JOBS)
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
        case = aot.CASES[shape]
        b, t, n, h = case.batch, case.frames, case.patches, case.heads
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

    lines += ["", "## Resources per kernel on the fast path (TimeSformer-base, Dh 64, sm_90 and sm_80, bf16 and "
              "fp32)", "",
              "Every kept config; the other targets, dtypes, head dims and cases: [by-case.md](by-case.md).",
              "regs per thread; spill = stack bytes per thread (STL count); smem = dynamic + static bytes per block;",
              "warps/SM = theoretical occupancy (0: does not fit); MMA in the hot loop (dup: MMA FLOPs issued / dot",
              "FLOPs of the TTGIR, > 1 when warps compute the same rows); loads in the hot loop by bytes per thread",
              "(LDG = plain global loads, LDGSTS = cp.async; TMA = UTMALDG/UBLKCP).", ""]
    cols = ["regs", "spill", "smem", "warps/SM", "MMA", "dup", "LDG", "LDGSTS", "TMA"]
    grouped: dict[str, dict[tuple, dict]] = {}
    for r in rows:
        if (r["shape"], _int(r["head_dim"])) != ("base", 64) or r["target"] not in ("sm_90", "sm_80") \
                or r["dtype"] not in ("bf16", "fp32") or r["error"].startswith(NO_FIT):
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

    lines += _extension(ext, ext_note, chosen)
    return "\n".join(lines) + "\n"


def csrc_part(cuobjdump: str, library: str) -> dict:
    """What kernels.md shows of the built CUDA extension (``csrc.py``)."""
    from . import csrc

    return dict(functions=csrc.functions(cuobjdump, library), model=csrc.model_table(cuobjdump, library),
                fits=csrc.fits(cuobjdump, library))


def _extension(ext: dict | None, note: str, chosen: dict) -> list[str]:
    """The CUDA extension beside the Triton kernels: the issue-time model per op and shape (the
    evidence for AUTO_ORDER until GPU timings exist), its shared memory per case and target,
    and its kernels' resources."""
    from . import csrc

    lines = ["## The CUDA extension (csrc/) beside the Triton kernels", "", note, ""]
    if ext is None:
        return lines
    lines += ["The same issue-time model (sm_90 binaries, H100, bf16, Dh 64), per op: the Triton kernels at their",
              "best configs (above) and the extension's launches (`benchmarks/static/csrc.py`: its grids and",
              "loop counts mirrored from the host code; its row-loading loops counted once, a lower bound). µs;",
              "the op's memory floor is the same for both. mma.sync on sm_90 is counted at the wgmma peak,",
              "which it does not reach: the extension's MMA bound is optimistic.", ""]
    versions = sorted({v for v, _, _ in chosen}, key=lambda v: tuple(map(int, re.findall(r"\d+", v))))
    lines += [f"| shape | op | Triton {' / '.join(versions)}: issue, MUFU, MMA | extension: issue, MUFU, MMA "
              "| memory floor H100 | lower bound: Triton / extension | first in AUTO_ORDER |",
              "|---|---|---|---|---|---|---|"]
    ext_totals = csrc.total(ext["model"])
    for (shape, op), (issue, mufu, mma) in sorted(ext_totals.items()):
        case = aot.CASES[shape]
        op_name, mode = model.OP_BYTES[op]
        floor = model.work.bytes_moved(op_name, model.work.Shape(shape, case.batch, case.frames, case.patches,
                                                                 case.heads * MODEL_HEAD_DIM, case.heads), mode, 2)
        mem = floor / model.H100.bandwidth
        tri = []
        for v in versions:
            rs = [r for (vv, sh, _), r in chosen.items() if (vv, sh, r["op"]) == (v, shape, op)]
            tri.append([sum(getattr(r["h100"], f) for r in rs) for f in ("issue_s", "mufu_s", "mma_s")] if rs else None)
        cells = [_merge([", ".join(_us(x) for x in t) if t else "-" for t in tri])]
        t_bound = max(max(t) for t in tri if t) if any(tri) else float("nan")
        e_bound = max(issue, mufu, mma)
        lines.append(f"| {shape} | {op} | {cells[0]} | {_us(issue)}, {_us(mufu)}, {_us(mma)} | {_us(mem)} | "
                     f"{_us(max(t_bound, mem))} / {_us(max(e_bound, mem))} | "
                     f"{'triton' if t_bound <= e_bound else 'cuda'} |")
    lines += ["", "Its launches at each case (Dh 64 and 128, the head dims it supports; bf16 stands for fp16 too):",
              "dynamic + static shared memory per block, and resident warps per SM on each target it has SASS",
              "for (sm_80's binaries run on sm_86 and sm_89; none for sm_100, sm_120 or AMD: `cuda.why_not` says",
              "so). 0 warps: the launch cannot run there.", "",
              "| case | Dh | dtype | kernel | smem B | warps/SM sm_80 / 86 / 89 / 90 |", "|---|---|---|---|---|---|"]
    for r in ext["fits"]:
        w = r["warps"]
        lines.append(f"| {r['shape']} | {r['head_dim']} | {r['dtype']} | `{r['kernel']}` | {r['smem']:,} | "
                     f"{w['sm_80']} / {w['sm_86']} / {w['sm_89']} / {w['sm_90']} |")
    lines += ["", "Resources of every kernel in the built extension (`cuobjdump --dump-resource-usage`; static shared",
              "memory only, the dynamic part is set at launch, above):", "",
              "| arch | kernel | regs | stack | static smem | local |", "|---|---|---|---|---|---|"]
    for (arch, kernel), (res, _) in sorted(ext["functions"].items()):
        lines.append(f"| {arch} | `{kernel}` | {res.regs} | {res.stack} | {res.shared_static} | {res.local} |")
    return lines
