"""Launch grids within CUDA's limits: x up to 2^31 - 1 programs, y and z up to 65,535 each.

Both modules put a clip's programs on x and the batch on y and z, split so that neither
exceeds 65,535 (a batch of 70,000 runs as y = 35,000, z = 2; a batch that does not divide
evenly leaves a few programs past the last clip, which return at once). Triton's interpreter
enforces no limit, so the tests call ``batch_grid`` directly.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAX_X, MAX_YZ = 2**31 - 1, 65535


def batch_grid(per_clip: int, batch: int, what: str) -> tuple[int, int, int]:
    """(x, y, z) for ``per_clip`` programs per clip over ``batch`` clips; ``what`` says what the
    programs are, for the error when one clip alone needs more than x allows."""
    if per_clip > MAX_X:
        raise ValueError(f"{what} need {per_clip} programs per clip, more than the {MAX_X} of a grid's x")
    z = triton.cdiv(batch, MAX_YZ)
    return per_clip, triton.cdiv(batch, z), z


@triton.jit
def clip_id():
    """The clip (batch index, int64) of this program in a ``batch_grid``; compare it with the
    batch size, since the last programs may lie past the end."""
    return tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
