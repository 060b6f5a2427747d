"""Occupancy per target, and the issue-time model of issue 13: lower-bound times of a kernel at a
shape from its SASS, beside its memory floor.

    issue  = warps · (programs · (prologue + epilogue) + loop iterations · body) / (SMs · 4 · clock)
    MUFU   = the same count of MUFU instructions · 32 lanes / (16 per clock per SM · SMs · clock)
    MMA    = executed MMA FLOPs (from the HGMMA/HMMA instructions, padding and duplicates
             included) / the bf16 matmul peak (TF32 at half of it)
    memory = counted bytes / copy bandwidth

``loop iterations`` is the source loop's trip count summed over the grid (``KERNELS``); the SASS
loop found by its backward branch is taken to run once per source iteration (no unrolling or
peeling of the hot loop, which ``n_loops`` and the source's loop count let the report check).
"""
from __future__ import annotations

import dataclasses
import math

from benchmarks import config as work
from timesformer_kernels import devices
from timesformer_kernels.triton.spatial import WIDE_HEAD_DIM


SMEM_RESERVED = 1024  # the driver's per-block reservation of shared memory (NVIDIA)


def occupancy(target: devices.Target, regs: int, warps: int, smem: int) -> tuple[int, str]:
    """(resident warps per SM, what limits it), by the CUDA occupancy calculator's rules on the
    device table's limits: registers are allocated per warp in units of 256 from each of the 4
    SM sub-partitions; shared memory per block plus the reservation. 0 warps: the block's
    shared memory exceeds the target's, it cannot launch. (On AMD the compiler's own occupancy
    is used instead, see sweep.analyse_amd.)"""
    if smem > target.smem_per_block:
        return 0, "smem"
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by = {"regs": (target.regs_per_sm // 4 // regs_per_warp) * 4 // warps,
          "warps": target.max_warps_per_sm // warps,
          "blocks": target.max_blocks_per_sm,
          "smem": target.smem_per_sm // (smem + SMEM_RESERVED)}
    limiter = min(by, key=by.get)
    return by[limiter] * warps, limiter


@dataclasses.dataclass(frozen=True)
class Device:
    """The issue model's machine (issue 13 §1; copy bandwidth and matmul peak measured, gpu.md)."""

    name: str
    sms: int = 132
    clock_hz: float = 1.755e9
    bandwidth: float = 3.0e12
    mma_flops: float = 790e12  # dense bf16/fp16; TF32 at half
    mufu_per_clock: int = 16  # per SM
    issue_per_clock: int = 4  # one warp instruction per sub-partition


H100 = Device("H100")
H200 = Device("H200", bandwidth=4.3e12)


def _temporal_iters(a: dict, grid: tuple) -> int:
    """``for h in range(h_begin, min(h_begin + HEADS, H))``: every program of a group tile runs
    its head block's heads, H in all per tile (grid x = head blocks x tiles, y·z = clips)."""
    head_blocks = math.ceil(a["H"] / a["HEADS"])
    return a["H"] * (grid[0] // head_blocks) * grid[1] * grid[2]


def _key_loop_iters(a: dict, grid: tuple) -> int:
    """``for start_n in range(0, whole, BLOCK_N)`` over the whole key blocks in every program;
    the peeled, masked last block is straight code (counted once per program, even where
    seq_len is a multiple of BLOCK_N and it is skipped). BLOCK_D = 256 does not peel: every
    block is a loop iteration."""
    keys = a["seq_len"] + a["HAS_CLS_KEY"]  # the cls key is key 0 of the loop
    if a["BLOCK_D"] > WIDE_HEAD_DIM:
        return math.prod(grid) * math.ceil(keys / a["BLOCK_N"])
    return math.prod(grid) * (keys // a["BLOCK_N"])


def _masked_key_loop_iters(a: dict, grid: tuple) -> int:
    """The whole-group backward's key loop: every block, the last one masked, in the loop."""
    return math.prod(grid) * math.ceil((a["seq_len"] + a["HAS_CLS_KEY"]) / a["BLOCK_N"])


def _query_loop_iters(a: dict, grid: tuple) -> int:
    return math.prod(grid) * math.ceil(a["seq_len"] / a["BLOCK_M"])


def _spatial_dq_bytes(shape: work.Shape, s: int) -> float:
    """dQ kernel: reads qkv (all 1 + P rows), out and dout (P + T rows with the cls outputs),
    writes dq (1 + P rows); lse/delta (fp32 per row and head) not counted, as in config.py."""
    p, t = shape.patches * shape.frames, shape.frames
    return float(3 * (1 + p) + 2 * (p + t) + (1 + p)) * shape.batch * shape.dim * s


def _spatial_dkdv_bytes(shape: work.Shape, s: int) -> float:
    """dK/dV kernel: reads qkv and dout, writes dk and dv."""
    p, t = shape.patches * shape.frames, shape.frames
    return float(3 * (1 + p) + (p + t) + 2 * (1 + p)) * shape.batch * shape.dim * s


@dataclasses.dataclass(frozen=True)
class KernelModel:
    op: str  # the op row it belongs to, e.g. "spatial bwd"
    iterations: object  # (bound args, grid) -> loop iterations summed over the grid
    min_bytes: object  # (Shape, itemsize) -> bytes this kernel must move


# One entry per kernel, by the name of its @triton.jit function. A kernel missing here still
# gets its resources reported; its issue model says why it has none.
KERNELS = {
    "_temporal_fwd_kernel": KernelModel("temporal fwd", _temporal_iters,
                                        lambda sh, s: work.bytes_moved("temporal", sh, "fwd", s)),
    "_temporal_bwd_kernel": KernelModel("temporal bwd", _temporal_iters,
                                        lambda sh, s: work.bytes_moved("temporal", sh, "bwd", s)),
    "_spatial_fwd_kernel": KernelModel("spatial fwd", _key_loop_iters,
                                       lambda sh, s: work.bytes_moved("spatial", sh, "fwd", s)),
    "_spatial_bwd_dq_kernel": KernelModel("spatial bwd", _key_loop_iters, _spatial_dq_bytes),
    "_spatial_bwd_dkdv_kernel": KernelModel("spatial bwd", _query_loop_iters, _spatial_dkdv_bytes),
    "_spatial_bwd_group_kernel": KernelModel("spatial bwd", _masked_key_loop_iters,
                                             lambda sh, s: work.bytes_moved("spatial", sh, "bwd", s)),
}
OP_BYTES = {"temporal fwd": ("temporal", "fwd"), "temporal bwd": ("temporal", "bwd"),
            "spatial fwd": ("spatial", "fwd"), "spatial bwd": ("spatial", "bwd")}


@dataclasses.dataclass(frozen=True)
class Counts:
    """Per-warp static counts of one compiled kernel (from ``sass.split``)."""

    straight: int  # prologue + epilogue instructions
    body: int  # hot-loop instructions
    mufu_straight: int
    mufu_body: int
    mma_straight: float  # FLOPs per warp
    mma_body: float
    tf32: bool


@dataclasses.dataclass(frozen=True)
class Bounds:
    issue_s: float
    mufu_s: float
    mma_s: float
    memory_s: float  # on this device

    @property
    def highest(self) -> str:
        named = {"issue": self.issue_s, "MUFU": self.mufu_s, "MMA": self.mma_s, "memory": self.memory_s}
        return max(named, key=named.get)

    @property
    def time_s(self) -> float:
        return max(self.issue_s, self.mufu_s, self.mma_s, self.memory_s)


def bounds(counts: Counts, warps: int, programs: int, iterations: int, min_bytes: float, dev: Device) -> Bounds:
    """The four lower bounds of one kernel launch (module docstring)."""
    def total(straight, body):
        return warps * (programs * straight + iterations * body)

    clocks = dev.sms * dev.clock_hz
    peak = dev.mma_flops / (2 if counts.tf32 else 1)
    return Bounds(issue_s=total(counts.straight, counts.body) / (dev.issue_per_clock * clocks),
                  mufu_s=32 * total(counts.mufu_straight, counts.mufu_body) / (dev.mufu_per_clock * clocks),
                  mma_s=total(counts.mma_straight, counts.mma_body) / peak,
                  memory_s=min_bytes / dev.bandwidth)
