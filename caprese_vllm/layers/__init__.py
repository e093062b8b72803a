"""vLLM layers that Caprese puts into served models."""
