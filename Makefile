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

.PHONY: install install-test demo test test-fast bench bench-remote clean help

help:
	@echo "make demo      - install, make a sample SD1.x checkpoint, convert it to openai and hf, then a"
	@echo "                 scorer-ready whole CLIP with a sample reference (and its CLIPScore, if torchmetrics is installed)"
	@echo "make test      - install with the test oracles, run the test suite"
	@echo "make test-fast - the quick tier: the tests marked neither oracle nor fullsize (a few minutes)"
	@echo "make bench     - full-scale benchmark (~15 min, ~9 GB of temporary disk; BENCH_ARGS=--quick to try it)"
	@echo "make bench-remote - sdconv reading a URL vs. downloading then converting, over a capped loopback"
	@echo "                 server (~15 min, ~17 GB of temporary disk; BENCH_ARGS=--quick, --bandwidth MB/s)"
	@echo "make clean     - remove the venv and demo output"

$(VENV)/.run-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[remote]"
	touch $@

$(VENV)/.test-installed: $(VENV)/.run-installed pyproject.toml
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[test]"
	$(PY) -m pip check
	$(PY) -c "import torch; v = torch.__version__; assert v.startswith('2.13.0') and '+cu' not in v, f'torch {v}: the CPU build 2.13.0 is expected'"
	touch $@

install: $(VENV)/.run-installed
install-test: $(VENV)/.test-installed

# Step 7 scores only where torchmetrics and transformers are installed (test extras, not run-time
# dependencies; `make test` installs them). They are looked up without importing them: beside the
# CPU torch the pinned torchvision fails at import, which examples/clipscore.py handles.
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
	@echo "== 5. a sample reference CLIP: ViT-L/14's shape, random weights; its text tower is the sample"
	@echo "      checkpoint's own (same preset and seed), as SD1.x's text encoder started from OpenAI ViT-L/14"
	$(SDCONV) sample $(DEMO)/clip-vit-l-14-sample.pt --layout openai --preset vit-l-14 --whole-clip
	@echo "== 6. a scorer-ready whole CLIP: the checkpoint's text tower + the reference's projection and vision tower"
	$(SDCONV) convert $(DEMO)/sd15-sample.safetensors -o $(DEMO)/sd15-clip-hf --to hf --with-vision $(DEMO)/clip-vit-l-14-sample.pt
	@echo "== 7. CLIPScore with it in torchmetrics (docs/clipscore.md), on a synthetic image:"
	@echo "      random weights, so the number means nothing; the route is what is shown"
	@if $(PY) -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('torchmetrics', 'transformers')))"; then \
	   $(PY) examples/clipscore.py $(DEMO)/sd15-clip-hf --prompt "a photo of a cat"; \
	 else \
	   echo "torchmetrics and transformers are not installed in $(VENV) (make test installs them); then this prints the score:"; \
	   echo "  $(PY) examples/clipscore.py $(DEMO)/sd15-clip-hf --prompt \"a photo of a cat\""; \
	 fi
	@echo "== done: outputs in $(DEMO)/"
	@ls -l $(DEMO) $(DEMO)/clip-l-hf $(DEMO)/sd15-clip-hf

test: install-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q

# The quick tier: no consumer-library oracles, no full-size checkpoints (markers in pyproject.toml).
test-fast: install-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -m "not oracle and not fullsize"

# Generates full-size synthetic SD1.5/SDXL checkpoints, times sdconv against the floor and the
# usual ways (warm and cold page cache), writes bench/results.md and bench/results.json, deletes
# its files. Cold runs drop the page cache, which needs root. BENCH_ARGS: e.g. --quick, --dir PATH.
BENCH_ARGS ?=
bench: install-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) bench/bench.py $(BENCH_ARGS)

# Serves the same synthetic checkpoints from tests/helpers/rangeserver.py on 127.0.0.1 with a capped
# bandwidth (100 MB/s unless BENCH_ARGS="--bandwidth N"), times `sdconv convert URL` against a curl
# download then `sdconv convert FILE`, counts the bytes the server sent, writes
# bench/remote_results.md and bench/remote_results.json, deletes its files.
bench-remote: install-test
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 $(PY) bench/remote_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO)

# Batch conversion of a folder, in parallel and incremental:
#   make -j4 convert IN=models OUT=encoders TO=openai [FROM=auto] [ENCODER=all] [FORMAT=safetensors] [ARGS=...]
# Each checkpoint in IN (not recursive) becomes OUT/<name>... (sdconv's batch naming). A second
# run converts only new or changed inputs; failures do not stop the others and are listed at the
# end (exit 1). Stamps and error logs live in OUT/.sdconv-make/.
IN      ?=
OUT     ?=
TO      ?= openai
FROM    ?= auto
ENCODER ?=
FORMAT  ?= safetensors
ARGS    ?=
STAMPS   = $(OUT)/.sdconv-make
CONVERT_INPUTS := $(if $(IN),$(sort $(wildcard $(addprefix $(IN)/*,.safetensors .ckpt .pt .pth .bin))))
CONVERT_DONE   := $(patsubst $(IN)/%,$(STAMPS)/%.done,$(CONVERT_INPUTS))

.PHONY: convert
convert: $(CONVERT_DONE)
	@if [ -z "$(IN)" ] || [ -z "$(OUT)" ]; then echo "usage: make convert IN=dir OUT=dir TO=layout [ENCODER=all] ..."; exit 2; fi
	@failed="$$(ls $(STAMPS)/*.failed 2>/dev/null)"; \
	 echo "make convert: $(words $(CONVERT_INPUTS)) inputs; $$(ls $(STAMPS)/*.done 2>/dev/null | wc -l) done, $$(echo "$$failed" | grep -c . ) failed"; \
	 if [ -n "$$failed" ]; then for f in $$failed; do echo "  $$(cat $$f)"; done; exit 1; fi

$(STAMPS)/%.done: $(IN)/% | $(VENV)/.run-installed
	@mkdir -p $(STAMPS); rm -f $(STAMPS)/$*.failed
	@if $(SDCONV) convert "$<" -o "$(OUT)/" --to $(TO) --from $(FROM) $(if $(ENCODER),--encoder $(ENCODER)) \
	      --format $(FORMAT) -q $(ARGS) 2> $(STAMPS)/$*.err; then \
	   touch $@; rm -f $(STAMPS)/$*.err; echo "converted $<"; \
	 else grep -v '^summary' $(STAMPS)/$*.err | tail -n 1 > $(STAMPS)/$*.failed; rm -f $(STAMPS)/$*.err $@; \
	   echo "FAILED $<"; fi
