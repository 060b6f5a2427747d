# The README's commands. Each does its own set-up (scripts/bootstrap.sh) on a fresh machine.
PY = $$(bash scripts/bootstrap.sh | tail -n 1)
PY_H200 = $$(TK_STACK=h200 bash scripts/bootstrap.sh | tail -n 1)
# Device-independent tests: the GPU hidden, Triton under its CPU interpreter.
CPU_TESTS = CUDA_VISIBLE_DEVICES= $$py -m pytest tests -q -m "not gpu"

.PHONY: demo test test-h200-stack gpu gpu-wheels static-report bytes-report bench-smoke bench-context-parallel

demo:  ## swap the fused attention into a Hugging Face TimeSformer, check it matches, time it
	py=$(PY) && $$py examples/demo.py

# The suite runs twice on a GPU machine: the device-independent tests with the GPU hidden,
# exactly as in CI (Triton under its CPU interpreter), then the tests marked gpu on the GPU.
test:  ## the whole test suite
	py=$(PY) && $(CPU_TESTS) && \
	if $$py -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $$py -m pytest tests -q -m gpu; fi

test-h200-stack:  ## the device-independent tests on the lent GPU machine's versions (torch 2.11, triton 3.6)
	py=$(PY_H200) && $(CPU_TESTS)

# The Python `make test` uses (bootstrap: .venv on a CPU machine, the preinstalled python3 on the
# GPU image); gpu.sh builds the CUDA extension itself, for this GPU's arch only.
gpu:  ## on a GPU machine: build, GPU tests and the full benchmark, results under $$OUT
	py=$$(TK_BUILD_CUDA=0 bash scripts/bootstrap.sh | tail -n 1) && PYTHON=$$py bash benchmarks/gpu.sh

# The lent machine has no package registry: these pure-Python wheels (and numpy 2.2 for Triton
# 3.6's interpreter) travel with the tree (the device tool's carry: [".whl"]), and gpu.sh
# installs them there.
GPU_PY ?= 3.12
gpu-wheels:  ## download the wheels `make gpu` carries to the lent machine (Python 3.12) into .whl/
	python3 -m pip download -q --no-deps -d .whl --only-binary=:all: --python-version $(GPU_PY) \
		--platform manylinux_2_17_x86_64 numpy==2.2.6 diffusers==0.42.1 importlib_metadata==10.2.0 zipp timesformer-pytorch==0.4.1

static-report:  ## compile every Triton kernel for every GPU of the device table under both stacks (no GPU) -> benchmarks/results/static/
	py=$(PY) && TRITON_INTERPRET=0 $$py -m benchmarks.static --out benchmarks/results/static
	py=$(PY_H200) && TRITON_INTERPRET=0 $$py -m benchmarks.static --out benchmarks/results/static

bytes-report:  ## count the bytes the kernels and the unfused peers move (interpreter, no GPU) -> benchmarks/results/bytes/
	py=$(PY) && $$py -m benchmarks.bytes --out benchmarks/results/bytes

bench-smoke:  ## the benchmark harness on a tiny CPU configuration
	py=$(PY) && $$py -m benchmarks.run --smoke

bench-context-parallel:  ## on a multi-GPU machine: tk.context_parallel step time and memory per rank at P = 1, 2, 4, 8 (NCCL)
	py=$(PY) && gpus=$$($$py -c "import torch; print(torch.cuda.device_count())") && \
	if [ $$gpus -eq 0 ]; then echo "bench-context-parallel: no CUDA device" >&2; exit 1; fi && \
	for p in 1 2 4 8; do if [ $$p -le $$gpus ]; then $$py -m torch.distributed.run --nproc-per-node $$p \
		-m benchmarks.context_parallel || exit 1; fi; done
