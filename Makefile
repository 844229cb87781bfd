# The README's two commands: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export EXITBENCH_DATA_DIR ?= $(abspath data/samples)
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup quickstart quickstart-hub default-backbone test lint bench clean

$(PY): pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	@touch $(PY)

setup: $(PY)
	./scripts/setup.sh --system-only

quickstart: $(PY)
	$(VENV)/bin/exitbench run --config configs/quickstart.yaml

# The quickstart's offline default backbone (backbones/tiny-t5-squad), trained from scratch
# on the bundled samples (about 30 minutes on 2 CPU cores); `--check` compares the hash.
default-backbone: $(PY)
	$(PY) scripts/train_default_backbone.py

# Needs internet: google-t5/t5-small comes from the Hugging Face hub (cached after the first run).
quickstart-hub: $(PY)
	HF_HUB_OFFLINE=0 $(VENV)/bin/exitbench run --config configs/quickstart_hub.yaml

test: $(PY)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(PY)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs/quickstart runs/quickstart_hub .pytest_cache
