#!/usr/bin/env bash
# Prepare a Python that can run the project and print its path on the last line of stdout.
#
# TK_STACK picks the software stack (see the README, "Supported versions"):
#   pinned (default)  .venv       torch 2.14.1 / triton 3.8.0 and the test extras (setup.py)
#   h200              .venv-h200  the lent GPU machine's image: torch 2.11.0, triton 3.6.0,
#                                 transformers 5.17.0, and numpy 2.2.6 (Triton 3.6's interpreter
#                                 fails with numpy >= 2.4); like that image it has no mmaction2,
#                                 timesformer-pytorch or diffusers, so their tests skip; it adds
#                                 triton-viz 3.0 (needs Triton 3.6) for tests/test_sanitizer.py
#
# - A Python that already has torch, triton and pytest (the GPU machine: no package registry)
#   is used as it is, with the package installed in place with --no-deps.
# - Otherwise the stack's venv is created and filled.
# The CUDA extension is built into the source tree (pinned stack only) whenever nvcc is found
# (CUDA_HOME, default /usr/local/cuda); TK_BUILD_CUDA=0 skips it. The h200 venv never builds it:
# both venvs share the in-place package, and the .so belongs to the pinned torch's ABI (under
# torch 2.11 the cuda backend then reports "not built" and its tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
log() { echo "bootstrap: $*" >&2; }
pipq() { "$PY" -m pip install -q "$@" >&2; }

installed() { "$1" -c "import torch, triton, pytest, timesformer_kernels" >/dev/null 2>&1; }

STACK=${TK_STACK:-pinned}
case "$STACK" in
    pinned) VENV=.venv ;;
    h200) VENV=.venv-h200 ;;
    *) log "TK_STACK must be 'pinned' or 'h200', got '$STACK'"; exit 2 ;;
esac

if [ "$STACK" = pinned ] && [ -z "${TK_VENV:-}" ] && python3 -c "import torch, triton, pytest" >/dev/null 2>&1 \
        && ! [ -x .venv/bin/python ]; then
    PY=python3
    if ! installed "$PY" || [ -n "${TK_REINSTALL:-}" ]; then
        log "using the preinstalled torch: $("$PY" -c 'import torch; print(torch.__version__)')"
        pipq --no-build-isolation --no-deps -e .
    fi
else
    PY=$VENV/bin/python
    if ! [ -x "$PY" ]; then
        log "creating $VENV"
        python3 -m venv "$VENV"
    fi
    if ! installed "$PY" || [ -n "${TK_REINSTALL:-}" ] || [ setup.py -nt "$VENV/.tk-installed" ]; then
        pipq --upgrade "pip>=23" setuptools wheel
        if [ "$STACK" = pinned ]; then
            log "installing torch 2.14.1 and the test extras into $VENV (a few minutes the first time)"
            pipq "torch==2.14.1"
            pipq --no-build-isolation -e ".[test]"
            # mmaction2's transformer.py is loaded on its own (tests/mmaction_loader.py): no deps.
            pipq --no-deps mmaction2==1.2.0 mmengine==0.10.7 mmcv-lite==2.1.0 importlib_metadata==10.2.0
        else
            log "installing the lent GPU machine's stack into $VENV (torch 2.11.0, triton 3.6.0; a few minutes)"
            pipq "torch==2.11.0" "triton==3.6.0" "numpy==2.2.6" "transformers==5.17.0" \
                 "pytest>=7" "hypothesis>=6" "pytest-benchmark>=4" "einops>=0.7" "matplotlib>=3.7" build \
                 "triton-viz==3.0" "z3-solver==5.4.1.0" "anytree==2.13.0" "pyarrow==26.0.1" "cairocffi==1.7.1" \
                 "flask==3.1.3" "flask-cloudflared==0.0.15" "pre-commit==4.7.0" "tqdm==4.70.1"
            TK_BUILD_CUDA=0 pipq --no-build-isolation --no-deps -e .
        fi
        touch "$VENV/.tk-installed"
    fi
fi
echo "$PY"
