# Two commands do all set-up on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned: the local CPU build (any other version pulls GBs of CUDA).
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/bifrost demo --workdir runs/demo

clean:
	rm -rf $(VENV) runs
