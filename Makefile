# The README's two commands: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export EXITBENCH_DATA_DIR ?= $(abspath data/samples)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup quickstart test lint bench clean

$(PY): pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	@touch $(PY)

setup: $(PY)
	./scripts/setup.sh --system-only

quickstart: $(PY)
	$(VENV)/bin/exitbench run --config configs/quickstart.yaml

test: $(PY)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(PY)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs/quickstart .pytest_cache
