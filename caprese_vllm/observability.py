"""What an operator sees of the loaded adapter: one startup log line and Prometheus gauges on /metrics.

vLLM exports its own metrics as `vllm:*` from the API server's Prometheus registry; ours sit
beside them as `caprese:*`, set once in the API-server process when the adapter has been checked:

    caprese:adapter_info{adapter, base_model, method, fingerprint}  1
    caprese:density                      fraction of FF neurons kept while decoding
    caprese:compressed_layers            FF blocks that decode compressed (each with a low-rank path)
    caprese:lowrank_rank{stat="min|max"} rank of the low-rank paths
    caprese:params{kind="dense|active|lowrank"}  parameters read per decode token
    caprese:nonfinite_statistics_total   requests whose GRIFFIN statistic held NaN/Inf (they decode with
                                         the fallback selection); counted in the engine process(es),
                                         read at scrape time (engine/nonfinite.py)

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

from pydantic import BaseModel

from caprese_vllm.adapter import CapreseAdapter
from caprese_vllm.engine.nonfinite import STATS_DIR_ENV, read_total

logger = logging.getLogger("vllm.caprese")


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

    def log_line(self) -> str:
        params = ""
        if self.dense_params is not None:
            params = (f"; params per decode token {self.active_params / 1e6:.1f}M vs dense "
                      f"{self.dense_params / 1e6:.1f}M ({100 * (1 - self.active_params / self.dense_params):.1f}% "
                      "fewer)")
        ranks = str(self.rank_min) if self.rank_min == self.rank_max else f"{self.rank_min}-{self.rank_max}"
        return (f"caprese: serving {self.base_model} ({self.architecture}) with adapter {self.adapter}: "
                f"{self.method} density {self.density:g} on {self.compressed_layers}/{self.num_layers} layers, "
                f"low-rank rank {ranks} (+{self.lowrank_params / 1e6:.2f}M params){params}")


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
              density: float) -> AdapterSummary:
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
        rank_max=max(ranks), lowrank_params=m.extra_params(), dense_params=dense, active_params=active)


_gauges: dict = {}
_stats_dir: Path | None = None


def publish(summary: AdapterSummary) -> None:
    """Log the summary, set the caprese:* gauges and export the engine counters' directory (idempotent:
    vLLM may build the config twice)."""
    logger.info(summary.log_line())
    stats_dir = engine_stats_dir()
    try:
        from prometheus_client import Gauge
    except ImportError:  # vLLM always ships prometheus_client; without it there is no /metrics either
        return
    if not _gauges:
        _gauges["info"] = Gauge("caprese:adapter_info", "Caprese adapter being served (value 1)",
                                ["adapter", "base_model", "method", "fingerprint"])
        _gauges["density"] = Gauge("caprese:density", "Fraction of FF neurons kept while decoding")
        _gauges["layers"] = Gauge("caprese:compressed_layers", "FF blocks decoding compressed")
        _gauges["rank"] = Gauge("caprese:lowrank_rank", "Rank of the low-rank paths", ["stat"])
        _gauges["params"] = Gauge("caprese:params", "Parameters read per decode token", ["kind"])
    _gauges["info"].clear()
    _gauges["info"].labels(summary.adapter, summary.base_model, summary.method, summary.fingerprint).set(1)
    _gauges["density"].set(summary.density)
    _gauges["layers"].set(summary.compressed_layers)
    _gauges["rank"].labels("min").set(summary.rank_min)
    _gauges["rank"].labels("max").set(summary.rank_max)
    _gauges["params"].labels("lowrank").set(summary.lowrank_params)
    if summary.dense_params is not None:
        _gauges["params"].labels("dense").set(summary.dense_params)
        _gauges["params"].labels("active").set(summary.active_params)
    if "nonfinite" not in _gauges:
        from prometheus_client import REGISTRY

        _gauges["nonfinite"] = NonfiniteCollector(stats_dir)
        REGISTRY.register(_gauges["nonfinite"])


def engine_stats_dir() -> Path:
    """This front-end's directory for the engine processes' counts, made once and removed at exit; exported
    as $CAPRESE_STATS_DIR before the engine processes start, so they inherit it."""
    global _stats_dir
    if _stats_dir is None:
        _stats_dir = Path(tempfile.mkdtemp(prefix="caprese-stats-"))
        atexit.register(shutil.rmtree, _stats_dir, ignore_errors=True)
    os.environ[STATS_DIR_ENV] = str(_stats_dir)
    return _stats_dir


class NonfiniteCollector:
    """`caprese:nonfinite_statistics_total`, summed over the engine processes' files at scrape time."""

    def __init__(self, stats_dir: Path):
        self.stats_dir = stats_dir

    def describe(self):
        return []  # no describe-time collect(): the value is read only when /metrics is scraped

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("caprese:nonfinite_statistics", "Requests whose GRIFFIN statistic held NaN/Inf "
                                  "FF activations; each decoded with the fallback selection",
                                  value=read_total(self.stats_dir))
