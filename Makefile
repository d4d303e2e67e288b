# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
CORE_STAMP := $(VENV)/.installed-core
STAMP := $(VENV)/.installed

# the demo needs the core packages only (~30 s); the tests also the PyTorch references (torch, transformers,
# diffusers: ~40 s more)
$(CORE_STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e .
	touch $(CORE_STAMP)

$(STAMP): $(CORE_STAMP) setup.py
	# torch first, pinned: the local CPU build (any other version pulls GBs of CUDA).
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(CORE_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/bifrost demo --workdir runs/demo

clean:
	rm -rf $(VENV) runs
