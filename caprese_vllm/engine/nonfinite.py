"""Non-finite GRIFFIN statistics: noticed, logged and counted, without a host sync in the step path.

A prompt whose FF activations overflow (NaN/Inf) gives its request a non-finite statistic. The
selection is defined all the same (methods/griffin.py: non-finite neurons rank last), so the request
decodes and the engine and other requests go on; this module makes it visible:
  - engine side (`NonfiniteMonitor`, in the process that runs the model): each selection also reduces
    the selected slots' statistics to one flag per (layer, request) on the device and starts a
    non-blocking copy of it to pinned host memory (a CUDA event marks it done); the flags are read
    when the copy has landed, at the latest on the next step (CPU: at once). Each flagged request
    gives one warning line (rate-limited) and +1 on the process's count, which is written to
    `$CAPRESE_STATS_DIR/nonfinite-<pid>.txt` (atomically, only when it changes);
  - API-server side (observability.py): vLLM V1 runs the engine core in another process, so the
    `caprese:nonfinite_statistics_total` counter on /metrics is a custom collector that sums those
    files at scrape time. The front-end creates the directory and sets CAPRESE_STATS_DIR before the
    engine processes start (they inherit it).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger("vllm.caprese")

STATS_DIR_ENV = "CAPRESE_STATS_DIR"
_FILE_GLOB = "nonfinite-*.txt"
WARN_INTERVAL_S = 10.0


def write_count(stats_dir: str | Path, count: int, pid: int | None = None) -> None:
    """Atomically write this process's count (a crash leaves the old file, never a torn one)."""
    path = Path(stats_dir) / f"nonfinite-{pid or os.getpid()}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{count}\n")
    tmp.replace(path)


def read_total(stats_dir: str | Path) -> int:
    """Sum of every engine process's count; unreadable or foreign files count 0."""
    total = 0
    for path in Path(stats_dir).glob(_FILE_GLOB):
        try:
            total += int(path.read_text())
        except (OSError, ValueError):
            continue
    return total


class NonfiniteMonitor:
    """Flags selections made from a non-finite statistic; `layer_ids` name the stacked GRIFFIN layers."""

    def __init__(self, layer_ids: list[int], stats_dir: str | None = None,
                 warn_interval_s: float = WARN_INTERVAL_S):
        self.layer_ids = layer_ids              # filled by the batch state as layers are added
        self.stats_dir = stats_dir if stats_dir is not None else os.environ.get(STATS_DIR_ENV)
        self.warn_interval_s = warn_interval_s
        self.count = 0                           # requests selected from a non-finite statistic
        self.pending: list[tuple[torch.Tensor, torch.cuda.Event | None, list[str]]] = []
        self._last_warning = float("-inf")
        self._unlogged = 0

    def check(self, stat_sq: torch.Tensor, req_ids: list[str]) -> None:
        """stat_sq [L, n, I] of the n requests just selected (req_ids in that order): queue their flags."""
        bad = (~torch.isfinite(stat_sq)).any(dim=-1)             # [L, n] bool, on the device
        event = None
        if bad.is_cuda:
            bad = bad.to("cpu", non_blocking=True)              # lands in pinned memory, no sync
            event = torch.cuda.Event()
            event.record()
        self.pending.append((bad, event, req_ids))
        self.poll()

    def poll(self) -> None:
        """Read the flags whose copy has landed (never waits)."""
        while self.pending and (self.pending[0][1] is None or self.pending[0][1].query()):
            bad, _, req_ids = self.pending.pop(0)
            for j in torch.nonzero(bad.any(dim=0)).flatten().tolist():
                layers = [self.layer_ids[i] for i in torch.nonzero(bad[:, j]).flatten().tolist()]
                self._report(req_ids[j], layers)

    def _report(self, req_id: str, layers: list[int]) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last_warning >= self.warn_interval_s:
            more = f" ({self._unlogged} more since the last such line)" if self._unlogged else ""
            logger.warning("caprese: non-finite GRIFFIN statistic (NaN/Inf FF activations in the prompt) for "
                           "request %s in layer(s) %s: it decodes with the fallback selection (non-finite neurons "
                           "ranked last), other requests are unaffected; %d such request(s) so far "
                           "(caprese:nonfinite_statistics_total)%s", req_id, layers, self.count, more)
            self._last_warning, self._unlogged = now, 0
        else:
            self._unlogged += 1
        if self.stats_dir:
            try:
                write_count(self.stats_dir, self.count)
            except OSError as err:  # the front-end went away (shutdown): the log line is what remains
                logger.debug("caprese: cannot write the non-finite count to %s: %s", self.stats_dir, err)
