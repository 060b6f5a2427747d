"""The static kernel report (benchmarks/static, issues 11 §2, 13 §1 and 18), on the CPU.

(a) the fast path compiles clean: every Triton kernel for sm_90 and sm_80, specialised like a
    real launch, in bf16 and float32, without spilling, within the target's shared memory and
    within its pool entry (the ``--quick`` subset: each kernel's largest kept config; the full
    sweep over every target, dtype, head dim and case is the command);
(b) the issue-time model on a kernel small enough to count by hand;
(c) the autotuners key on the target and cache their results.
Compiling needs Triton without its interpreter (which conftest.py turns on), so the work runs
in a subprocess with TRITON_INTERPRET=0; this file's ``__main__`` is (b)'s subprocess. Both
pin the private Triton APIs the report uses, on whichever Triton runs the suite (3.6 and 3.8).
Skipped where Triton's bundled ptxas/cuobjdump are missing.
"""
import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.static import aot, model, report  # noqa: E402 - after the sys.path line

pytestmark = pytest.mark.skipif(not (aot.tool("ptxas") and aot.tool("cuobjdump")),
                                reason="Triton's bundled ptxas/cuobjdump not found")

# (b): one program of one warp sums N_ITER 32-float rows of x; the barrier keeps LLVM and ptxas
# from unrolling the loop (no runtime unrolling across a convergent operation).
N_ITER, PROGRAMS = 1000, 132


@triton.jit
def _row_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(n):
        acc += tl.load(x_ptr + i * BLOCK + offs)
        tl.debug_barrier()
    tl.store(out_ptr + offs, acc)


def _counts_of_row_sum() -> dict:
    """(subprocess side) Compile _row_sum_kernel for sm_90 through the report's own path."""
    import torch

    from benchmarks.static import sweep

    launch = aot.Launch(_row_sum_kernel, (torch.empty(N_ITER * 32), torch.empty(32), N_ITER), {"BLOCK": 32},
                        (PROGRAMS,))
    compiled = aot.compile_launch(launch, triton.Config({}, num_warps=1, num_stages=1), aot.TARGETS["sm_90"])
    row = sweep.analyse(compiled, "sm_90", {"cuobjdump": aot.tool("cuobjdump")})
    return {**row, "programs": compiled.grid[0] * compiled.grid[1] * compiled.grid[2]}


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_issue_model_on_a_hand_counted_loop():
    """The SASS (ptxas 12.8 and 12.9 alike), per warp:
    prologue 16 (parameters, lane offset, n >= 1 check and skip, loop set-up);
    loop 10 = LEA + LEA.HI.X (64-bit address of row i) + LDG + BAR + IADD3 + IMAD.X (64-bit
    counter) + 2 ISETP (64-bit compare) + FADD + BRA back;
    epilogue 5 (output address, STG, EXIT), the padding BRA-to-self and NOPs not counted."""
    row = json.loads(_run(__file__, timeout=300).stdout.strip().splitlines()[-1])
    assert (row["sass_loops"], row["prologue"], row["body"], row["epilogue"]) == (1, 16, 10, 5)
    assert row["loop_ldg"] == "4Bx1" and row["mma"] == "none" and row["mufu_body"] == 0
    assert row["programs"] == PROGRAMS
    counts = model.Counts(row["prologue"] + row["epilogue"], row["body"], 0, 0, 0.0, 0.0, False)
    b = model.bounds(counts, warps=1, programs=PROGRAMS, iterations=PROGRAMS * N_ITER, min_bytes=0.0,
                     dev=model.H100)
    # 132 programs x (21 + 1000 x 10) warp instructions over 132 SMs x 4 per clock x 1.755 GHz
    assert b.issue_s == pytest.approx(10021 / (4 * 1.755e9), rel=1e-12)
    assert b.highest == "issue" and b.mufu_s == b.mma_s == 0.0


def test_fast_path_compiles_clean(tmp_path):
    """The --quick subset: on sm_90 and sm_80, in bf16 and float32 ("highest"), at head dims
    64 and 128, TimeSformer-base and HR, every kernel's largest kept config compiles without a
    spill, within the target's shared memory and within what its pool entry claims (the
    number the pruning trusts); float32 at 128 is routed (its dQ spills in every config)."""
    _run("-m", "benchmarks.static", "--quick", "--out", str(tmp_path), timeout=900)
    rows = report.read_rows(str(tmp_path))
    compiled = {(r["kernel"], r["target"], r["dtype"], r["head_dim"]) for r in rows if not r["error"]}
    for target in ("sm_90", "sm_80"):
        for dtype, dh in (("bf16", "64"), ("bf16", "128"), ("fp32", "64")):
            kernels = {k for k, t, d, h in compiled if (t, d, h) == (target, dtype, dh)}
            pair = {"_spatial_bwd_dq_kernel", "_spatial_bwd_dkdv_kernel"}
            assert {"_temporal_fwd_kernel", "_temporal_bwd_kernel", "_spatial_fwd_kernel"} | pair <= kernels, (
                target, dtype, dh, kernels)
    assert ("_spatial_bwd_group_kernel", "sm_90", "bf16", "64") in compiled
    assert not {r["kernel"] for r in rows if r["error"].startswith("no fitting") and r["dtype"] == "bf16"}
    bad = {(r["kernel"], r["config"], r["target"], r["dtype"], r["head_dim"], r["shape"]):
           [i for i in report.issues_of(r) if i[0] in report.FAILURES] for r in rows if not report.ok(r)}
    assert not bad, bad
    md = (tmp_path / "kernels.md").read_text()
    for section in ("## Summary per target and dtype", "## Which calls take the Triton kernels",
                    "## Issue-time model", "## The CUDA extension"):
        assert section in md


def test_autotuners_are_keyed_on_the_target_and_cached():
    """With Triton compiling (not interpreting): every autotuned kernel keys on TARGET and
    DOT_PRECISION and persists its results through Triton's cache, unless TK_AUTOTUNE_CACHE=0."""
    check = ("import timesformer_kernels.triton as t, triton, json; "
             "a = [k for m in (t.temporal, t.spatial) for k in vars(m).values() "
             "if isinstance(k, triton.runtime.Autotuner)]; "
             "print(json.dumps([len(a), all('TARGET' in k.keys and 'DOT_PRECISION' in k.keys for k in a), "
             "[k.cache_results for k in a]]))")
    n, keyed, cached = json.loads(_run("-c", check, timeout=300).stdout.strip().splitlines()[-1])
    assert n == 6 and keyed and all(cached)
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT,
                               "TK_AUTOTUNE_CACHE": "0"})
    assert json.loads(done.stdout.strip().splitlines()[-1])[2] == [False] * 6


if __name__ == "__main__":
    print(json.dumps(_counts_of_row_sum()))


def _row(target: str, stack: int, smem: int) -> dict:
    """A sweep row of the spatial forward's (128, 128, 8, 3) bf16 Dh 64 entry on ``target``."""
    return {"kernel": "_spatial_fwd_kernel", "config": "M=128 N=128 w8 s3", "target": target, "dtype": "bf16",
            "head_dim": "64", "error": "", "stack": str(stack), "local": "0", "spill_stores": "", "smem": str(smem),
            "warps_per_sm": "8", "mma_dup": "", "loop_ldg": "", "loop_ldgsts": "", "shape": "base"}


def test_pool_correction_from_a_sweep():
    """``benchmarks.static.pools --correct``: a spill on a kind's other target takes that target
    alone away, on the kind's first target the kind; more shared memory raises the claim."""
    import torch

    from benchmarks.static import pools as generator
    from timesformer_kernels import devices
    from timesformer_kernels.backends import DoesNotFit
    from timesformer_kernels.triton import pools, tuning

    entry = next(e for e in pools.SPATIAL_FWD[(64, 16)] if generator.config_label(e.config) == "M=128 N=128 w8 s3")
    kinds = {"mma.sync", "wgmma", "tcgen05"}
    claims = generator._claims(entry, {"sm_86": [_row("sm_86", 8, 70_000)], "sm_89": [_row("sm_89", 0, 90_000)]},
                               kinds, correct=True)
    assert claims["sm_86"] is None and "sm_89" not in claims and claims["mma.sync"] == 88  # 90,000 B in KB
    assert claims["wgmma"] == entry.smem["wgmma"] // 1024
    claims = generator._claims(entry, {"sm_80": [_row("sm_80", 8, 70_000)]}, kinds, correct=True)
    assert "mma.sync" not in claims and "wgmma" in claims
    corrected = tuning.Entry(entry.config, {k: v if v is None else v * 1024 for k, v in
                                            generator._claims(entry, {"sm_86": [_row("sm_86", 8, 0)]}, kinds,
                                                              correct=True).items()})
    assert corrected.claim(devices.TARGETS["sm_86"]) is None
    assert corrected.claim(devices.TARGETS["sm_80"]) == entry.smem["mma.sync"]
    assert tuning.keep("k", [corrected], devices.TARGETS["sm_80"], torch.bfloat16, 64)
    with pytest.raises(DoesNotFit, match="sm_86"):
        tuning.keep("k", [corrected], devices.TARGETS["sm_86"], torch.bfloat16, 64)


def test_pool_correction_of_a_masked_head_dim():
    """A spill at a head dim below BLOCK_D (40 in the 64 class) only takes masked head dims away."""
    from benchmarks.static import pools as generator
    from timesformer_kernels import devices
    from timesformer_kernels.triton import pools, tuning

    entry = next(e for e in pools.SPATIAL_FWD[(64, 16)] if generator.config_label(e.config) == "M=128 N=128 w8 s3")
    spill = {**_row("sm_90", 8, 1024), "head_dim": "40"}
    claims = generator._claims(entry, {"sm_90": [spill, _row("sm_90", 0, 1024)]}, {"wgmma"}, correct=True)
    assert claims["masked"] is None and claims["wgmma"] == entry.smem["wgmma"] // 1024
    corrected = tuning.Entry(entry.config, {k: v if v is None else v * 1024 for k, v in claims.items()})
    assert corrected.claim(devices.TARGETS["sm_90"], 40) is None
    assert corrected.claim(devices.TARGETS["sm_90"], 64) == entry.smem["wgmma"]
