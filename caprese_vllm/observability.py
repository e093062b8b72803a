"""What an operator sees of the loaded adapter: one startup log line and Prometheus gauges on /metrics.

vLLM exports its own metrics as `vllm:*` from the API server's Prometheus registry; ours sit
beside them as `caprese:*`:

    caprese:adapter_info{adapter, base_model, method, fingerprint}  1
    caprese:density                      fraction of FF neurons kept while decoding
    caprese:compressed_layers            FF blocks that decode compressed (each with a low-rank path)
    caprese:lowrank_rank{stat="min|max"} rank of the low-rank paths
    caprese:params{kind="dense|active|lowrank"}  parameters read per decode token
    caprese:kernels{path="triton|portable"}  1: the FF path the compressed layers run
    caprese:tensor_parallel{selection="exact|local"}  -tp size, with the GRIFFIN selection it runs
    caprese:nonfinite_statistics_total   requests whose GRIFFIN statistic held NaN/Inf (they decode with
                                         the fallback selection); counted in the engine process(es),
                                         read at scrape time (engine/nonfinite.py)

Only what an engine has actually installed is published (issue 17 item 3): the engine process, once
the adapter's tensors are in its model (`confirm_served`), logs the summary line and writes it as
`$CAPRESE_STATS_DIR/served-<pid>.json`; the API server's collector (`watch_engines`) exports the
gauges from that file at scrape time. An engine that built vLLM's stock class (an architecture the
plugin does not cover) confirms nothing, so no caprese:* gauge claims an adapter it does not serve.

(A route such as GET /caprese would need vLLM's opt-in endpoint plugins, which also turn
VLLM_PLUGINS into an allowlist for every plugin group; /metrics needs no opt-in.)
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.engine.nonfinite import STATS_DIR_ENV, read_total

logger = logging.getLogger("vllm.caprese")

# What selects the kept neurons of a served model (the `caprese:tensor_parallel{selection}` label): GRIFFIN's
# exact or local tensor-parallel selection, or CATS's per-neuron threshold.
ServedSelection = Literal["exact", "local", "threshold"]


class AdapterSummary(BaseModel):
    adapter: str
    base_model: str
    architecture: str
    fingerprint: str
    method: str
    density: float
    compressed_layers: int
    num_layers: int
    rank_min: int
    rank_max: int
    lowrank_params: int
    dense_params: int | None      # None when the checkpoint's size cannot be read (not a local dir)
    active_params: int | None
    kernels: Literal["triton", "portable"]  # the FF path the compressed layers run
    tp_size: int = 1                         # defaults: what engines without tensor parallelism wrote
    tp_selection: ServedSelection = "exact"

    def log_line(self) -> str:
        params = ""
        if self.dense_params is not None:
            params = (f"; params per decode token {self.active_params / 1e6:.1f}M vs dense "
                      f"{self.dense_params / 1e6:.1f}M ({100 * (1 - self.active_params / self.dense_params):.1f}% "
                      "fewer)")
        ranks = str(self.rank_min) if self.rank_min == self.rank_max else f"{self.rank_min}-{self.rank_max}"
        path = "Triton kernels" if self.kernels == "triton" else "portable PyTorch"
        tp = ""
        if self.tp_size > 1:
            tp = f"; tensor parallel {self.tp_size}, " + ("CATS thresholds per neuron (as at TP=1)"
                                                           if self.tp_selection == "threshold"
                                                           else f"{self.tp_selection} selection")
        return (f"caprese: serving {self.base_model} ({self.architecture}) with adapter {self.adapter}: "
                f"{self.method} density {self.density:g} on {self.compressed_layers}/{self.num_layers} layers, "
                f"low-rank rank {ranks} (+{self.lowrank_params / 1e6:.2f}M params){params}; FF path: {path}{tp}")


def checkpoint_num_params(model_dir: Path) -> int | None:
    """Parameter count from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                total += numel
    return total


def summarize(adapter: CapreseAdapter, adapter_path: str, model_name: str, model_dir: Path | None,
              density: float, kernels: Literal["triton", "portable"], tp_size: int = 1,
              tp_selection: ServedSelection = "exact") -> AdapterSummary:
    m = adapter.manifest
    base = m.base_model
    ranks = list(m.lowrank.ranks.values()) or [0]
    dense = checkpoint_num_params(model_dir) if model_dir is not None else None
    active = None
    if dense is not None:
        dropped = len(m.method.layers) * 3 * base.hidden_size * (base.intermediate_size
                                                                 - int(base.intermediate_size * density))
        active = dense - dropped + m.extra_params()
    return AdapterSummary(
        adapter=str(adapter_path), base_model=model_name, architecture=base.architecture,
        fingerprint=base.fingerprint, method=m.method.name, density=density,
        compressed_layers=len(m.method.layers), num_layers=base.num_layers, rank_min=min(ranks),
        rank_max=max(ranks), lowrank_params=m.extra_params(), dense_params=dense, active_params=active,
        kernels=kernels, tp_size=tp_size, tp_selection=tp_selection)


_SERVED_GLOB = "served-*.json"
_collectors: list = []
_stats_dir: Path | None = None


def confirm_served(summary: AdapterSummary, stats_dir: str | Path | None = None) -> None:
    """Engine process, once the adapter is in the model: log the summary and write it (atomically) for the API
    server's /metrics, into `stats_dir` (default $CAPRESE_STATS_DIR; without one, the log line only)."""
    logger.info(summary.log_line())
    stats_dir = stats_dir or os.environ.get(STATS_DIR_ENV)
    if not stats_dir:
        return
    path = Path(stats_dir) / f"served-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(summary.model_dump_json())
        tmp.replace(path)
    except OSError as err:  # the front-end's directory is gone: it is shutting down
        logger.warning("caprese: cannot publish the adapter summary to %s: %s", stats_dir, err)


def read_served(stats_dir: str | Path) -> AdapterSummary | None:
    """The newest summary an engine process confirmed, None before any did (torn or foreign files skipped)."""
    for path in sorted(Path(stats_dir).glob(_SERVED_GLOB), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return AdapterSummary.model_validate_json(path.read_text())
        except (OSError, ValidationError):
            continue
    return None


def watch_engines() -> Path:
    """API-server process, before the engines start: make the directory they confirm into and register the
    caprese:* collectors on prometheus_client's default registry, which vLLM's /metrics serves (once per
    process: vLLM may build the config twice). Returns the directory."""
    stats_dir = engine_stats_dir()
    if not _collectors:
        from prometheus_client import REGISTRY

        _collectors.extend([ServedCollector(stats_dir), NonfiniteCollector(stats_dir)])
        for collector in _collectors:
            REGISTRY.register(collector)
    return stats_dir


def engine_stats_dir() -> Path:
    """This front-end's directory for the engine processes' counts, made once and removed at exit; exported
    as $CAPRESE_STATS_DIR before the engine processes start, so they inherit it."""
    global _stats_dir
    if _stats_dir is None:
        _stats_dir = Path(tempfile.mkdtemp(prefix="caprese-stats-"))
        atexit.register(shutil.rmtree, _stats_dir, ignore_errors=True)
    os.environ[STATS_DIR_ENV] = str(_stats_dir)
    return _stats_dir


class _ScrapeTimeCollector:
    """A Prometheus collector whose values are read from the engine processes' files in `stats_dir`."""

    def __init__(self, stats_dir: Path):
        self.stats_dir = stats_dir

    def describe(self):
        return []  # no describe-time collect(): the value is read only when /metrics is scraped


class ServedCollector(_ScrapeTimeCollector):
    """The caprese:* gauges of the adapter an engine confirmed serving, read at scrape time; none before."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        s = read_served(self.stats_dir)
        if s is None:
            return
        info = GaugeMetricFamily("caprese:adapter_info", "Caprese adapter being served (value 1)",
                                 labels=["adapter", "base_model", "method", "fingerprint"])
        info.add_metric([s.adapter, s.base_model, s.method, s.fingerprint], 1)
        yield info
        yield GaugeMetricFamily("caprese:density", "Fraction of FF neurons kept while decoding", value=s.density)
        yield GaugeMetricFamily("caprese:compressed_layers", "FF blocks decoding compressed", value=s.compressed_layers)
        rank = GaugeMetricFamily("caprese:lowrank_rank", "Rank of the low-rank paths", labels=["stat"])
        rank.add_metric(["min"], s.rank_min)
        rank.add_metric(["max"], s.rank_max)
        yield rank
        params = GaugeMetricFamily("caprese:params", "Parameters read per decode token", labels=["kind"])
        params.add_metric(["lowrank"], s.lowrank_params)
        if s.dense_params is not None:
            params.add_metric(["dense"], s.dense_params)
            params.add_metric(["active"], s.active_params)
        yield params
        kernels = GaugeMetricFamily("caprese:kernels", "FF path of the compressed layers (value 1)", labels=["path"])
        kernels.add_metric([s.kernels], 1)
        yield kernels
        tp = GaugeMetricFamily("caprese:tensor_parallel", "Tensor-parallel size, labelled with what selects "
                               "the kept neurons (exact = GRIFFIN as at TP=1, local = GRIFFIN per rank, threshold "
                               "= CATS, rank-local and as at TP=1)", labels=["selection"])
        tp.add_metric([s.tp_selection], s.tp_size)
        yield tp


class NonfiniteCollector(_ScrapeTimeCollector):
    """`caprese:nonfinite_statistics_total`, summed over the engine processes' files at scrape time."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("caprese:nonfinite_statistics", "Requests whose GRIFFIN statistic held NaN/Inf "
                                  "FF activations; each decoded with the fallback selection",
                                  value=read_total(self.stats_dir))
