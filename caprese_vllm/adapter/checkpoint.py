"""Adapter checkpoints: a directory with `caprese.json` and `adapter.safetensors`.

Tensors: `layers.{i}.lowrank_a` [hidden, r_i] and `layers.{i}.lowrank_b` [r_i, hidden] for every
layer i in the manifest's `lowrank.ranks`. Loading checks everything (manifest schema, format
version, tensor set, shapes, dtypes, finiteness) and, against a base model, every `base_model`
field and (check_dtype) finiteness in the dtype it is served in; each failure is one `AdapterError`
line naming the file and field or tensor, and the fix. Tensors are read onto the CPU whatever
torch's default device (vLLM builds models under CUDA's).

Each file is read once, into memory, and everything is checked on and loaded from that copy (issue 17
item 4): the digest in `integrity` is of the bytes read, and the tensors own their memory, so rewriting
or truncating the files after loading changes nothing served (a memory map would serve the new bytes
unchecked, or die of SIGBUS). Reads are bounded (item 12): `caprese.json` up to MAX_MANIFEST_BYTES and
MAX_MANIFEST_DEPTH levels of nesting, checked before parsing; `adapter.safetensors` up to the size its
manifest's ranks imply plus MAX_HEADER_BYTES.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from caprese_vllm.adapter.manifest import (
    FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, BaseModelInfo, CapreseManifest, Integrity,
)
from caprese_vllm.file_modes import share_like_open

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_MANIFEST_BYTES = 1 << 20      # a real caprese.json is a few KiB
MAX_MANIFEST_DEPTH = 32           # nesting of objects/arrays; a real one has 4
MAX_HEADER_BYTES = 1 << 20        # safetensors JSON header allowance above the tensors' payload


class AdapterError(ValueError):
    """An adapter cannot be used; the message is one line: where, what, and the fix."""


def tensor_names(layer: int) -> tuple[str, str]:
    return f"layers.{layer}.lowrank_a", f"layers.{layer}.lowrank_b"


@dataclass
class CapreseAdapter:
    manifest: CapreseManifest
    lowrank_a: dict[int, torch.Tensor]  # layer -> [H, r]
    lowrank_b: dict[int, torch.Tensor]  # layer -> [r, H]

    # ---- writing -------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write atomically: tensors first, manifest last (with both files' digests), both via rename."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = _DTYPES[self.manifest.lowrank.dtype]
        tensors = {}
        for layer in self.manifest.lowrank.ranks:
            name_a, name_b = tensor_names(layer)
            tensors[name_a] = self.lowrank_a[layer].detach().to("cpu", dtype).contiguous()
            tensors[name_b] = self.lowrank_b[layer].detach().to("cpu", dtype).contiguous()
        tmp = directory / (TENSORS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "caprese_format_version": str(FORMAT_VERSION)})
        share_like_open(tmp)  # safetensors writes 0600; the server image reads it as another user
        tensors_sha256 = _file_sha256(tmp)
        tmp.replace(directory / TENSORS_FILE)
        manifest = self.manifest.model_copy(update={"integrity": None})
        self.manifest = manifest.model_copy(update={"integrity": Integrity(
            manifest_sha256=manifest.content_sha256(), tensors_sha256=tensors_sha256)})
        tmp = directory / (MANIFEST_FILE + ".tmp")
        tmp.write_text(self.manifest.model_dump_json(indent=2, exclude=self.manifest.unset_optional()) + "\n")
        tmp.replace(directory / MANIFEST_FILE)
        return directory

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> CapreseAdapter:
        directory = Path(directory)
        manifest = load_manifest(directory)
        path = directory / TENSORS_FILE
        data = _read_tensors_file(path, manifest)  # the one read: tensors and digest both come from it
        with torch.device("cpu"):
            tensors = _parse_tensors(path, data)
        _check_tensors_digest(path, manifest, data)
        lowrank_a, lowrank_b = _check_tensors(path, manifest, tensors)
        return cls(manifest=manifest, lowrank_a={k: v.to(device) for k, v in lowrank_a.items()},
                   lowrank_b={k: v.to(device) for k, v in lowrank_b.items()})

    def check_dtype(self, dtype: torch.dtype, where: str = TENSORS_FILE) -> None:
        """Fail unless every tensor stays finite once cast to `dtype`, the one it is served in (loading
        checks finiteness as stored: 1e5 is finite in float32 and bfloat16 but Inf in float16)."""
        for layer in sorted(self.lowrank_a):
            for name, t in zip(tensor_names(layer), (self.lowrank_a[layer], self.lowrank_b[layer])):
                if not torch.isfinite(t.to(dtype)).all():
                    raise AdapterError(
                        f"{where}: tensor {name} has values up to {float(t.abs().max()):.4g}, beyond {dtype}'s "
                        f"range (max {torch.finfo(dtype).max:.4g}) once cast to the serving dtype; serve with "
                        "--dtype bfloat16 or float32, or distil the adapter again")

    def check_base(self, base: BaseModelInfo, source: str = "the base model") -> None:
        """Fail unless this adapter was fitted on `base` (every base_model field must match)."""
        mine = self.manifest.base_model
        for field in BaseModelInfo.model_fields:
            want, got = getattr(mine, field), getattr(base, field)
            if want != got:
                raise AdapterError(
                    f"{MANIFEST_FILE}: base_model.{field} is {want!r} but {source} has {got!r}: this "
                    "adapter was made for another model; distil one for this model (caprese-distill)"
                )


def load_manifest(directory: Path) -> CapreseManifest:
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter directory does not exist or is not a directory; "
                           "pass the folder that holds caprese.json and adapter.safetensors")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)  # bounded: a huge file is refused, never read whole
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing; an adapter directory needs {MANIFEST_FILE} and "
                           f"{TENSORS_FILE}") from None
    except OSError as err:
        raise AdapterError(f"{path}: unreadable ({err}); check the file's permissions") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise AdapterError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB (an adapter manifest is a few KiB): "
                           "not a caprese.json; copy the adapter again")
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON (not UTF-8: {err.reason} at byte {err.start}); the file is "
                           "corrupt: copy it again") from None
    depth = json_depth(text)
    if depth > MAX_MANIFEST_DEPTH:
        raise AdapterError(f"{path}: JSON nested {depth} levels deep (at most {MAX_MANIFEST_DEPTH}): not a "
                           "caprese.json; copy the adapter again")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); the file is "
                           "truncated or corrupt: copy it again") from None
    except ValueError as err:  # e.g. an integer literal beyond Python's 4300-digit limit
        raise AdapterError(f"{path}: not valid JSON ({str(err).splitlines()[0]}); the file is corrupt: "
                           "copy it again") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{path}: expected a JSON object at the top level")
    version = raw.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise AdapterError(f"{path}: format_version {version} is newer than this caprese-vllm reads "
                           f"({FORMAT_VERSION}); upgrade caprese-vllm")
    try:
        manifest = CapreseManifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise AdapterError(f"{path}: field {loc}: {first['msg']}; fix the field or re-export the "
                           "adapter with caprese-distill") from None
    if manifest.integrity is not None and manifest.content_sha256() != manifest.integrity.manifest_sha256:
        raise AdapterError(f"{path}: content does not match integrity.manifest_sha256 written at export: the "
                           "file is corrupt or was edited; copy the adapter again (to serve at another "
                           "density or tensor-parallel selection, pass caprese_density or "
                           "caprese_tp_selection instead of editing the file)")
    return manifest


# A JSON string, or an unterminated one up to the end: every match succeeds, so the scan stays linear.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\(?:.|\Z))*(?:"|\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """Deepest nesting of objects and arrays in JSON `text` (brackets inside strings ignored), in linear time
    and without recursion: json.loads raises RecursionError on deep input, and pydantic recurses again."""
    import numpy as np

    brackets = np.frombuffer(_NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode(), dtype=np.uint8)
    if brackets.size == 0:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return max(0, int(np.cumsum(steps).max()))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_tensors_file(path: Path, manifest: CapreseManifest) -> bytes:
    """The file's bytes, read once; refused when longer than the manifest's tensors need (plus a header)."""
    itemsize = _DTYPES[manifest.lowrank.dtype].itemsize
    limit = sum(2 * manifest.base_model.hidden_size * r * itemsize for r in manifest.lowrank.ranks.values())
    limit += MAX_HEADER_BYTES
    if not path.is_file():
        raise AdapterError(f"{path}: missing; an adapter directory needs {MANIFEST_FILE} and {TENSORS_FILE}")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise AdapterError(f"{path}: unreadable ({err.strerror}); check the file's permissions") from None
    if len(data) > limit:
        raise AdapterError(f"{path}: more than the {limit} bytes that {MANIFEST_FILE} lowrank.ranks and dtype allow "
                           "(tensors plus a 1 MiB header): not this adapter's tensors; copy the adapter again")
    return data


def _check_tensors_digest(path: Path, manifest: CapreseManifest, data: bytes) -> None:
    if manifest.integrity is None:
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.integrity.tensors_sha256:
        raise AdapterError(f"{path}: sha256 {actual[:12]}... differs from {MANIFEST_FILE} "
                           f"integrity.tensors_sha256 {manifest.integrity.tensors_sha256[:12]}...: the file is "
                           "corrupt or from another export; copy the adapter again")


def _parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    """Tensors that own their memory (cloned out of `data`'s read-only buffers), on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        with warnings.catch_warnings():  # torch.frombuffer on read-only bytes; cloned right away
            warnings.simplefilter("ignore", UserWarning)
            return {name: t.clone() for name, t in load(data).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AdapterError(f"{path}: not a readable safetensors file ({reason}); the file is truncated "
                           "or corrupt: copy it again") from None


def _check_tensors(path: Path, manifest: CapreseManifest, tensors: dict[str, torch.Tensor]):
    hidden = manifest.base_model.hidden_size
    dtype = _DTYPES[manifest.lowrank.dtype]
    expected: dict[str, tuple[int, int]] = {}
    for layer, rank in manifest.lowrank.ranks.items():
        name_a, name_b = tensor_names(layer)
        expected[name_a], expected[name_b] = (hidden, rank), (rank, hidden)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise AdapterError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all) although "
                           f"{MANIFEST_FILE} lowrank.ranks lists its layer; re-export the adapter")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise AdapterError(f"{path}: unexpected tensor {extra[0]} ({len(extra)} in all) that {MANIFEST_FILE} "
                           "lowrank.ranks does not list; re-export the adapter")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise AdapterError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {shape} "
                               f"(hidden_size x rank from {MANIFEST_FILE}); re-export the adapter")
        if t.dtype != dtype:
            raise AdapterError(f"{path}: tensor {name} is {t.dtype}, but {MANIFEST_FILE} lowrank.dtype says "
                               f"{manifest.lowrank.dtype}; re-export the adapter")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{path}: tensor {name} contains NaN or Inf; the distillation diverged: "
                               "distil again (lower learning rate)")
    lowrank_a = {layer: tensors[tensor_names(layer)[0]] for layer in manifest.lowrank.ranks}
    lowrank_b = {layer: tensors[tensor_names(layer)[1]] for layer in manifest.lowrank.ranks}
    return lowrank_a, lowrank_b
