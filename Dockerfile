# caprese-vllm on top of a vLLM OpenAI-server image. The adapter is mounted at run time, never baked in.
#   docker build --build-arg BASE_IMAGE=vllm/vllm-openai:v0.26.0 -t caprese-vllm .
ARG BASE_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${BASE_IMAGE}
WORKDIR /opt/caprese-vllm
COPY pyproject.toml README.md ./
COPY caprese_vllm ./caprese_vllm
COPY distill ./distill
# --no-deps: the base image already carries vLLM, torch and transformers at versions vLLM pins.
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -m pip install --no-cache-dir gguf accelerate tqdm
ENTRYPOINT ["vllm", "serve"]
