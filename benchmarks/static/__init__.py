"""Static kernel report: what the compiler made of every Triton kernel on every GPU of the
device table, without a GPU.

    python -m benchmarks.static --out benchmarks/results/static   # once per Triton version
    python -m benchmarks.static --quick --out /tmp/static          # the CI subset (tests)
    python -m benchmarks.static --all-configs --out DIR            # every pool config: the evidence
    python -m benchmarks.static.pools DIR...                       #   of triton/pools.py's tables

Every kernel launch of the package is recorded for each case (TimeSformer base/HR/L/112 px,
AnimateDiff, SVD, a 256-frame temporal group) as a GPU of each target (``devices.TARGETS``)
would make it, and compiled ahead of time with every autotune config its pruning keeps there,
specialised like a real launch; a binary several cases launch is compiled once. NVIDIA cubins
are read with the cuobjdump Triton bundles, AMD ones from the compiler's notes in the amdgcn
text. Per config: registers, spills, shared memory, theoretical occupancy (and on sm_90/sm_80
the MMA kind and the loads of the hot loop); per kernel at the benchmark shapes: the issue-time
model (instruction issue, MUFU, MMA and memory lower bounds on H100/H200), beside the built
CUDA extension's kernels under the same model. Output: kernels-triton-<version>.csv per Triton
version and kernels.md, by-case.md from all of them.

Layout: ``aot`` (cases, record launches, bind, compile), ``sass`` (cuobjdump output: resources,
hot loop, instruction classes), ``model`` (occupancy, the issue-time model, per-kernel trip
counts and byte floors), ``sweep`` (one CSV row per case, kernel and kept config), ``csrc`` (the
CUDA extension's launches and binaries), ``report`` (CSV and markdown), ``pools`` (pools.py's
tables from --all-configs sweeps), ``__main__`` (command line; a run writes after every job, so
one cut short leaves a report). Needs Triton's interpreter off (TRITON_INTERPRET unset or 0) and
no GPU.
"""
