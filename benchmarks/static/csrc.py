"""The CUDA extension (csrc/) in the static report, beside the Triton kernels.

Launches: a mirror of the host code (bindings.cpp, temporal.cu, spatial.cu, spatial_fp32.cu):
which kernels a call runs, with what grid, threads, dynamic shared memory, and how many times
each block runs its main loop (key or query tiles). Binaries: the built extension's cubins,
sm_80 (which also runs on sm_86 and sm_89) and sm_90a, read with the cuobjdump Triton bundles.
Model: ``model.bounds``, as for the Triton kernels, with the SASS loop of the most instructions
taken as the main loop and every other loop (the row-loading loops of ``load_tile_async`` and
``load_rows_async``, which run several times) counted once per block: a lower bound, like the
others. Memory floors are the ops' (``benchmarks/config.py``).
"""
from __future__ import annotations

import dataclasses
import re
import subprocess

import torch

from timesformer_kernels import devices
from timesformer_kernels.layout import Groups, spatial_groups, temporal_groups

from . import aot, model, sass

SHORT_MAX_SEQ = 32  # attention.h kShortMaxSeq: longer groups (or a cls query) take spatial*.cu
ROW_THREADS, TILE = 256, 16  # rowwise.cuh kThreads, kTile
MMA_THREADS, BLOCK_ROWS = 128, 64  # spatial.cu kThreads, kBlockRows
ARCHS = {"sm_80": "sm_80", "sm_90": "sm_90a"}  # table target -> the arch the extension is built for
_T = {torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float32: "float"}


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str  # as demangled, without namespaces and arguments: "spatial_fwd_kernel<__nv_bfloat16, 64>"
    op: str  # "temporal fwd", "spatial bwd", ...
    blocks: int
    threads: int
    smem: int  # dynamic shared memory per block, bytes
    trips: int  # main-loop iterations per block


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pitch(dh: int) -> int:
    return dh + 8  # spatial.cu pitch(): +16 bytes a row against bank conflicts


def launches(groups: Groups, dtype: torch.dtype, op: str) -> list[Launch]:
    """The kernels one forward and backward of an op call launch (head dims 64 and 128)."""
    dh, h = groups.head_dim, groups.num_heads
    bgs = groups.batch * groups.num_groups
    sq, sk = groups.seq_len + int(groups.cls_query), groups.seq_len + int(groups.cls_key)
    size = 4 if dtype == torch.float32 else 2
    lanes = dh // (16 // size)  # rowwise::Shape: one 16-byte vector per lane
    units = ROW_THREADS // lanes
    t = _T[dtype]
    out = []
    if not groups.cls_query and groups.seq_len <= SHORT_MAX_SEQ:  # temporal.cu, both directions
        hc = min(h, units // sq) if sq <= units else 1
        qb, kb = units // hc, min(TILE, sk)
        out.append(Launch(f"temporal_fwd_kernel<{t}, {dh}>", f"{op} fwd", _cdiv(sq, qb) * _cdiv(h, hc) * bgs,
                          ROW_THREADS, 2 * kb * hc * dh * size, _cdiv(sk, kb)))
        hc = max(1, min(h, units // max(sq, 1)))

        def smem_of(c):
            return c * dh * size * (3 * sq + 2 * sk) + c * sq * (2 * sk + 1) * 4

        while hc > 1 and smem_of(hc) > 96 * 1024:
            hc -= 1
        out.append(Launch(f"temporal_bwd_kernel<{t}, {dh}>", f"{op} bwd", _cdiv(h, hc) * bgs, ROW_THREADS,
                          smem_of(hc), _cdiv(sq * hc, units)))
        return out
    rowdot_lanes = dh // (16 // size)
    rowdots = [Launch(f"bwd_rowdot_kernel<{t}, {dh}>", f"{op} bwd", _cdiv(n * rowdot_lanes, 256), 256, 0, 1)
               for n in [bgs * groups.seq_len * h] + ([bgs * h] if groups.cls_query else [])]
    if dtype == torch.float32:  # the CUDA-core kernels: temporal.cu's forward, spatial_fp32.cu's backward
        out.append(Launch(f"temporal_fwd_kernel<{t}, {dh}>", f"{op} fwd", _cdiv(sq, units) * h * bgs, ROW_THREADS,
                          2 * TILE * dh * size, _cdiv(sk, TILE)))
        out += rowdots
        out.append(Launch(f"spatial_bwd_dkdv_fp32_kernel<{dh}>", f"{op} bwd", _cdiv(sk, units) * h * bgs,
                          ROW_THREADS, 0, _cdiv(sq, TILE)))
        out.append(Launch(f"spatial_bwd_dq_fp32_kernel<{dh}>", f"{op} bwd", _cdiv(sq, units) * h * bgs,
                          ROW_THREADS, 0, _cdiv(sk, TILE)))
        return out
    block_n = 64
    out.append(Launch(f"spatial_fwd_kernel<{t}, {dh}>", f"{op} fwd", _cdiv(sq, BLOCK_ROWS) * h * bgs, MMA_THREADS,
                      (BLOCK_ROWS + 4 * block_n) * _pitch(dh) * 2, _cdiv(sk, block_n)))
    out += rowdots
    block_m = 32 if dh == 128 else 64
    out.append(Launch(f"spatial_bwd_dkdv_kernel<{t}, {dh}>", f"{op} bwd", _cdiv(sk, BLOCK_ROWS) * h * bgs,
                      MMA_THREADS, (2 * BLOCK_ROWS + 4 * block_m) * _pitch(dh) * 2 + 4 * block_m * 4,
                      _cdiv(sq, block_m)))
    out.append(Launch(f"spatial_bwd_dq_kernel<{t}, {dh}>", f"{op} bwd", _cdiv(sq, BLOCK_ROWS) * h * bgs,
                      MMA_THREADS, (2 * BLOCK_ROWS + 4 * block_m) * _pitch(dh) * 2, _cdiv(sk, block_m)))
    return out


def case_launches(case: aot.Case, head_dim: int, dtype: torch.dtype) -> list[Launch]:
    """Both ops of a case (temporal on the patch rows, spatial when the model has it)."""
    b, t, n, h = case.batch, case.frames, case.patches, case.heads
    calls = [("temporal", temporal_groups(b, int(case.cls_key) + n * t, t, h, head_dim, case.token_order,
                                          case.cls_key))] if case.temporal else []
    if case.spatial:
        calls.append(("spatial", spatial_groups(b, 1 + n * t, t, h, head_dim, case.token_order)))
    return [la for op, groups in calls for la in launches(groups, dtype, op)]


def _demangle(names: list[str]) -> dict[str, str]:
    text = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    pretty = {}
    for raw, nice in zip(names, text.splitlines()):
        nice = nice.replace("(anonymous namespace)::", "").removeprefix("void ").split("(")[0]
        pretty[raw] = re.sub(r"^[\w:]*::", "", nice)  # drop the namespaces, keep the template arguments
    return pretty


def functions(cuobjdump: str, library: str) -> dict[tuple[str, str], tuple[sass.Resources, list]]:
    """(arch, kernel) -> (resources, SASS instructions) of every kernel in the built extension."""
    found = {}
    for arch in sorted(set(ARCHS.values())):
        text = sass.run_tool(cuobjdump, "--dump-sass", "--gpu-architecture", arch, library)
        res_text = sass.run_tool(cuobjdump, "--dump-resource-usage", "--gpu-architecture", arch, library)
        parts = re.split(r"\n\s*Function : (\S+)\n", text)
        names = parts[1::2]
        pretty = _demangle(names)
        resources = {}
        name = None
        for line in res_text.splitlines():
            if m := re.search(r"Function (\S+?):", line):
                name = m.group(1)
            elif (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)) and name:
                resources[name] = sass.Resources(*map(int, m.groups()))
        for raw, body in zip(names, parts[2::2]):
            found[(arch, pretty[raw])] = (resources[raw], sass.parse_sass(body))
    return found


def bounds(launch: Launch, resources: sass.Resources, instrs: list, device: model.Device) -> model.Bounds:
    """The issue-time model of one launch (module docstring); memory is left to the op's floor."""
    parts = sass.split(instrs)
    straight = len(instrs) - len(parts.body)  # other loops once per block
    mufu = sass.count(instrs, "MUFU")
    flops = sum(sass.mma_flops(i) for i in instrs)
    body_flops = sum(sass.mma_flops(i) for i in parts.body)
    counts = model.Counts(straight, len(parts.body), mufu - sass.count(parts.body, "MUFU"),
                          sass.count(parts.body, "MUFU"), float(flops - body_flops), float(body_flops), False)
    return model.bounds(counts, launch.threads // 32, launch.blocks, launch.blocks * launch.trips, 0.0, device)


def occupancy(launch: Launch, resources: sass.Resources, target: devices.Target) -> tuple[int, str]:
    return model.occupancy(target, resources.regs, launch.threads // 32, launch.smem + resources.shared_static)


def model_table(cuobjdump: str, library: str, cases=("base", "hr"), head_dim: int = 64,
                dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Per (case, op): the extension's launches on sm_90 (sm_90a binaries) with their bounds on
    the H100 model, and the op's memory floors."""
    funcs = functions(cuobjdump, library)
    rows = []
    for name in cases:
        case = aot.CASES[name]
        for la in case_launches(case, head_dim, dtype):
            res, instrs = funcs[(ARCHS["sm_90"], la.kernel)]
            warps, limit = occupancy(la, res, devices.TARGETS["sm_90"])
            rows.append(dict(shape=name, op=la.op, kernel=la.kernel, blocks=la.blocks, regs=res.regs,
                             stack=res.stack, smem=la.smem + res.shared_static, warps_per_sm=warps,
                             h100=bounds(la, res, instrs, model.H100)))
    return rows


def fits(cuobjdump: str, library: str, cases=tuple(aot.CASES), head_dims=(64, 128)) -> list[dict]:
    """Per (case, head dim, dtype, kernel): the dynamic + static shared memory of its launch and
    the targets it fits, for the archs the extension carries SASS for (sm_80's runs on sm_86 and
    sm_89; sm_100 and sm_120 get none: cuda.why_not says so)."""
    funcs = functions(cuobjdump, library)
    rows = []
    for name in cases:
        for dh in head_dims:
            for dtype in (torch.bfloat16, torch.float32):
                for la in case_launches(aot.CASES[name], dh, dtype):
                    cells = {}
                    for target in ("sm_80", "sm_86", "sm_89", "sm_90"):
                        arch = ARCHS["sm_90" if target == "sm_90" else "sm_80"]
                        res, _ = funcs[(arch, la.kernel)]
                        cells[target] = occupancy(la, res, devices.TARGETS[target])[0]
                    rows.append(dict(shape=name, head_dim=dh, dtype=str(dtype).removeprefix("torch."),
                                     kernel=la.kernel, smem=la.smem, warps=cells))
    return rows


def total(rows: list[dict]) -> dict[tuple, list[float]]:
    """(shape, op) -> summed [issue, MUFU, MMA] bounds in seconds."""
    out: dict[tuple, list[float]] = {}
    for r in rows:
        acc = out.setdefault((r["shape"], r["op"]), [0.0, 0.0, 0.0])
        for i, f in enumerate(("issue_s", "mufu_s", "mma_s")):
            acc[i] += getattr(r["h100"], f)
    return out

