# Two commands on a fresh machine (Python >= 3.11 and a C++ compiler):
#   make demo   # isolated environment in .venv, torch + triton + sm4, then the main job
#   make test   # the same set-up, then the whole test suite and a smoke run of the benchmarks
#
# torch: if the Python that runs make already imports a CUDA torch, the environment reuses it
# (created with --system-site-packages); otherwise it gets the CPU build torch==$(TORCH_VERSION)+cpu:
# from PyTorch's CPU wheel index where that answers, else from pip's configured sources (a local
# wheel folder); .ci/torch_wheel.py chooses and says why. Never a plain torch==X from PyPI: that
# is the CUDA build, gigabytes of nvidia-* packages.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0
# Supported: triton >= 3.6 (the GPU machines have 3.6). A fresh environment gets the version
# this package is tested with here.
TRITON_PIN ?= triton==3.9.0
TOOLS := setuptools wheel ninja numpy tqdm matplotlib pytest pytest-benchmark hypothesis==6.155.2
# data tools: scikit-learn and mnist1d regenerate the bundled benchmark (its .npz ships with the
# package); h5py reads MultiBench's PUSH and V&T files, pandas the pandas objects in its pickles
DATA_TOOLS := scikit-learn==1.9.1 mnist1d==0.0.2.post1 h5py==3.14.0 pandas==3.1.1
PYTEST_FLAGS ?=

EXT_SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.cuh csrc/*/*.h)

.PHONY: demo test bench env clean distclean

demo: $(VENV)/.built
	$(PY) -m sm4 demo

test: $(VENV)/.built
	$(PY) -m pytest tests $(PYTEST_FLAGS)
	$(PY) -m pytest benchmarks --benchmark-disable -q $(PYTEST_FLAGS)

bench: $(VENV)/.built
	$(PY) -m pytest benchmarks --benchmark-json=results/benchmarks-$$(date +%Y%m%d-%H%M%S).json

env: $(VENV)/.built

$(VENV)/.deps: Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sm4 needs Python >= 3.11, $(PYTHON) is " + sys.version.split()[0])'
	@if $(PYTHON) -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then \
		echo "sm4: reusing the CUDA torch of $(PYTHON) (virtual environment with system site-packages)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PIP) install --progress-bar off $(TOOLS) $(DATA_TOOLS)
	@$(PY) -c 'import torch' 2>/dev/null || $(PIP) install --progress-bar off \
		$$($(PYTHON) .ci/torch_wheel.py --explain --version $(TORCH_VERSION))
	@$(PY) -c 'import triton' 2>/dev/null || $(PIP) install --progress-bar off $(TRITON_PIN)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(EXT_SOURCES)
	$(PIP) install --progress-bar off --no-build-isolation --no-deps -e .
	$(PY) -m sm4 info
	touch $@

clean:
	rm -rf build sm4/*.so *.egg-info .pytest_cache .benchmarks

distclean: clean
	rm -rf $(VENV)
