#!/usr/bin/env bash
# On a GPU host without a package index, after the vLLM bundle is installed (README: GPU benchmark):
# installs this package next to it, then runs the decode-latency benchmark with the given arguments.
#   bash benchmarks/gpu_host.sh --models llama-3.1-8b --variants dense caprese
set -euo pipefail
SITE=${SITE:-/tmp/site}
python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target "$SITE" . >&2 2>/dev/null
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)" >&2
exec python3 benchmarks/decode_latency.py "$@"
