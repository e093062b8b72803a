"""Keep processes that will fork vLLM's engine core free of torch's CPU thread pool.

vLLM forks the engine core from the front-end process when CUDA is not yet initialised there. A
fork taken while torch's OpenMP pool exists leaves the child deadlocked on its first parallel CPU
op (seen on the H100 host: the engine core hung loading the model). Any torch CPU work done in
the front-end before the engine starts (adapter validation, building a benchmark adapter) runs
inside `no_cpu_thread_pool()`, which makes torch compute inline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def no_cpu_thread_pool() -> Iterator[None]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
