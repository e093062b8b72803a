"""Adapter checkpoints: round trip, and every kind of bad adapter refused with one clear line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from caprese_vllm.adapter import (
    MANIFEST_FILE, TENSORS_FILE, AdapterError, CapreseAdapter, base_info_from_dir, base_info_from_model,
    synthetic_adapter,
)
from caprese_vllm.methods import MethodSpec
from caprese_vllm.reference import patch_model, unpatch_model


@pytest.fixture(scope="module")
def smol_base(hf_models):
    return base_info_from_model(hf_models["smollm2-135m"][0])


@pytest.fixture
def adapter_dir(smol_base, tmp_path):
    method = MethodSpec(name="griffin", density=0.5, layers=[0, 1, 2])
    return synthetic_adapter(smol_base, method, rank=8, scale=0.5, seed=1).save(tmp_path / "adapter")


def edit_manifest(directory, **changes):
    """Hand edits, as to an adapter without export digests (those are tested on their own below)."""
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["integrity"] = None
    for dotted, value in changes.items():
        node, *keys = [data, *dotted.split("__")]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path.write_text(json.dumps(data))


def edit_tensors(directory, fn):
    edit_manifest(directory)
    path = directory / TENSORS_FILE
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def refuse(directory, *fragments):
    with pytest.raises(AdapterError) as err:
        CapreseAdapter.load(directory)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_round_trip(adapter_dir, smol_base):
    loaded = CapreseAdapter.load(adapter_dir)
    assert loaded.manifest.base_model == smol_base
    assert loaded.manifest.lowrank.ranks == {0: 8, 1: 8, 2: 8}
    assert loaded.lowrank_a[1].shape == (576, 8) and loaded.lowrank_b[1].shape == (8, 576)
    loaded.check_base(smol_base)


def test_fingerprint_from_files_equals_fingerprint_of_loaded_model(model_dirs, hf_models):
    for name, path in model_dirs.items():
        assert base_info_from_dir(path) == base_info_from_model(hf_models[name][0]), name


def test_missing_directory(tmp_path):
    refuse(tmp_path / "nope", "does not exist")


def test_missing_manifest(adapter_dir):
    (adapter_dir / MANIFEST_FILE).unlink()
    refuse(adapter_dir, MANIFEST_FILE, "missing")


def test_truncated_manifest(adapter_dir):
    path = adapter_dir / MANIFEST_FILE
    path.write_text(path.read_text()[:50])
    refuse(adapter_dir, MANIFEST_FILE, "not valid JSON")


def test_truncated_tensors(adapter_dir):
    path = adapter_dir / TENSORS_FILE
    path.write_bytes(path.read_bytes()[:100])
    refuse(adapter_dir, TENSORS_FILE, "not a readable safetensors")


def test_export_digests_catch_an_edited_manifest(adapter_dir):
    path = adapter_dir / MANIFEST_FILE
    path.write_text(path.read_text().replace('"density": 0.5', '"density": 0.7'))
    refuse(adapter_dir, MANIFEST_FILE, "integrity.manifest_sha256", "caprese_density")


def test_export_digests_catch_a_flipped_weight_bit(adapter_dir):
    path = adapter_dir / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's payload: still a valid safetensors file
    path.write_bytes(bytes(data))
    refuse(adapter_dir, TENSORS_FILE, "integrity.tensors_sha256")


def test_future_format_version(adapter_dir):
    edit_manifest(adapter_dir, format_version=99)
    refuse(adapter_dir, "format_version 99", "upgrade caprese-vllm")


@pytest.mark.parametrize("field,value,fragment", [
    ("method__density", 0.0, "method.density"),
    ("method__density", 1.5, "method.density"),
    ("lowrank__ranks", {"0": 0, "1": 8, "2": 8}, "lowrank.ranks[0] = 0"),
    ("lowrank__ranks", {"0": 9999, "1": 8, "2": 8}, "hidden_size=576"),
    ("method__name", "magic", "method.name"),
    ("base_model__hidden_size", "wide", "base_model.hidden_size"),
    ("method__layers", [0, 1, 30], "method.layers [30] out of range for a model with 30 layers"),
])
def test_bad_manifest_fields(adapter_dir, field, value, fragment):
    edit_manifest(adapter_dir, **{field: value})
    refuse(adapter_dir, MANIFEST_FILE, fragment)


def test_missing_tensor(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.pop("layers.1.lowrank_b"))
    refuse(adapter_dir, "layers.1.lowrank_b is missing")


def test_extra_tensor(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.__setitem__("layers.7.lowrank_a", torch.zeros(576, 8)))
    refuse(adapter_dir, "unexpected tensor layers.7.lowrank_a")


def test_wrong_shape(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.__setitem__("layers.0.lowrank_a", torch.zeros(576, 4)))
    refuse(adapter_dir, "layers.0.lowrank_a has shape (576, 4), expected (576, 8)")


def test_wrong_dtype(adapter_dir):
    edit_tensors(adapter_dir, lambda t: t.__setitem__("layers.0.lowrank_a", t["layers.0.lowrank_a"].half()))
    refuse(adapter_dir, "layers.0.lowrank_a is torch.float16", "lowrank.dtype")


def test_nan_tensor(adapter_dir):
    def poison(t):
        t["layers.2.lowrank_b"][0, 0] = float("nan")
    edit_tensors(adapter_dir, poison)
    refuse(adapter_dir, "layers.2.lowrank_b contains NaN or Inf")


@pytest.mark.parametrize("field,value", [
    ("hidden_size", 640), ("intermediate_size", 2048), ("num_layers", 18),
    ("fingerprint", "sha256:00000000000000000000000000000000"), ("architecture", "Gemma3ForCausalLM"),
])
def test_adapter_for_another_base_model_is_refused_before_patching(smol_base, tmp_path, hf_models, field, value):
    other_base = smol_base.model_copy(update={field: value})
    method = MethodSpec(name="griffin", density=0.5, layers=[0, 1, 2])
    saved = synthetic_adapter(other_base, method, rank=8, scale=0.5).save(tmp_path / "other")
    adapter = CapreseAdapter.load(saved)  # self-consistent, just not for this model
    model = hf_models["smollm2-135m"][0]
    with pytest.raises(AdapterError, match=f"base_model.{field} is"):
        patch_model(model, adapter=adapter)
    assert getattr(model, "_caprese_runtime", None) is None, "nothing may be half-patched"
    unpatch_model(model)


def test_adapter_of_other_real_model_is_refused(adapter_dir, hf_models):
    with pytest.raises(AdapterError, match="base_model.architecture"):
        patch_model(hf_models["gemma3-270m"][0], adapter=CapreseAdapter.load(adapter_dir))


def _corrupt(data: bytes, rng) -> bytes:
    """One random corruption: flip bytes, truncate, cut a hole, append junk, or duplicate a slice."""
    kind = rng.choice(["flip", "truncate", "hole", "append", "duplicate"])
    n = len(data)
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == "truncate":
        return data[:rng.randrange(n)]
    if kind == "hole":
        a = rng.randrange(n)
        return data[:a] + data[a + rng.randint(1, 64):]
    if kind == "append":
        return data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    a = rng.randrange(n)
    return data[:a] + data[a:a + 32] + data[a:]


def test_fuzz_random_corruptions_are_refused_or_harmless(adapter_dir):
    """200 random corruptions of a valid adapter's files: each load either fails with one AdapterError line
    naming the file, or gives back exactly the original adapter (a flipped bit in JSON whitespace, say),
    never a different model, a hang or another exception."""
    import random
    import time

    original = CapreseAdapter.load(adapter_dir)
    files = {name: (adapter_dir / name).read_bytes() for name in (MANIFEST_FILE, TENSORS_FILE)}
    rng = random.Random(1234)
    outcomes = {"refused": 0, "harmless": 0}
    for case in range(200):
        name = rng.choice(sorted(files))
        (adapter_dir / name).write_bytes(_corrupt(files[name], rng))
        start = time.monotonic()
        try:
            loaded = CapreseAdapter.load(adapter_dir)
        except AdapterError as err:
            message = str(err)
            assert "\n" not in message and (name in message or str(adapter_dir) in message), (case, message)
            outcomes["refused"] += 1
        else:  # accepted (the digests make this rare): it must be the very same adapter
            assert loaded.manifest == original.manifest, case
            for layer in original.lowrank_a:
                assert torch.equal(loaded.lowrank_a[layer], original.lowrank_a[layer]), case
                assert torch.equal(loaded.lowrank_b[layer], original.lowrank_b[layer]), case
            outcomes["harmless"] += 1
        assert time.monotonic() - start < 10, f"case {case}: loading took too long"
        (adapter_dir / name).write_bytes(files[name])
    assert outcomes["refused"] >= 150, outcomes


def test_density_that_keeps_no_neuron_is_refused(adapter_dir):
    """Issue 17 item 5: k = int(1536 * 0.0005) = 0 failed on the first decode step."""
    edit_manifest(adapter_dir, method__density=0.0005)
    refuse(adapter_dir, MANIFEST_FILE, "method.density 0.0005 keeps int(1536 * 0.0005) = 0", "density >= 0.000652")


def test_served_tensors_are_the_bytes_read_not_the_file(adapter_dir):
    """Issue 17 item 4: tensors were memory-mapped, so rewriting the file in place after validation changed
    what would be copied into the model (NaN here), unchecked. Loading now keeps its own copy."""
    loaded = CapreseAdapter.load(adapter_dir)
    before = loaded.lowrank_b[2].clone()
    path = adapter_dir / TENSORS_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:  # in place: same inode, same size, the last tensor's payload turned to NaN
        f.seek(size - 4 * before.numel())
        f.write(torch.full((before.numel(),), float("nan")).numpy().tobytes())
    assert torch.equal(loaded.lowrank_b[2], before)
    refuse(adapter_dir, TENSORS_FILE, "integrity.tensors_sha256")  # a fresh load sees the new bytes, and refuses


def test_truncating_the_file_after_loading_leaves_the_loaded_tensors(adapter_dir):
    """Issue 17 item 4: with memory-mapped tensors, truncating the file killed the process with SIGBUS
    when they were read; run in a child so that the failure it guards against cannot take pytest down."""
    import subprocess
    import sys

    original = CapreseAdapter.load(adapter_dir)
    out = adapter_dir.parent / "after_truncation.safetensors"
    script = ("import sys\nfrom safetensors.torch import save_file\nfrom caprese_vllm.adapter import CapreseAdapter\n"
              "a = CapreseAdapter.load(sys.argv[1])\n"
              f"open(sys.argv[1] + '/{TENSORS_FILE}', 'r+b').truncate(100)\n"
              "save_file({f'a{i}': t for i, t in a.lowrank_a.items()} | {f'b{i}': t for i, t in a.lowrank_b.items()}, "
              "sys.argv[2])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(adapter_dir), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # before: -7 (SIGBUS)
    after = load_file(str(out))
    for layer in original.lowrank_a:
        assert torch.equal(after[f"a{layer}"], original.lowrank_a[layer])
        assert torch.equal(after[f"b{layer}"], original.lowrank_b[layer])


def test_huge_manifest_is_refused_before_parsing(adapter_dir):
    """Issue 17 item 12: the whole file was read and parsed (MemoryError for a large enough one)."""
    edit_manifest(adapter_dir, training__data="x" * (2 << 20))
    refuse(adapter_dir, MANIFEST_FILE, "larger than 1 MiB")


def test_deeply_nested_manifest_is_refused_before_parsing(adapter_dir):
    """Issue 17 item 12: json.loads raised RecursionError (a traceback, not one line)."""
    edit_manifest(adapter_dir)
    path = adapter_dir / MANIFEST_FILE
    path.write_text(path.read_text().replace('"details": {}', '"details": ' + "[" * 100_000 + "]" * 100_000))
    refuse(adapter_dir, MANIFEST_FILE, "nested 100002 levels deep (at most 32)")


def test_tensors_file_larger_than_its_manifest_allows_is_refused_before_reading(adapter_dir):
    path = adapter_dir / TENSORS_FILE
    with open(path, "ab") as f:
        f.write(bytes(2 << 20))
    refuse(adapter_dir, TENSORS_FILE, "more than the", "bytes that caprese.json lowrank.ranks and dtype allow")


def test_density_override_on_a_cats_adapter_is_refused():
    """Issue 17 item 10: CATS thresholds fix the density, so the override changed nothing, yet it was logged
    and exported as applied."""
    from caprese_vllm.engine.config import CapreseServeConfig

    serve = CapreseServeConfig.from_additional_config({"caprese_adapter": "/a", "caprese_density": 0.3})
    serve.check_applies("griffin")
    with pytest.raises(ValueError) as err:
        serve.check_applies("cats")
    assert str(err.value) == ("--additional-config caprese_density=0.3: applies to GRIFFIN adapters only (CATS "
                              "thresholds are fitted at the adapter's density), and /a is cats; drop "
                              "--caprese-density, or distil an adapter at that density")


@pytest.mark.parametrize("config, message", [
    ({"caprese_adapter": ""}, "--additional-config caprese_adapter: Value error, empty: name the adapter directory"),
    ({"caprese_adapter": "  "}, "--additional-config caprese_adapter: Value error, empty"),
    ({"caprese-adapter": "/a"}, "--additional-config caprese-adapter: not a Caprese setting; did you mean "
                                "caprese_adapter?"),
    ({"caprese_adapter": "/a", "Caprese_Density": 0.4}, "did you mean caprese_density?"),
])
def test_empty_or_misspelled_settings_are_refused(config, message):
    """Issue 17 item 9: an empty path loaded the current directory; a dash-spelled key was silently ignored."""
    from caprese_vllm.engine.config import CapreseServeConfig

    with pytest.raises(ValueError) as err:
        CapreseServeConfig.from_additional_config(config)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def _with_large_value(adapter_dir):
    def enlarge(t):
        t["layers.1.lowrank_a"][0, 0] = 1e5  # finite in float32 and bfloat16, Inf in float16
    edit_tensors(adapter_dir, enlarge)
    return adapter_dir


def test_values_beyond_the_serving_dtype_are_refused(adapter_dir):
    """Issue 17 item 8: finiteness was checked as stored (float32), then the tensors were cast to float16."""
    adapter = CapreseAdapter.load(_with_large_value(adapter_dir))
    adapter.check_dtype(torch.float32), adapter.check_dtype(torch.bfloat16)
    with pytest.raises(AdapterError) as err:
        adapter.check_dtype(torch.float16, where="ADAPTER")
    assert str(err.value) == ("ADAPTER: tensor layers.1.lowrank_a has values up to 1e+05, beyond torch.float16's "
                              "range (max 6.55e+04) once cast to the serving dtype; serve with --dtype bfloat16 or "
                              "float32, or distil the adapter again")


@pytest.mark.vllm
@pytest.mark.parametrize("args, fragment", [
    (["--caprese-density", "0.0005"], ("vllm: error: caprese: --caprese-density (additional_config caprese_density) "
                                       "0.0005 keeps int(1536 * 0.0005) = 0 of the model's 1536 FF neurons")),
    (["--dtype", "float16"], ("adapter.safetensors: tensor layers.1.lowrank_a has values up to 1e+05, beyond "
                              "torch.float16's range")),
])
def test_serve_time_values_are_checked_against_the_model_with_one_line(model_dirs, adapter_dir, args, fragment):
    """Refused before any engine starts: exit 1, one `vllm: error:` line, no traceback."""
    import subprocess
    import sys
    from pathlib import Path

    vllm_bin = Path(sys.executable).parent / "vllm"
    proc = subprocess.run([str(vllm_bin), "serve", str(model_dirs["smollm2-135m"]), "--caprese-adapter",
                           str(_with_large_value(adapter_dir)), *args], capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and last.startswith("vllm: error: ") and fragment in last, last
    assert "Traceback" not in proc.stderr


def test_saved_adapter_files_are_readable_by_other_users(smol_base, tmp_path):
    """deploy/smoke.sh found it: safetensors writes 0600 and the server image runs as another user, so the
    mounted adapter was 'unreadable (Permission denied)'. Saved files now get the umask's mode."""
    import os

    method = MethodSpec(name="griffin", density=0.5, layers=[0, 1])
    for umask, want in ((0o022, 0o644), (0o077, 0o600)):  # the user's umask decides, as for open()
        mask = os.umask(umask)
        try:
            saved = synthetic_adapter(smol_base, method, rank=8).save(tmp_path / oct(umask))
        finally:
            os.umask(mask)
        for name in (TENSORS_FILE, MANIFEST_FILE):
            assert (saved / name).stat().st_mode & 0o777 == want, (name, oct(umask))


def test_a_0600_adapter_from_before_is_repaired_on_its_next_use(adapter_dir):
    from caprese_vllm.file_modes import readable_by_all

    (adapter_dir / TENSORS_FILE).chmod(0o600)
    readable_by_all(adapter_dir)  # what `caprese-distill run/fit` does to an already fitted adapter
    assert (adapter_dir / TENSORS_FILE).stat().st_mode & 0o777 == 0o644
