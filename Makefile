# Two entry points for a fresh clone (Python 3.10+): `make demo` and `make test`.
# Both create (once) and reuse the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The other end of the supported range: the lent GPU machine's stack, in a side environment (CI runs both).
GPU_STACK := torch==2.11.0 triton==3.6.0 torchvision==0.26.0
GPU_VENV := .venv-gpu-stack
GPU_STAMP := $(GPU_VENV)/.installed

.PHONY: demo test test-gpu-stack lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/sslcore pretrain --method simclr --data digits --baselines --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

$(GPU_STAMP): pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --no-cache-dir $(GPU_STACK)
	$(GPU_VENV)/bin/python -m pip install -q -e ".[test]"
	$(GPU_VENV)/bin/python -c "import torch, triton; assert (torch.__version__[:4], triton.__version__[:3]) == ('2.11', '3.6')"
	touch $@

test-gpu-stack: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) $(GPU_VENV) runs .pytest_cache
