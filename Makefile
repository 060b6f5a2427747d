# The README's commands. Each does its own set-up (scripts/bootstrap.sh) on a fresh machine.
PY = $$(bash scripts/bootstrap.sh | tail -n 1)

.PHONY: demo test gpu bench-smoke

demo:  ## swap the fused attention into a Hugging Face TimeSformer, check it matches, time it
	py=$(PY) && $$py examples/demo.py

test:  ## the whole test suite (Triton under its CPU interpreter when there is no GPU)
	py=$(PY) && $$py -m pytest tests -q

gpu:  ## on a GPU machine: build, GPU tests and the full benchmark, results under $$OUT
	bash benchmarks/gpu.sh

bench-smoke:  ## the benchmark harness on a tiny CPU configuration
	py=$(PY) && $$py -m benchmarks.run --smoke
