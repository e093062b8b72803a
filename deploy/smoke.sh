#!/usr/bin/env bash
# Deployment smoke test: build the CPU image from a locally made base (no Docker Hub), bring the compose
# CPU profile up with SmolLM2 and its distilled adapter, send one chat request, tear everything down.
#
#   bash deploy/smoke.sh          exit 0: passed   exit 1: failed   exit 3: skipped (no working docker)
#
# Needs: a docker daemon, docker compose (v2 plugin or docker-compose v1), debootstrap (for the base image,
# built once and kept as caprese-base:bookworm), the repo's venv (`make install`) for the model and adapter.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
BASE_IMAGE=${CPU_BASE_IMAGE:-caprese-base:bookworm}
IMAGE=${CAPRESE_CPU_IMAGE:-caprese-vllm:cpu}
PORT=${SMOKE_PORT:-18080}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
BIN=${VENV:-.venv}/bin
say() { echo "smoke: $*"; }

if ! docker info >/dev/null 2>&1; then
  say "SKIPPED: no working docker daemon here ('docker info' failed); start dockerd (apt-get install docker.io) to run it"
  exit 3
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
"${compose[@]}" version >/dev/null 2>&1 || { say "FAILED: neither 'docker compose' nor 'docker-compose' works"; exit 1; }

# 1. Base image: a Debian rootfs with python3 3.11, made here (there is no Docker Hub to pull from).
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { say "FAILED: debootstrap missing (apt-get install debootstrap)"; exit 1; }
  rootfs=$(mktemp -d /tmp/caprese-rootfs.XXXXXX)
  say "building base image $BASE_IMAGE with debootstrap (a few minutes, once)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,g++,libnuma1,curl,ca-certificates \
    bookworm "$rootfs" http://deb.debian.org/debian >/tmp/caprese-debootstrap.log 2>&1 \
    || { say "FAILED: debootstrap (log: /tmp/caprese-debootstrap.log)"; exit 1; }
  tar -C "$rootfs" -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi

# 2. The model and the adapter the container mounts (both built on the host, cached).
MODEL_DIR=$("$BIN/caprese-models" fetch smollm2-135m)
RUN_DIR=${RUN_DIR:-${CAPRESE_CACHE_DIR:-$HOME/.cache/caprese}/runs/smollm2-135m}
# Resumes a finished run in ~1 min (and repairs an adapter saved 0600 before files got the umask's mode:
# the container reads it as another user); distils it first on a fresh machine (CPU, ~20 min, once).
say "caprese-distill run --preset smollm2-135m --run-dir $RUN_DIR (log: /tmp/caprese-smoke-distill.log)"
"$BIN/caprese-distill" run --preset smollm2-135m --run-dir "$RUN_DIR" >/tmp/caprese-smoke-distill.log 2>&1 \
  || { tail -5 /tmp/caprese-smoke-distill.log; say "FAILED: caprese-distill run"; exit 1; }
VLLM_API_KEY=smoke-$RANDOM$RANDOM
export MODEL_DIR ADAPTER_DIR="$RUN_DIR/adapter" PORT CAPRESE_CPU_IMAGE="$IMAGE" CPU_BASE_IMAGE="$BASE_IMAGE" \
  SERVED_MODEL_NAME=smollm2-caprese MAX_MODEL_LEN=2048 VLLM_API_KEY

# 3. The image. The host's CA bundle and the torch CPU wheel (not on PyPI) go in through .build/.
mkdir -p .build/wheels
trap 'rm -rf "$repo/.build/ca.crt" "$repo/.build/wheels"' EXIT
cp "$CA_BUNDLE" .build/ca.crt
cp "$TORCH_WHEEL_DIR"/torch-*+cpu-*.whl .build/wheels/ 2>/dev/null || say "no local torch CPU wheel in $TORCH_WHEEL_DIR"
say "building $IMAGE on $BASE_IMAGE (log: /tmp/caprese-docker-build.log)"
DOCKER_BUILDKIT=0 docker build --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VLLM_EXTRA=cpu -t "$IMAGE" . \
  >/tmp/caprese-docker-build.log 2>&1 || { tail -30 /tmp/caprese-docker-build.log; say "FAILED: docker build"; exit 1; }
tail -1 /tmp/caprese-docker-build.log

# 4. Up, request, down.
project=caprese-smoke-$$
dc() { "${compose[@]}" -p "$project" -f deploy/docker-compose.yml --profile cpu "$@"; }
cleanup() { dc logs --no-color >/tmp/caprese-smoke-server.log 2>&1 || true; dc down -v >/dev/null 2>&1 || true;
            rm -rf "$repo/.build/ca.crt" "$repo/.build/wheels"; }
trap cleanup EXIT
say "compose up (cpu profile) on 127.0.0.1:$PORT"
dc up -d --no-build
container=$(dc ps -q caprese-cpu)
deadline=$((SECONDS + 900))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ]; do
  state=$(docker inspect -f '{{.State.Status}}' "$container")
  restarts=$(docker inspect -f '{{.RestartCount}}' "$container")
  if [ "$state" != running ] || [ "$restarts" != 0 ] || [ $SECONDS -gt $deadline ]; then
    dc logs --no-color | grep -E "Error|error" | tail -5
    dc logs --no-color | tail -40; say "FAILED: server $state (restarts: $restarts), not healthy"; exit 1
  fi
  sleep 5
done
say "healthy after ${SECONDS}s"
# Image hygiene: no build extras in any layer, an unprivileged user.
history=$(docker history --no-trunc "$IMAGE")
if grep -q "\.build" <<<"$(grep -v "^IMAGE" <<<"$history" | grep -iE "COPY|ADD")"; then
  say "FAILED: a layer of $IMAGE copies .build/ (CA bundle, wheels)"; exit 1; fi
user=$(docker exec "$container" id -u)
[ "$user" != 0 ] || { say "FAILED: the server runs as root"; exit 1; }
say "server runs as uid $user; no .build/ layer"
# The API key: refused without it, answered with it.
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/v1/models")
[ "$code" = 401 ] || { say "FAILED: /v1/models without the API key answered $code, not 401"; exit 1; }
reply=$(curl -fsS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -H "Authorization: Bearer $VLLM_API_KEY" \
  -d '{"model": "smollm2-caprese", "temperature": 0, "max_tokens": 40,
       "messages": [{"role": "user", "content": "Please reason step by step. What is 6 times 7?"}]}')
echo "$reply"
content=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])' <<<"$reply")
[ -n "$content" ] || { say "FAILED: empty answer"; exit 1; }
# (whole outputs first: `cmd | grep -m1` would fail under pipefail when grep closes the pipe early)
server_log=$(dc logs --no-color)
grep -m1 "caprese: serving" <<<"$server_log" || { say "FAILED: no adapter summary in the server log"; exit 1; }
metrics=$(curl -fsS "http://127.0.0.1:$PORT/metrics")
policy=$(docker inspect -f '{{.HostConfig.RestartPolicy.Name}}' "$container")
[ "$policy" = unless-stopped ] || { say "FAILED: restart policy is '$policy'"; exit 1; }
grep '^caprese:' <<<"$metrics" || { say "FAILED: no caprese metrics"; exit 1; }
say "PASSED"
