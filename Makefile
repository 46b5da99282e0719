# `make test` and `make demo` set everything up from nothing on a fresh machine.
# TORCH pins the CPU wheels that import together on the project machine; on a GPU machine
# override it, e.g. `make test TORCH="torch torchvision"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test test-fast demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# One run: the fast suite first, then the slow checks (marked `slow`; tests/conftest.py orders them).
test: install
	$(PY) -m pytest -q

# BLIP-2 end to end on ShapesWorld: 9 to 12 minutes on a 2-core CPU the first time, by the
# machine's speed (it trains and caches its backbones), about 5 minutes after
demo: install
	$(PY) -m qformer demo --out runs/demo

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
