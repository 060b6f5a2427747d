"""Benchmarks of timesformer_kernels: kernel microbenchmarks against every unfused peer, and
end-to-end model speed, written as Liger-style CSV rows, PNG plots and a markdown table.

    python -m benchmarks.run            # full run on the CUDA device (see --help)
    python -m benchmarks.run --smoke    # tiny CPU configuration, for CI
    bash benchmarks/gpu.sh              # build + tests + benchmark on a lent GPU machine

Layout: ``config`` (shapes, FLOP and byte counts), ``timing`` (timers, peak memory, the
device's measured rooflines, environment), ``peers`` (every provider, ours and unfused),
``micro`` (per-op microbenchmarks), ``e2e`` (whole models), ``report`` (CSV rows and the
markdown table), ``plot`` (PNG plots from the CSV), ``run`` (command line and time budget).
This package is light to import: torch and the providers are imported by the modules above.
"""
