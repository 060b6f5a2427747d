"""The sweep: compile every (shape, dtype, head dim, target) launch set for every kept config,
read each cubin, and turn it into one CSV row. Runs in worker processes (``jobs``)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile

from . import aot, model, sass

CSV_FIELDS = [
    "triton", "shape", "kernel", "op", "config", "target", "dtype", "head_dim", "error",
    "regs", "stack", "local", "spill_stores", "spill_loads", "smem", "smem_dynamic", "smem_static", "warps",
    "stages", "warps_per_sm", "occupancy_limit", "mma", "mma_dup", "loop_ldg", "loop_ldgsts", "loop_tma",
    "loop_stg", "sass_loops", "source_loops", "prologue", "body", "epilogue", "mufu_straight", "mufu_body",
    "mma_flops_straight", "mma_flops_body", "tf32", "programs", "iterations", "min_bytes",
]

# Shapes: name -> (B, T, N, H). Head dims other than 64 keep H = 12 (D = 12 · Dh).
SHAPES = {"base": (8, 8, 196, 12), "hr": (4, 16, 784, 12)}

_DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot)\s.*?:\s*\S*?<(\d+)x(\d+)x\w+.*->\s*tensor<(\d+)x(\d+)x")


@dataclasses.dataclass(frozen=True)
class Job:
    shape: str
    dtype: str
    head_dim: int
    target: str


def config_label(config) -> str:
    meta = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in config.kwargs.items())
    return f"{meta} w{config.num_warps} s{config.num_stages}".strip()


def _sizes(counts: dict[int, int]) -> str:
    """'16Bx12 4Bx2' (widest first), '' if none."""
    return " ".join(f"{b}Bx{n}" if b else f"x{n}" for b, n in sorted(counts.items(), reverse=True))


def _ttgir_dot_flops(ttgir: str) -> int:
    """FLOPs of the dot ops of the TTGIR, each counted once (M·N·K·2 per program)."""
    total = 0
    for m in _DOT.finditer(ttgir):
        _, k, rows, cols = map(int, m.groups())
        total += 2 * rows * cols * k
    return total


def analyse(compiled: aot.Compiled, target: str, tools: dict) -> dict:
    """Resources, occupancy, hot-loop features and issue-model counts of one compiled kernel."""
    kernel = compiled.kernel
    name = kernel.metadata.name
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = sass.resources(tools["cuobjdump"], path)[name]
        instrs = sass.parse_sass(sass.run_tool(tools["cuobjdump"], "--dump-sass", path))
    parts = sass.split(instrs)
    hot = parts.body or instrs
    straight = parts.prologue + parts.epilogue
    warps = kernel.metadata.num_warps
    smem = kernel.metadata.shared + res.shared_static
    warps_per_sm, limit = model.occupancy(model.LIMITS[target], res.regs, warps, smem)
    mem = sass.memory_ops(hot)
    executed = sum(sass.mma_flops(i) for i in instrs) * warps
    dots = _ttgir_dot_flops(kernel.asm["ttgir"])
    return dict(
        regs=res.regs, stack=res.stack, local=res.local, spill_stores=sass.count(instrs, "STL"),
        spill_loads=sass.count(instrs, "LDL"), smem=smem, smem_dynamic=kernel.metadata.shared,
        smem_static=res.shared_static, warps=warps, stages=kernel.metadata.num_stages,
        warps_per_sm=warps_per_sm, occupancy_limit=limit, mma=sass.mma_kind(hot),
        mma_dup=round(executed / dots, 2) if dots else "",
        loop_ldg=_sizes(mem["ldg"]), loop_ldgsts=_sizes(mem["ldgsts"]), loop_tma=_sizes(mem["tma"]),
        loop_stg=_sizes(mem["stg"]), sass_loops=parts.n_loops, prologue=len(parts.prologue), body=len(parts.body),
        epilogue=len(parts.epilogue), mufu_straight=sass.count(straight, "MUFU"),
        mufu_body=sass.count(parts.body, "MUFU"),
        mma_flops_straight=sum(sass.mma_flops(i) for i in straight),
        mma_flops_body=sum(sass.mma_flops(i) for i in parts.body),
        tf32=any(sass.is_tf32(i) for i in instrs),
    )


_LAUNCHES: dict = {}  # per worker process: (shape, dtype, head_dim, target) -> recorded launches


def largest(configs: list) -> list:
    """The config with the largest tiles (BLOCK_* product), then the most stages and other
    meta-parameters: the one most likely to spill or overflow shared memory."""
    def size(c):
        blocks = math.prod(v for k, v in c.kwargs.items() if k.startswith("BLOCK"))
        rest = math.prod(v for k, v in c.kwargs.items() if not k.startswith("BLOCK") and isinstance(v, int))
        return blocks, c.num_stages, rest, c.num_warps
    return [max(configs, key=size)]


def run_job(job: Job, tools: dict, largest_only: bool = False) -> list[dict]:
    """CSV rows of every kernel and kept config of one (shape, dtype, head dim, target);
    with ``largest_only`` only each kernel's ``largest`` config."""
    import triton

    b, t, n, h = SHAPES[job.shape]
    key = (job.shape, job.dtype, job.head_dim, job.target)
    if key not in _LAUNCHES:
        _LAUNCHES[key] = aot.record_launches(b, t, n, h, job.head_dim, aot.DTYPES[job.dtype], aot.TARGETS[job.target])
    shape = model.work.Shape(job.shape, b, t, n, h * job.head_dim, h)
    itemsize = aot.DTYPES[job.dtype].itemsize
    rows = []
    for launch in _LAUNCHES[key]:
        km = model.KERNELS.get(launch.name)
        kept = aot.configs(launch, aot.TARGETS[job.target])
        for config in largest(kept) if largest_only else kept:
            row = dict(triton=triton.__version__, shape=job.shape, kernel=launch.name,
                       op=km.op if km else "", config=config_label(config), target=job.target, dtype=job.dtype,
                       head_dim=job.head_dim, source_loops=aot.source_loops(launch.jit))
            try:
                compiled = aot.compile_launch(launch, config, aot.TARGETS[job.target])
            except Exception as e:  # a kernel that fails to compile is a finding, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                rows.append(row)
                continue
            row.update(analyse(compiled, job.target, tools))
            row["programs"] = compiled.grid[0] * compiled.grid[1] * compiled.grid[2]
            if km:
                row["iterations"] = km.iterations(compiled.bound, compiled.grid)
                row["min_bytes"] = km.min_bytes(shape, itemsize)
            rows.append(row)
    return rows
