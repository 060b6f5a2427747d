"""The sweep: compile the launches of every case for every (dtype, head dim, target) with every
config the kernels' pruning keeps, read each binary, and turn it into CSV rows. A binary is
compiled once however many cases launch it (``aot.Prepared.key``: what Triton's own cache keys
on), and a launch whose pruning keeps no config gets a row saying so. Runs in worker
processes, one job per (dtype, head dim, target)."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import tempfile

from timesformer_kernels import devices
from timesformer_kernels.backends import DoesNotFit
from timesformer_kernels.triton import tuning

from . import aot, model, sass

CSV_FIELDS = [
    "triton", "shape", "kernel", "op", "config", "target", "dtype", "head_dim", "binary", "error",
    "regs", "stack", "local", "spill_stores", "spill_loads", "smem", "smem_dynamic", "smem_static", "warps",
    "stages", "warps_per_sm", "occupancy_limit", "mma", "mma_dup", "loop_ldg", "loop_ldgsts", "loop_tma",
    "loop_stg", "sass_loops", "source_loops", "prologue", "body", "epilogue", "mufu_straight", "mufu_body",
    "mma_flops_straight", "mma_flops_body", "tf32", "programs", "iterations", "min_bytes",
]
NO_FIT = "no fitting config"  # the error of a launch whose pruning keeps nothing (routed to a fallback)
MODEL_CASES = ("base", "hr")  # the shapes of the issue-time model (benchmarks/config.py's work model)

_DOT = re.compile(r"(?:tt\.dot|ttng\.warp_group_dot)\s.*?:\s*\S*?<(\d+)x(\d+)x\w+.*->\s*tensor<(\d+)x(\d+)x")


@dataclasses.dataclass(frozen=True)
class Job:
    dtype: str
    head_dim: int
    target: str
    cases: tuple[str, ...]


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


# (target, dtype, head dim) of the jobs whose SASS is read too: the issue model's and the fast
# path's resource tables; the others get resources only (what the failures need: reading SASS
# is most of a cached compile's time).
FULL_JOBS = {(t, d, 64) for t in ("sm_90", "sm_80") for d in ("bf16", "fp32")}


def analyse(compiled: aot.Compiled, target: str, tools: dict, full: bool = True) -> dict:
    """Resources, occupancy, and with ``full`` hot-loop features and issue-model counts of one
    compiled kernel."""
    kernel = compiled.kernel
    name = kernel.metadata.name
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = sass.resources(tools["cuobjdump"], path)[name]
        instrs = sass.parse_sass(sass.run_tool(tools["cuobjdump"], "--dump-sass", path)) if full else []
    warps = kernel.metadata.num_warps
    smem = kernel.metadata.shared + res.shared_static
    warps_per_sm, limit = model.occupancy(devices.TARGETS[target], res.regs, warps, smem)
    row = dict(regs=res.regs, stack=res.stack, local=res.local, smem=smem, smem_dynamic=kernel.metadata.shared,
               smem_static=res.shared_static, warps=warps, stages=kernel.metadata.num_stages,
               warps_per_sm=warps_per_sm, occupancy_limit=limit)
    if not full:
        return row
    parts = sass.split(instrs)
    hot = parts.body or instrs
    straight = parts.prologue + parts.epilogue
    mem = sass.memory_ops(hot)
    executed = sum(sass.mma_flops(i) for i in instrs) * warps
    dots = _ttgir_dot_flops(kernel.asm["ttgir"])
    return dict(
        row, spill_stores=sass.count(instrs, "STL"), spill_loads=sass.count(instrs, "LDL"), mma=sass.mma_kind(hot),
        mma_dup=round(executed / dots, 2) if dots else "",
        loop_ldg=_sizes(mem["ldg"]), loop_ldgsts=_sizes(mem["ldgsts"]), loop_tma=_sizes(mem["tma"]),
        loop_stg=_sizes(mem["stg"]), sass_loops=parts.n_loops, prologue=len(parts.prologue), body=len(parts.body),
        epilogue=len(parts.epilogue), mufu_straight=sass.count(straight, "MUFU"),
        mufu_body=sass.count(parts.body, "MUFU"),
        mma_flops_straight=sum(sass.mma_flops(i) for i in straight),
        mma_flops_body=sum(sass.mma_flops(i) for i in parts.body),
        tf32=any(sass.is_tf32(i) for i in instrs),
    )


_AMD = {name: re.compile(pattern) for name, pattern in (
    ("vgprs", r"; NumVgprs: (\d+)"), ("agprs", r"; NumAgprs: (\d+)"), ("scratch", r"; ScratchSize: (\d+)"),
    ("waves", r"; Occupancy: (\d+)"), ("vgpr_spills", r"\.vgpr_spill_count:\s+(\d+)"),
    ("sgpr_spills", r"\.sgpr_spill_count:\s+(\d+)"), ("lds", r"\.group_segment_fixed_size:\s+(\d+)"))}


def analyse_amd(compiled: aot.Compiled, target: str) -> dict:
    """Resources of one AMD (hsaco) kernel from the compiler's own notes in its amdgcn text:
    registers = arch VGPRs + AGPRs per lane, stack = scratch bytes per lane (VGPR spills to
    memory; SGPR spills go to VGPR lanes and cost no memory), smem = LDS, warps/SM = waves per
    CU (the compiler's occupancy per SIMD x 4 SIMDs; 0 when the LDS does not fit)."""
    kernel = compiled.kernel
    text = kernel.asm["amdgcn"]
    got = {name: int(m.group(1)) if (m := pattern.search(text)) else 0 for name, pattern in _AMD.items()}
    smem = kernel.metadata.shared + got["lds"]
    fits = smem <= devices.TARGETS[target].smem_per_block
    return dict(regs=got["vgprs"] + got["agprs"], stack=got["scratch"], local=got["scratch"],
                spill_stores=got["vgpr_spills"], spill_loads="", smem=smem, smem_dynamic=kernel.metadata.shared,
                smem_static=got["lds"], warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages,
                warps_per_sm=4 * got["waves"] if fits else 0, occupancy_limit="compiler" if fits else "smem",
                mma="mfma" if "v_mfma" in text else "none")


def largest(configs: list) -> list:
    """The config with the largest tiles (BLOCK_* product), then the most stages and other
    meta-parameters: the one most likely to spill or overflow shared memory."""
    def size(c):
        blocks = math.prod(v for k, v in c.kwargs.items() if k.startswith("BLOCK"))
        rest = math.prod(v for k, v in c.kwargs.items() if not k.startswith("BLOCK") and isinstance(v, int))
        return blocks, c.num_stages, rest, c.num_warps
    return [max(configs, key=size)]


def _compile(prepared: aot.Prepared, target: str, tools: dict, full: bool) -> dict:
    """The analysis of one binary, or its compile error (a finding, not a crash)."""
    try:
        compiled = aot.compile_prepared(prepared)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    if devices.TARGETS[target].vendor == "hip":
        return analyse_amd(compiled, target)
    return analyse(compiled, target, tools, full)


def run_job(job: Job, tools: dict, largest_only: bool = False, every: bool = False) -> list[dict]:
    """CSV rows of every case, kernel and kept config of one (dtype, head dim, target); with
    ``largest_only`` only each kernel's ``largest`` config, with ``every`` every config of its pool
    whatever the target (``tuning.every_config``: the evidence of pools.py). Each distinct binary
    is compiled once."""
    with tuning.every_config() if every else contextlib.nullcontext(), _precision(job.dtype):
        return _run_job(job, tools, largest_only)


@contextlib.contextmanager
def _precision(dtype: str):
    """torch's float32 matmul precision for a sweep dtype (aot.PRECISIONS; others leave it)."""
    import torch

    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(aot.PRECISIONS.get(dtype, saved))
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _run_job(job: Job, tools: dict, largest_only: bool) -> list[dict]:
    import triton

    dtype = aot.DTYPES[job.dtype]
    gpu_target = aot.TARGETS[job.target]
    binaries: dict[tuple, dict] = {}
    rows = []
    for name in job.cases:
        case = aot.CASES[name]
        shape = model.work.Shape(name, case.batch, case.frames, case.patches, case.heads * job.head_dim, case.heads)
        for launch in aot.record_launches(case, job.head_dim, dtype, job.target):
            km = model.KERNELS.get(launch.name)
            base = dict(triton=triton.__version__, shape=name, kernel=launch.name, op=km.op if km else "",
                        target=job.target, dtype=job.dtype, head_dim=job.head_dim,
                        source_loops=aot.source_loops(launch.jit))
            try:
                kept = aot.configs(launch, job.target)
            except DoesNotFit as e:
                rows.append({**base, "error": f"{NO_FIT}: {e}"})
                continue
            for config in largest(kept) if largest_only else kept:
                prepared = aot.prepare(launch, config, gpu_target)
                key = prepared.key
                if key not in binaries:
                    binaries[key] = _compile(prepared, job.target, tools,
                                             (job.target, job.dtype, job.head_dim) in FULL_JOBS)
                row = {**base, "config": config_label(config), **binaries[key],
                       "binary": hashlib.sha1(repr(key).encode()).hexdigest()[:12],
                       "programs": math.prod(prepared.grid)}
                if km and name in MODEL_CASES:
                    row["iterations"] = km.iterations(prepared.bound, prepared.grid)
                    row["min_bytes"] = km.min_bytes(shape, dtype.itemsize)
                rows.append(row)
    return rows
