"""Caprese inside the vLLM engine: per-step request info, per-request state, model installation."""
