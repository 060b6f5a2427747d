"""The static kernel report (benchmarks/static, issues 11 §2 and 13 §1), on the CPU.

(a) every Triton kernel compiles for sm_90 and sm_80, specialised like a real launch, without
    spilling and within the target's shared memory (the ``--quick`` subset: bf16, head dim 64 of
    the benchmark shapes, each kernel's largest-tile config that pruning keeps for the target;
    the full sweep is the command);
(b) the issue-time model on a kernel small enough to count by hand.
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


def test_every_kernel_compiles_for_both_targets_without_spills(tmp_path):
    _run("-m", "benchmarks.static", "--quick", "--out", str(tmp_path), timeout=900)
    rows = report.read_rows(str(tmp_path))
    # Every kernel of the issue model was found and compiled for both targets, but the whole-group
    # backward on sm_80, where it is never launched (triton.spatial.whole_group).
    expected = {(k, t) for k in model.KERNELS for t in aot.TARGETS} - {("_spatial_bwd_group_kernel", "sm_80")}
    assert {(r["kernel"], r["target"]) for r in rows} >= expected
    bad = {(r["kernel"], r["config"], r["target"]): [i for i in report.issues_of(r) if i[0] in report.FAILURES]
           for r in rows if not report.ok(r)}
    assert not bad, bad
    assert (tmp_path / "kernels.md").read_text().count("### `") == len({r["kernel"] for r in rows})


if __name__ == "__main__":
    print(json.dumps(_counts_of_row_sum()))
