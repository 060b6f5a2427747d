#!/usr/bin/env bash
# Prepare a Python that can run the project and print its path on the last line of stdout.
#
# - A Python that already has torch, triton and pytest (the GPU machine: no package registry)
#   is used as it is: the package is installed in place with --no-deps.
# - Otherwise a venv in .venv gets the pinned torch and the package with its test extras.
# The CUDA extension is built whenever nvcc is found (CUDA_HOME, default /usr/local/cuda);
# TK_BUILD_CUDA=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
log() { echo "bootstrap: $*" >&2; }

installed() { "$1" -c "import torch, triton, pytest, timesformer_kernels" >/dev/null 2>&1; }

if [ -z "${TK_VENV:-}" ] && python3 -c "import torch, triton, pytest" >/dev/null 2>&1 && ! [ -x .venv/bin/python ]; then
    PY=python3
    if ! installed "$PY" || [ -n "${TK_REINSTALL:-}" ]; then
        log "using the preinstalled torch: $("$PY" -c 'import torch; print(torch.__version__)')"
        "$PY" -m pip install -q --no-build-isolation --no-deps -e . >&2
    fi
else
    PY=.venv/bin/python
    if ! [ -x "$PY" ]; then
        log "creating .venv"
        python3 -m venv .venv
    fi
    if ! installed "$PY" || [ -n "${TK_REINSTALL:-}" ] || [ setup.py -nt .venv/.tk-installed ]; then
        log "installing torch 2.14.1 and the test extras into .venv (a few minutes the first time)"
        "$PY" -m pip install -q --upgrade "pip>=23" setuptools wheel >&2
        "$PY" -m pip install -q "torch==2.14.1" >&2
        "$PY" -m pip install -q --no-build-isolation -e ".[test]" >&2
        # mmaction2's transformer.py is loaded on its own (tests/mmaction_loader.py): no deps.
        "$PY" -m pip install -q --no-deps mmaction2==1.2.0 mmengine==0.10.7 mmcv-lite==2.1.0 importlib_metadata==10.2.0 >&2
        touch .venv/.tk-installed
    fi
fi
echo "$PY"
