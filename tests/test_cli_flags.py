"""--caprese-* flags on vLLM's command line become one --additional-config JSON."""

import json
import sys

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
    (["--caprese-kernels", "fast"], "--caprese-kernels: invalid value 'fast'; pass auto, on or off"),
    (["--caprese-tp-selection", "fast"], "--caprese-tp-selection: invalid value 'fast'; pass exact or local"),
    (["--caprese-tp-selection", ""], "--caprese-tp-selection: invalid value ''; pass exact or local"),
    (["--caprese-check-fingerprint", "yes"], "invalid value 'yes'; pass true or false"),
    (["--caprese-density", "half"], "invalid value 'half'; pass a number in (0, 1]"),
    (["--additional-config", "{nope", "--caprese-adapter", "/a"], "not a JSON object"),
])
def test_bad_flags_are_one_line_errors(argv, fragment):
    """One line naming the flag, the value and what it takes."""
    with pytest.raises(CapreseFlagError) as err:
        translate_argv(argv)
    assert fragment in str(err.value.code)


# ---- issue 17 item 9: every form of --additional-config reaches vLLM, merged ---------------------------------


@pytest.fixture(scope="module")
def vllm_parse():
    """`vllm serve`'s own argument parser (the CLI's: FlexibleArgumentParser + the serve subcommand): argv as
    the platform hook leaves it -> the additional_config vLLM hands to the engine."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def parse(argv: list[str]) -> dict | None:
        parser = FlexibleArgumentParser(prog="vllm")
        ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
        return parser.parse_args(translate_argv(argv)).additional_config

    return parse


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("argv, expected", [
    # before: vLLM appends the dotted keys as a later --additional-config, which drops the adapter
    (["--caprese-adapter", "/a", "--additional-config.other", "1"], {"caprese_adapter": "/a", "other": 1}),
    # before: the underscore spelling was not recognised, so the user's key vanished
    (["--additional_config", '{"other": 1}', "--caprese-adapter", "/a"], {"caprese_adapter": "/a", "other": 1}),
    (["--additional-config.caprese_adapter", "/a", "--caprese-density=0.4"],
     {"caprese_adapter": "/a", "caprese_density": 0.4}),
    # no --caprese-* flag at all: vLLM alone keeps only the dotted keys, dropping the adapter
    (["--additional-config", '{"caprese_adapter": "/a"}', "--additional-config.caprese_density", "0.4",
      "--additional_config.lst+", "x,y", "--additional-config.lst+=z", "--additional-config.n", "2K"],
     {"caprese_adapter": "/a", "caprese_density": 0.4, "lst": ["x", "y", "z"], "n": 2048}),
    (["--caprese-adapter", "/a", "--caprese_adapter", "/a"], {"caprese_adapter": "/a"}),  # the same twice: fine
])
def test_every_additional_config_form_is_merged(vllm_parse, argv, expected):
    assert vllm_parse(["serve", "M", *argv]) == expected


@pytest.mark.parametrize("config, argv, expected", [
    # before: the appended --additional-config replaced the file's, so "other" vanished
    ("additional_config:\n  other: 1\n", ["--caprese-adapter", "/a"], {"caprese_adapter": "/a", "other": 1}),
    ("additional-config:\n  caprese_adapter: /a\n", ["--caprese-density", "0.4"],
     {"caprese_adapter": "/a", "caprese_density": 0.4}),
    ("port: 8123\nadditional_config: '{\"caprese_adapter\": \"/a\"}'\n", ["--additional-config.other", "1"],
     {"caprese_adapter": "/a", "other": 1}),
])
def test_config_file_additional_config_is_merged(vllm_parse, tmp_path, config, argv, expected):
    assert vllm_parse(["serve", "M", "--config", _yaml(tmp_path, config), *argv]) == expected


def test_without_caprese_the_command_line_is_left_to_vllm(tmp_path):
    """Nothing of ours (a model path under ~/.cache/caprese is not): vLLM gets exactly what was typed."""
    argv = ["serve", "/root/.cache/caprese/models/m", "--additional-config", '{"x": 1}', "--additional-config.x", "2",
            "--config", _yaml(tmp_path, "additional_config:\n  x: 3\n")]
    assert translate_argv(argv) == argv


@pytest.mark.parametrize("argv, config, message", [
    (["--caprese-adapter", "/a", "--additional-config.caprese_adapter", "/b"], None,
     'additional_config key caprese_adapter is set twice, to "/a" by --caprese-adapter and to "/b" by '
     "--additional-config.caprese_adapter; give it once"),
    (["--caprese-adapter", "/a", "--caprese-adapter", "/b"], None, "caprese_adapter is set twice"),
    (["--additional-config", '{"caprese_density": 0.5}', "--caprese-density", "0.4", "--caprese-adapter", "/a"], None,
     "caprese_density is set twice, to 0.5 by --additional-config and to 0.4 by --caprese-density"),
    (["--caprese-adapter", "/b"], "additional_config:\n  caprese_adapter: /a\n",
     'caprese_adapter is set twice, to "/a" by --config CONFIG (additional_config) and to "/b"'),
    (["--port", "8000"], "caprese_adapter: /a\n",
     "--config CONFIG (caprese_adapter): vLLM's --config file takes vLLM's flags only; put Caprese settings under "
     "additional_config"),
    (["--caprese-adapter", "/a"], "additional-config.other: 1\n", "write additional_config as one mapping"),
    (["--caprese-adapter", ""], None, "--caprese-adapter is empty; pass the adapter directory"),
    (["--caprese-adapter=", "--port", "1"], None, "--caprese-adapter is empty"),
])
def test_conflicts_and_empty_adapter_are_one_line_errors(tmp_path, argv, config, message):
    extra = ["--config", _yaml(tmp_path, config)] if config else []
    with pytest.raises(CapreseFlagError) as err:
        translate_argv(["serve", "M", *extra, *argv])
    text = str(err.value.code).replace(str(tmp_path / "serve.yaml"), "CONFIG")
    assert text.startswith("vllm: error: ") and "\n" not in text and message in text, text


def test_a_child_process_does_not_translate_its_inherited_argv_again(monkeypatch, tmp_path):
    """vLLM's engine processes inherit the rewritten argv (fork, or spawn's copy of sys.argv) and run the hook
    again; rewriting it again would merge the file's list with its own merged copy, a conflict."""
    from caprese_vllm import cli_flags

    config = _yaml(tmp_path, "additional_config:\n  lst: [x]\n")
    monkeypatch.delenv(cli_flags._TRANSLATED_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vllm", "serve", "M", "--config", config, "--caprese-adapter", "/a",
                                      "--additional-config.lst+", "y"])
    cli_flags.platform_hook()
    once = list(sys.argv)
    assert additional(once[1:])[1] == {"lst": ["x", "y"], "caprese_adapter": "/a"}
    cli_flags.platform_hook()  # the child's call
    assert sys.argv == once


def test_every_flag_says_what_it_takes():
    from caprese_vllm.cli_flags import _EXPECTED, _FLAGS

    assert set(_EXPECTED) == set(_FLAGS), "a new --caprese-* flag needs its error hint"


@pytest.mark.parametrize("argv", [
    ["--caprese-tp-selection", "local", "--additional-config", '{"caprese_tp_selection": "LOCAL"}'],
    ["--additional-config", '{"caprese_kernels": "ON"}', "--caprese-kernels", "on"],
    ["--additional-config.caprese_tp_selection", "Local", "--caprese-tp-selection", "LOCAL"],
])
def test_one_value_in_two_cases_is_one_value(argv):
    """caprese_tp_selection / caprese_kernels are read in any case: the same word from two routes is not "set
    twice" (it was refused, or not, depending on which route came first)."""
    _, cfg = additional(translate_argv(["serve", "M", "--caprese-adapter", "/a", *argv]))
    assert set(cfg.values()) <= {"/a", "local", "on"} and len(cfg) == 2
