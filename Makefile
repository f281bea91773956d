# sdconv — the two set-up commands are `make demo` and `make test`.
# Everything installs into .venv (override with VENV=...). torch is pinned to the CPU build
# that this project tests against; the test extras pin the consumer libraries so that they
# never swap it for a CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
SDCONV  = $(VENV)/bin/sdconv
TORCH_PIN = torch==2.13.0
DEMO   ?= demo-out

.PHONY: install install-test demo test clean help

help:
	@echo "make demo   - install, make a sample SD1.x checkpoint, convert it to openai and hf"
	@echo "make test   - install with the test oracles, run the test suite"
	@echo "make clean  - remove the venv and demo output"

$(VENV)/.run-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.run-installed pyproject.toml
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[test]"
	$(PY) -m pip check
	$(PY) -c "import torch; v = torch.__version__; assert v.startswith('2.13.0') and '+cu' not in v, f'torch {v}: the CPU build 2.13.0 is expected'"
	touch $@

install: $(VENV)/.run-installed
install-test: $(VENV)/.test-installed

demo: install
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@echo "== 1. a sample SD1.x checkpoint (random weights, the real SD1.x text-encoder keys, full size)"
	$(SDCONV) sample $(DEMO)/sd15-sample.safetensors --preset vit-l-14
	@echo "== 2. what sdconv sees in it (dry run: nothing written)"
	$(SDCONV) convert $(DEMO)/sd15-sample.safetensors -o $(DEMO)/clip-l-openai.safetensors --to openai --dry-run | head -n 16
	@echo "== 3. to an OpenAI CLIP text-tower state dict"
	$(SDCONV) convert $(DEMO)/sd15-sample.safetensors -o $(DEMO)/clip-l-openai.safetensors --to openai
	@echo "== 4. to a transformers CLIPTextModel folder"
	$(SDCONV) convert $(DEMO)/sd15-sample.safetensors -o $(DEMO)/clip-l-hf --to hf
	@echo "== done: outputs in $(DEMO)/"
	@ls -l $(DEMO) $(DEMO)/clip-l-hf

test: install-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
