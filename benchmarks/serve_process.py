"""`vllm serve` as a child process group on a free loopback port, its whole log in a file: start, wait
for /health, stop. Shared by the tests (tests/conftest.py VllmServer) and the benchmarks (fault_harness.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VLLM = str(Path(sys.executable).parent / "vllm")


class ServeError(RuntimeError):
    """The server exited or did not answer /health in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`vllm serve MODEL_DIR ARGS --host 127.0.0.1 --port FREE` in its own session (stop() ends the API
    server, engine core and workers together), environment + `env`. Raises ServeError when the process
    exits or /health is not 200 within `startup_timeout_s` (the process group is stopped first)."""

    def __init__(self, model_dir: Path, args: list[str], log_path: Path, startup_timeout_s: float = 600,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        cmd = [VLLM, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + startup_timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                self.stop()
                raise ServeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"vllm serve not healthy after {startup_timeout_s:.0f}s:\n{self.log()[-4000:]}")
            time.sleep(1)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL after 60 s; idempotent."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
