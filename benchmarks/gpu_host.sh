#!/usr/bin/env bash
# On a GPU host without a package index, after the vLLM bundle is installed (README: GPU sections):
# installs this package next to it, then runs a script (default decode_latency.py) or a module (-m).
#   bash benchmarks/gpu_host.sh --models llama-3.1-8b --variants dense caprese
#   bash benchmarks/gpu_host.sh benchmarks/gpu_equivalence.py --model-dir DIR --adapter DIR
#   bash benchmarks/gpu_host.sh -m distill.cli run --preset gsm8k-paper --model DIR ...   # caprese-distill
#   bash benchmarks/gpu_host.sh -m caprese_vllm.zoo.cli fetch qwen2.5-coder-0.5b           # caprese-models
set -euo pipefail
SITE=${SITE:-/tmp/site}
run=(benchmarks/decode_latency.py)
if [[ "${1:-}" == "-m" ]]; then run=(-m "$2"); shift 2
elif [[ "${1:-}" == *.py ]]; then run=("$1"); shift; fi
python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target "$SITE" . >&2 2>/dev/null
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
exec python3 "${run[@]}" "$@"
