"""Autotune pools of the Triton kernels (see ``tuning.py``), from compiler evidence.

Pools are keyed by (BLOCK_D class, operand class): BLOCK_D 16-64 share the 64 pool (head dims
8-64: TimeSformer's 64, AnimateDiff's 40), 128 (72-128: 80, Latte's 72), 256 (136-256: 160);
operands 16-bit, float32 as three TF32 products ("32x3": precision "highest" on NVIDIA) or
float32 in one product (32: "high" and "medium"). A row is (meta-parameters..., num_warps,
num_stages, {MMA kind: KB of shared memory}): the kinds it compiles for without spilling (in
every case, head dim and dtype of its class), and its largest shared memory there, in KB
(1,024 B) rounded up; a comment names the kinds where it spills. The full sweep
(``benchmarks/results/static/``) compiles every kept row for every target under Triton 3.6 and
3.8 and fails a row that spills or takes more shared memory than its entry says.

Kinds: S = mma.sync (sm_80, sm_86, sm_89, sm_120: operands in registers), W = wgmma (sm_90),
T = tcgen05 (sm_100). None is kept for MFMA (gfx942): ROCm is not offered (``tuning.ROCM``).
A target's name overrides its kind: ``"sm_86": None`` where the entry spills there alone;
``"masked": None`` where it spills only at head dims below its BLOCK_D (40, 80, 160).
"""
from __future__ import annotations

import torch

from .tuning import Entry, entries

S, W, T = "mma.sync", "wgmma", "tcgen05"


def key(block_d: int, dtype: torch.dtype, precision: str) -> tuple[int, int | str]:
    """The pool of a launch: (BLOCK_D class, operand class): 16 (fp16/bf16), "32x3" (float32 as
    three TF32 products, ``target.dot_precision``'s "highest" on NVIDIA) or 32 (one product:
    TF32, or float32 MFMA on AMD; float64 runs only interpreted and counts as 32)."""
    if dtype.itemsize == 2:
        return max(64, block_d), 16
    return max(64, block_d), "32x3" if precision == "tf32x3" else 32


def _pool(names, rows) -> list[Entry]:
    return entries(names, [(*row[:-1], {kind: kb if kb is None else kb * 1024 for kind, kb in row[-1].items()})
                           for row in rows])


_MN = ("BLOCK_M", "BLOCK_N")
_MH = ("BLOCK_M", "HEADS")
_N = ("BLOCK_N",)

# Written by `python -m benchmarks.static.pools` from `--all-configs` sweeps under Triton 3.8
# (benchmarks/results/static/evidence/: sm_80, sm_90, sm_100; bf16, fp32, tf32; head dims 64, 128,
# 256; every case), corrected where the sweep of the kept configs under 3.6 and 3.8 found one
# spilling or above its entry at another head dim (the comments say which).
SPATIAL_FWD: dict[tuple, list[Entry]] = {
    (64, 16): _pool(_MN, [
        (256, 64, 8, 2, {W: 65, T: 66}),  # not clean: S
        (128, 64, 4, 3, {W: 65}),  # not clean: S, T
        (128, 64, 8, 3, {S: 49, W: 65, T: 66}),
        (128, 128, 8, 3, {S: 81, W: 113, T: 114}),
        (128, 128, 8, 2, {S: 49, W: 81, T: 82}),
        (128, 64, 8, 4, {S: 65, W: 81, T: 82}),
        (64, 64, 4, 3, {S: 41, W: 57, T: 58}),
        (64, 128, 4, 3, {S: 72, W: 105, T: 106, 'sm_120': None}),
        (64, 64, 4, 4, {S: 57, W: 73, T: 74}),
    ]),
    (128, 16): _pool(_MN, [
        (128, 64, 8, 3, {W: 129, T: 130}),  # not clean: S
        (128, 128, 8, 2, {W: 161, T: 162}),  # not clean: S
        (128, 64, 8, 4, {W: 161, T: 162}),  # not clean: S
        (64, 64, 4, 3, {W: 113, T: 114}),  # not clean: S
        (64, 64, 4, 4, {W: 145, T: 146}),  # not clean: S
        (128, 32, 8, 2, {S: 48, W: 65, T: 66, 'sm_86': None, 'sm_89': None, 'sm_120': None}),
        (64, 64, 8, 2, {S: 56, W: 81, T: 82, 'sm_120': None}),
        (32, 64, 4, 2, {S: 45, W: 45, T: 45}),
        (32, 32, 4, 2, {S: 27, W: 27, T: 27}),
    ]),
    (256, 16): _pool(_MN, [
        (128, 32, 8, 2, {W: 129, T: 130}),  # not clean: S
        (64, 32, 4, 2, {T: 98}),  # not clean: S, W
        (32, 32, 4, 2, {S: 50, W: 51, T: 51}),
    ]),
    (64, '32x3'): _pool(_MN, [
        (64, 16, 4, 2, {S: 44, W: 49, T: 18, 'sm_86': None, 'sm_89': None, 'sm_120': None}),
        (16, 32, 4, 2, {S: 37, W: 37, T: 37}),
        (128, 32, 8, 2, {W: 97, T: 34}),  # not clean: S
        (64, 32, 4, 3, {W: 81, T: 50}),  # not clean: S
        (128, 16, 8, 2, {W: 81, T: 18}),  # not clean: S
    ]),
    (128, '32x3'): _pool(_MN, [
        (16, 16, 8, 2, {T: 43, 'masked': None}),  # not clean: S, W
        (16, 32, 8, 2, {'masked': None}),  # not clean: S, T, W
    ]),
    (256, '32x3'): _pool(_MN, [
        (16, 16, 8, 2, {S: 82, W: 83, T: 83}),
        (16, 32, 8, 2, {T: 133, 'masked': None}),  # not clean: S, W
    ]),
    (64, 32): _pool(_MN, [
        (128, 64, 8, 2, {S: 65, W: 97, T: 98}),
        (128, 32, 8, 2, {S: 49, W: 65, T: 66}),
        (64, 32, 4, 2, {S: 33, W: 49, T: 50}),
        (64, 32, 4, 3, {W: 65, T: 66}),  # not clean: S
        (128, 16, 8, 2, {S: 41, W: 49, T: 50}),
        (32, 64, 4, 2, {S: 50, W: 50, T: 50, 'masked': None}),
    ]),
    (128, 32): _pool(_MN, [
        (128, 16, 8, 2, {S: 80, W: 97, T: 98, 'sm_120': None}),
        (16, 32, 4, 2, {S: 44, W: 44, T: 44}),
        (16, 16, 8, 2, {S: 27, W: 27, T: 27}),
        (64, 32, 4, 2, {W: 97, T: 98}),  # not clean: S
        (64, 32, 4, 3, {W: 129, T: 130}),  # not clean: S
        (128, 32, 8, 2, {W: 129, T: 130}),  # not clean: S
    ]),
    (256, 32): _pool(_MN, [
        (16, 16, 8, 2, {S: 50, W: 51, T: 51}),
        (16, 32, 4, 2, {S: 83, W: 84, T: 84}),
        (128, 16, 8, 2, {W: 193}),  # not clean: S, T
        (64, 16, 4, 2, {'masked': None}),  # not clean: S, T, W
    ]),
}
SPATIAL_DQ: dict[tuple, list[Entry]] = {
    (64, 16): _pool(_MN, [
        (128, 64, 8, 3, {S: 65, W: 81, T: 90}),
        (128, 64, 8, 2, {S: 49, W: 65, T: 74}),
        (128, 128, 8, 2, {W: 97, T: 114}),  # not clean: S
        (64, 64, 4, 3, {S: 49, W: 65, T: 74}),
        (64, 128, 4, 2, {W: 81, T: 98}),  # not clean: S
        (64, 64, 4, 4, {S: 65, W: 81, T: 90}),
    ]),
    (128, 16): _pool(_MN, [
        (128, 64, 8, 2, {W: 129, T: 146}),  # not clean: S
        (128, 64, 8, 3, {W: 161, T: 178}),  # not clean: S
        (64, 64, 4, 3, {W: 129, T: 146}),  # not clean: S
        (128, 32, 8, 2, {W: 97, T: 106}),  # not clean: S
        (128, 16, 8, 2, {S: 72, W: 81, T: 86, 'sm_86': None, 'sm_89': None, 'sm_120': None}),
        (32, 64, 4, 2, {S: 52, W: 53, 'sm_120': None}),  # not clean: T
        (32, 32, 4, 2, {S: 35, W: 35, T: 35}),
    ]),
    (256, 16): _pool(_MN, [
        (128, 32, 8, 2, {W: 193}),  # not clean: S, T
        (32, 32, 4, 2, {W: 67, T: 67}),  # not clean: S
        (16, 32, 4, 2, {S: 49, W: 50, T: 50}),
        (32, 16, 4, 2, {S: 49, W: 50, T: 50}),
    ]),
    (64, '32x3'): _pool(_MN, [
        (16, 32, 4, 2, {S: 32, 'sm_86': None, 'sm_89': None, 'sm_120': None}),  # not clean: T, W
        (16, 16, 4, 1, {S: 20, W: 21, 'sm_120': None}),  # not compiled for T
    ]),
    (64, 32): _pool(_MN, [
        (128, 32, 8, 2, {W: 97, T: 106, 'masked': None}),  # not clean: S
        (128, 16, 8, 2, {S: 76, W: 81, T: 86, 'sm_120': None}),
        (64, 16, 4, 2, {S: 42, W: 49, 'sm_120': None}),  # not clean: T
        (32, 32, 4, 2, {S: 41, W: 41, T: 41}),
        (16, 32, 4, 2, {S: 33, W: 33, T: 33}),
    ]),
    (128, 32): _pool(_MN, [
        (16, 16, 8, 2, {S: 41, W: 41, T: 41}),
        (16, 32, 4, 2, {S: 65, W: 65, T: 65}),
    ]),
    (256, 32): _pool(_MN, [
        (16, 16, 8, 2, {S: 80, W: 81, 'masked': None}),  # not clean: T
        (16, 32, 4, 2, {S: 128, W: 129, T: 129}),
    ]),
}
SPATIAL_DKDV: dict[tuple, list[Entry]] = {
    (64, 16): _pool(_MN, [
        (64, 128, 8, 3, {S: 66, W: 82, T: 99, 'masked': None}),
        (64, 128, 8, 2, {S: 50, W: 66, T: 82, 'masked': None}),
        (32, 128, 8, 3, {S: 50, W: 58}),  # not clean: T
        (32, 128, 8, 2, {S: 42, W: 50, T: 58}),
        (64, 64, 4, 3, {S: 49, W: 66, T: 83, 'sm_120': None}),
    ]),
    (128, 16): _pool(_MN, [
        (32, 128, 8, 2, {W: 98, T: 114}),  # not clean: S
        (32, 64, 8, 2, {S: 54, W: 66, T: 82}),
        (16, 128, 8, 2, {W: 82, T: 90, 'masked': None}),  # not clean: S
        (16, 64, 8, 2, {S: 44, W: 50, T: 58}),
        (32, 32, 4, 2, {S: 36, W: 36, T: 36}),
    ]),
    (256, 16): _pool(_MN, [
        (16, 32, 4, 2, {S: 50, W: 51, T: 51}),
        (32, 16, 4, 2, {S: 50, T: 51}),  # not clean: W
    ]),
    (64, '32x3'): _pool(_MN, [
        (16, 16, 4, 2, {S: 26, W: 26, T: 26}),
        (16, 32, 4, 2, {S: 42, W: 42, T: 42}),
        (32, 16, 4, 2, {W: 34, T: 34, 'masked': None}),  # not clean: S
        (32, 64, 8, 2, {W: 98, T: 34}),  # not clean: S
        (16, 128, 8, 2, {W: 146}),  # not clean: S, T
    ]),
    (128, '32x3'): _pool(_MN, [
        (16, 16, 8, 2, {S: 50, W: 50, T: 50}),
        (32, 16, 8, 2, {S: 66, W: 66, T: 66}),
        (16, 16, 4, 2, {S: 50, W: 50, T: 50}),
    ]),
    (64, 32): _pool(_MN, [
        (32, 64, 8, 2, {W: 66, T: 82, 'masked': None}),  # not clean: S
        (16, 128, 8, 2, {S: 77, W: 82, T: 90, 'sm_120': None}),
        (32, 32, 4, 2, {W: 42, T: 42, 'masked': None}),  # not clean: S
        (16, 64, 8, 2, {S: 46, W: 50, T: 58}),
    ]),
    (128, 32): _pool(_MN, [
        (32, 64, 8, 2, {S: 113, W: 130, T: 162}),
        (16, 64, 8, 2, {S: 90, T: 114, 'masked': None}),  # not clean: W
        (32, 32, 4, 2, {S: 82, W: 82, T: 82}),
        (32, 16, 4, 2, {S: 66, W: 66, T: 66}),
    ]),
    (256, 32): _pool(_MN, [
        (16, 16, 4, 2, {W: 82, T: 82}),  # not clean: S
        (32, 16, 4, 2, {W: 130, T: 130}),  # not clean: S
        (16, 16, 8, 2, {S: 81, W: 82, T: 82}),
        (32, 16, 8, 2, {S: 129, W: 130, T: 130}),
        (16, 16, 4, 1, {S: 80, W: 81, T: 81}),
    ]),
}
SPATIAL_GROUP: dict[tuple, list[Entry]] = {
    (64, 16): _pool(_N, [
        (32, 8, 1, {W: 149}),  # not clean: S, T
        (32, 8, 2, {W: 161}),  # not clean: S, T
        (16, 8, 1, {W: 139}),  # not clean: S, T
        (32, 4, 1, {W: 33, T: 42, 'masked': None}),  # not clean: S
        (32, 4, 2, {W: 45, T: 45}),  # not clean: S
    ]),
}
TEMPORAL_FWD: dict[tuple, list[Entry]] = {
    (64, 16): _pool(_MH, [
        (32, 1, 4, 1, {S: 9, W: 9, T: 9}),
        (32, 2, 4, 2, {S: 16, W: 15}),  # not clean: T
        (32, 4, 4, 2, {S: 16, W: 15}),  # not clean: T
        (32, 4, 4, 3, {S: 28, W: 27, T: 27}),
        (64, 1, 4, 1, {S: 17, W: 25, T: 26}),
        (64, 2, 4, 2, {S: 33, W: 57}),  # not clean: T
        (64, 4, 4, 2, {S: 33, W: 57}),  # not clean: T
        (128, 1, 8, 1, {S: 32, W: 49, T: 50}),
        (128, 2, 8, 2, {S: 64, W: 113, T: 86}),
        (128, 4, 8, 2, {S: 64, W: 113, T: 86}),
    ]),
    (128, 16): _pool(_MH, [
        (32, 1, 4, 1, {S: 17, W: 17, T: 17}),
        (32, 2, 4, 2, {S: 32, W: 27}),  # not clean: T
        (32, 4, 4, 2, {S: 32, W: 27}),  # not clean: T
        (32, 4, 4, 3, {S: 56, W: 51}),  # not clean: T
        (64, 1, 4, 1, {S: 33, W: 49, T: 50}),
        (64, 2, 4, 2, {S: 57, W: 105}),  # not clean: T
        (64, 4, 4, 2, {S: 57, W: 105}),  # not clean: T
        (128, 1, 8, 1, {W: 97, T: 98}),  # not clean: S
        (128, 2, 8, 2, {S: 128, W: 225, T: 170}),
        (128, 4, 8, 2, {S: 128, W: 225, T: 170}),
    ]),
    (256, 16): _pool(_MH, [
        (32, 1, 4, 1, {S: 32, W: 33, T: 33}),
        (32, 2, 4, 2, {S: 52, W: 53}),  # not clean: T
        (32, 4, 4, 2, {S: 52, W: 53}),  # not clean: T
    ]),
    (64, '32x3'): _pool(_MH, [
        (32, 1, 4, 1, {S: 9, W: 9, T: 9}),
        (32, 2, 4, 2, {S: 41, W: 41, T: 41}),
        (32, 4, 4, 2, {S: 41, W: 41, T: 41}),
        (32, 4, 4, 3, {S: 65, W: 65, T: 65}),
        (32, 1, 8, 1, {S: 9, W: 9, T: 9}),
        (32, 2, 8, 2, {S: 41, W: 41, T: 41}),
    ]),
    (128, '32x3'): _pool(_MH, [
        (32, 1, 8, 1, {}),  # not clean: S, T, W
    ]),
    (64, 32): _pool(_MH, [
        (32, 1, 4, 1, {S: 17, W: 17, T: 17}),
        (32, 2, 4, 2, {S: 32, W: 33, T: 30}),
        (32, 4, 4, 2, {S: 32, W: 33, T: 30}),
        (64, 1, 4, 1, {S: 33, W: 49, T: 50}),
        (64, 2, 4, 2, {S: 65, W: 113, T: 86}),
    ]),
    (128, 32): _pool(_MH, [
        (32, 1, 4, 1, {S: 33, W: 33, T: 33, 'sm_86': None, 'sm_89': None}),
        (32, 2, 4, 2, {S: 57, W: 57, T: 57}),
        (32, 4, 4, 2, {S: 57, W: 57, T: 57}),
        (64, 1, 4, 1, {S: 65, W: 97, T: 98}),
    ]),
    (256, 32): _pool(_MH, [
        (32, 1, 4, 1, {S: 64, W: 65, T: 65}),
        (32, 2, 4, 2, {S: 112, W: 113, T: 113}),
        (32, 4, 4, 2, {S: 112, W: 113, T: 113}),
    ]),
}
TEMPORAL_BWD: dict[tuple, list[Entry]] = {
    (64, 16): _pool(_MH, [
        (32, 1, 4, 1, {S: 17, W: 17, T: 17}),
        (32, 2, 4, 2, {S: 23, W: 22, T: 22}),
        (32, 4, 4, 2, {S: 23, W: 22, T: 22}),
        (32, 4, 4, 3, {S: 39, W: 38, T: 38}),
        (64, 1, 4, 1, {S: 33, T: 42}),  # not clean: W
        (64, 2, 4, 2, {}),  # not clean: S, T, W
        (64, 4, 4, 2, {}),  # not clean: S, T, W
        (128, 1, 8, 1, {W: 97, T: 98}),  # not clean: S
        (128, 2, 8, 2, {W: 162, T: 166}),  # not clean: S
        (128, 4, 8, 2, {W: 162, T: 166}),  # not clean: S
    ]),
    (128, 16): _pool(_MH, [
        (32, 1, 4, 1, {W: 27, T: 27}),  # not clean: S
        (32, 2, 4, 2, {S: 43, W: 38}),  # not clean: T
        (32, 4, 4, 2, {S: 43, W: 38}),  # not clean: T
        (32, 4, 4, 3, {S: 75, 'sm_86': None, 'sm_89': None}),  # not clean: T, W
        (64, 1, 4, 1, {S: 57, W: 73, T: 74}),
        (64, 2, 4, 2, {W: 138, T: 138}),  # not clean: S
        (64, 4, 4, 2, {W: 138, T: 138}),  # not clean: S
        (128, 1, 8, 1, {W: 161, T: 162}),  # not clean: S
        (128, 2, 8, 2, {}),  # not clean: S, T, W
        (128, 4, 8, 2, {}),  # not clean: S, T, W
    ]),
    (256, 16): _pool(_MH, [
        (32, 1, 8, 1, {S: 64, W: 53, T: 53}),
        (32, 2, 8, 2, {S: 83, W: 72, T: 72}),
        (32, 4, 8, 2, {S: 83, W: 72, T: 72}),
    ]),
    (64, '32x3'): _pool(_MH, [
        (32, 1, 8, 1, {S: 17, W: 17, 'masked': None}),  # not clean: T
    ]),
    (64, 32): _pool(_MH, [
        (32, 1, 4, 1, {S: 41, W: 41, T: 41, 'sm_86': None, 'sm_89': None}),
        (32, 1, 8, 1, {S: 41, W: 41, T: 41}),
        (32, 2, 4, 2, {S: 50, W: 50, T: 50}),
        (32, 2, 8, 2, {S: 49, W: 50, T: 50, 'sm_120': None}),
        (32, 4, 4, 2, {S: 50, W: 50, T: 50}),
        (64, 1, 4, 1, {W: 113, T: 114}),  # not clean: S
    ]),
    (128, 32): _pool(_MH, [
        (32, 1, 4, 1, {S: 81, W: 81, T: 81}),
        (32, 1, 8, 1, {S: 81, W: 81, T: 81}),
        (32, 2, 4, 2, {S: 98, W: 98, T: 98}),
        (32, 2, 8, 2, {S: 98, W: 98, T: 98}),
        (32, 4, 4, 2, {S: 98, W: 98, T: 98}),
    ]),
    (256, 32): _pool(_MH, [
        (32, 1, 8, 1, {S: 160, W: 161, T: 161}),
        (32, 2, 8, 2, {'masked': None}),  # not clean: S, T, W
    ]),
}
