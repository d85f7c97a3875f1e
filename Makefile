# Quick start: `make demo` and `make test`; each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck bench browser compat clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,models,train,viz]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m rch demo

test: $(STAMP) browser lint typecheck
	$(PY) -m pytest -q

# the HTML report test renders the page in headless Chromium (Debian's package)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the report test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and not root: install it for the report screenshot test"; fi

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) benchmarks/loss_cost.py

# The whole suite under another torch, by default the lent GPU machine's (2.11.0, with
# torchvision 0.26.0), before spending its time: both wheels are installed once into
# .compat/TORCH (from PyPI, without their dependencies) and put ahead of .venv's on the
# path. The CUDA libraries stay .venv's, so TORCH must be a build for the same CUDA major.
TORCH ?= 2.11.0
TORCHVISION ?= 0.26.0
compat: $(STAMP)
	@test -d .compat/$(TORCH)/torch || $(PY) -m pip install --quiet --no-deps --no-compile \
	  --target .compat/$(TORCH) torch==$(TORCH) torchvision==$(TORCHVISION)
	PYTHONPATH=.compat/$(TORCH) $(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	PYTHONPATH=.compat/$(TORCH) $(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .compat runs
