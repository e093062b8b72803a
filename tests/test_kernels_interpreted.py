"""The Triton kernel tests on a machine without a GPU: test_kernels.py under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, and this pytest process has imported
it (vLLM does), so the kernel tests run in a child pytest of their own. On a CUDA host
test_kernels.py runs the compiled kernels directly and this wrapper has nothing to add.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="test_kernels.py runs the compiled kernels on this GPU")
def test_kernels_under_the_triton_interpreter():
    test_file = Path(__file__).with_name("test_kernels.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                          env=env, capture_output=True, text=True, timeout=1200)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"kernel tests failed under the interpreter:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    # A module-level skip (interpreter not picked up) would exit 0 with nothing passed.
    assert " passed" in summary, f"no kernel test ran under the interpreter: {summary}"
