"""caprese-vllm: Caprese (sparse FF + distilled low-rank recovery path) for vLLM serving."""

__version__ = "0.1.0"
