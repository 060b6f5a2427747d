"""Which autotune configs a kernel tunes over on a target, from compiler evidence.

Each kernel has pools of configs (``pools.py``) per head-dim class (BLOCK_D) and operand class
(16-bit, float32 as three TF32 products, float32 in one). A pool entry says for which kinds of
MMA it compiles without spilling and how much shared memory it takes there (from
``benchmarks.static --all-configs``), so pruning needs no compile: an entry is kept for a launch
when the target's MMA kind is one of its kinds and its shared memory fits the target's. When
none is left the launch raises DoesNotFit, which routes the call to another backend
(``backends.why_not``) before anything runs. The static report compiles every kept entry for
every target under both Triton versions and fails a spill, or shared memory above the entry's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os

import torch
import triton

from ..backends import DoesNotFit
from ..devices import Target


@dataclasses.dataclass(frozen=True)
class Entry:
    config: triton.Config
    # MMA kind it compiles without spilling for -> bytes of shared memory it takes there; a
    # target's name overrides its kind, None where it spills on that target alone (ptxas
    # allocates registers differently for sm_86 and sm_120 than for sm_80, all mma.sync);
    # "masked": None where it spills at head dims below its BLOCK_D (40 in 64, 80 in 128).
    smem: dict

    def claim(self, target: Target, head_dim: int = 0) -> int | None:
        """Bytes of shared memory on ``target`` where it compiles clean there at ``head_dim``,
        else None."""
        if masked(head_dim) and "masked" in self.smem:
            return None
        return self.smem.get(target.name, self.smem.get(target.mma))


def masked(head_dim: int) -> bool:
    """A head dim below its BLOCK_D (not a power of two): the kernels mask its columns."""
    return bool(head_dim & (head_dim - 1))


def entries(names: tuple[str, ...], rows) -> list[Entry]:
    """Pool entries from rows (meta values..., num_warps, num_stages, {MMA kind: smem bytes})."""
    return [Entry(triton.Config(dict(zip(names, meta)), num_warps=warps, num_stages=stages), smem)
            for *meta, warps, stages, smem in rows]


# Why the kernels are not offered on ROCm, from the compile evidence (README, "Supported GPUs").
ROCM = ("ROCm (AMD GPU): not offered: these kernels have never run on AMD hardware, and their autotune pools "
        "have no MFMA entries yet: compiled for gfx942 (benchmarks/results/static/amd/), 131 of 443 of their "
        "configs spill to scratch or exceed the 64 KB of LDS; use backend='torch'")
_every = False


@contextlib.contextmanager
def every_config():
    """Inside the block ``keep`` keeps every config of a (non-empty) pool, whatever the target:
    how benchmarks/static compiles the evidence the pools are made from (``--all-configs``)."""
    global _every
    saved, _every = _every, True
    try:
        yield
    finally:
        _every = saved


def keep(kernel: str, pool: list[Entry], target: Target, dtype: torch.dtype, head_dim: int, what: str = ""
         ) -> list[triton.Config]:
    """The configs of ``pool`` that compile clean for ``target``'s MMA and fit its shared memory;
    DoesNotFit, naming the device, dtype, head dim and what does not fit, when there are none."""
    if _every and pool:
        return [e.config for e in pool]
    if target.vendor == "hip":
        raise DoesNotFit(ROCM)
    clean = [(e.config, claim) for e in pool if (claim := e.claim(target, head_dim)) is not None]
    fits = [config for config, claim in clean if claim <= target.smem_per_block]
    if fits:
        return fits
    if clean:
        need = min(claim for _, claim in clean)
        why = f"its smallest config needs {need:,} B of shared memory"
    else:
        why = f"none of its {len(pool)} configs is known to compile without spilling for {target.mma}"
    raise DoesNotFit(f"triton: {kernel} has no config for {str(dtype).removeprefix('torch.')} head_dim {head_dim}"
                     f"{what} on {target.label}: {why}")


def cache_results() -> bool:
    """Whether autotune results persist through Triton's own cache (its cache directory, keyed
    by Triton, the kernel's source, the tuning key, which names the device, and the configs), so
    that a new process does not benchmark again: yes where the installed Triton can (3.6 and 3.8
    can), unless TK_AUTOTUNE_CACHE=0 (read when the package is imported)."""
    return (os.environ.get("TK_AUTOTUNE_CACHE", "1") != "0"
            and "cache_results" in inspect.signature(triton.autotune).parameters)


def autotune(configs: list, key: list[str], prune) -> object:
    """triton.autotune over ``configs``, pruned per launch by ``prune(launch arguments)``."""
    extra = {"cache_results": True} if cache_results() else {}
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": lambda _, nargs, **kw: prune(
        {**nargs, **kw})}, **extra)
