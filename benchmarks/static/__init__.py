"""Static kernel report: what the compiler made of every Triton kernel, without a GPU.

    python -m benchmarks.static --out benchmarks/results/static   # once per Triton version
    python -m benchmarks.static --quick --out /tmp/static          # the CI subset (tests)

Every kernel launch of the package is recorded at TimeSformer shapes and compiled ahead of
time for sm_90 and sm_80 with every autotune config its pruning keeps, specialised like a real
launch; the cubins are read with the cuobjdump Triton bundles. Per config: registers, spills,
shared memory, theoretical occupancy, the MMA kind and the loads of the hot loop; per kernel at
the benchmark shapes: the issue-time model (instruction issue, MUFU, MMA and memory lower
bounds on H100/H200). Output: kernels-triton-<version>.csv per Triton version and kernels.md
from all of them, plus the resource usage of the built CUDA extension.

Layout: ``aot`` (record launches, bind, compile), ``sass`` (cuobjdump output: resources, hot
loop, instruction classes), ``model`` (occupancy, the issue-time model, per-kernel trip counts
and byte floors), ``sweep`` (one CSV row per compiled config), ``report`` (CSV and markdown),
``__main__`` (command line; a run writes after every job, so one cut short leaves a report).
Needs Triton's interpreter off (TRITON_INTERPRET unset or 0) and no GPU.
"""
