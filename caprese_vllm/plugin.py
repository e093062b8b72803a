"""vLLM general plugin entry point (`vllm.general_plugins` -> `caprese = caprese_vllm.plugin:register`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly
more than once per process, so it must be idempotent and cheap.
"""

from __future__ import annotations

import logging

from caprese_vllm import __version__

# A child of vLLM's logger, so our lines carry vLLM's format and process prefix.
logger = logging.getLogger("vllm.caprese")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm

    _registered = True
    logger.info("caprese-vllm %s plugin registered (vLLM %s)", __version__, vllm.__version__)
