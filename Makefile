# The README's commands. Each does its own set-up (scripts/bootstrap.sh) on a fresh machine.
PY = $$(bash scripts/bootstrap.sh | tail -n 1)

.PHONY: demo test gpu bench-smoke

demo:  ## swap the fused attention into a Hugging Face TimeSformer, check it matches, time it
	py=$(PY) && $$py examples/demo.py

# The suite runs twice on a GPU machine: the device-independent tests with the GPU hidden,
# exactly as in CI (Triton under its CPU interpreter), then the tests marked gpu on the GPU.
test:  ## the whole test suite
	py=$(PY) && CUDA_VISIBLE_DEVICES= $$py -m pytest tests -q -m "not gpu" && \
	if $$py -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $$py -m pytest tests -q -m gpu; fi

gpu:  ## on a GPU machine: build, GPU tests and the full benchmark, results under $$OUT
	bash benchmarks/gpu.sh

bench-smoke:  ## the benchmark harness on a tiny CPU configuration
	py=$(PY) && $$py -m benchmarks.run --smoke
