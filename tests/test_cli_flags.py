"""--caprese-* flags on vLLM's command line become one --additional-config JSON."""

import json

import pytest

from caprese_vllm.cli_flags import CapreseFlagError, translate_argv


def additional(argv):
    i = argv.index("--additional-config")
    return argv[:i] + argv[i + 2:], json.loads(argv[i + 1])


def test_flags_become_additional_config():
    rest, cfg = additional(translate_argv(["serve", "M", "--caprese-adapter", "/a", "--port", "8000",
                                           "--caprese-density=0.4"]))
    assert rest == ["serve", "M", "--port", "8000"]
    assert cfg == {"caprese_adapter": "/a", "caprese_density": 0.4}


def test_merges_with_existing_additional_config():
    rest, cfg = additional(translate_argv(["serve", "M", "--additional-config", '{"other": 1}',
                                           "--caprese-adapter", "/a", "--caprese-check-fingerprint", "false"]))
    assert cfg == {"other": 1, "caprese_adapter": "/a", "caprese_check_fingerprint": False}


def test_kernels_flag():
    _, cfg = additional(translate_argv(["serve", "M", "--caprese-adapter", "/a", "--caprese-kernels", "OFF"]))
    assert cfg == {"caprese_adapter": "/a", "caprese_kernels": "off"}


def test_untouched_without_caprese_flags():
    argv = ["serve", "M", "--port", "1"]
    assert translate_argv(argv) == argv


@pytest.mark.parametrize("argv,fragment", [
    (["--caprese-adaptor", "/a"], "unknown flag --caprese-adaptor"),
    (["--caprese-density", "half"], "--caprese-density: invalid value 'half'"),
    (["--caprese-adapter"], "--caprese-adapter needs a value"),
    (["--caprese-kernels", "fast"], "--caprese-kernels: invalid value 'fast'"),
    (["--additional-config", "{nope", "--caprese-adapter", "/a"], "not a JSON object"),
])
def test_bad_flags_are_one_line_errors(argv, fragment):
    with pytest.raises(CapreseFlagError) as err:
        translate_argv(argv)
    assert fragment in str(err.value.code)
