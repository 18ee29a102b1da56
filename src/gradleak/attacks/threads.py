"""How many CPU threads an attack uses: one, unless the user chose.

An attack is a long chain of small tensor ops (a LeNet on one image);
splitting each across threads costs more than it saves.  On this project's
2-core machine the README's iDLG example took 9 s with one intra-op thread
and 156 s with torch's default two (bench/threads.py, BENCHMARKS.md).  The
CLI sets one thread for the whole process (experiments/common.py); the
library's attacks do the same for their own duration, so that a Python
caller gets the same speed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def attack_threads(device: torch.device | str) -> Iterator[None]:
    """One intra-op thread while the block runs, on the CPU, unless OMP_NUM_THREADS is set.

    The previous thread count is restored afterwards.  On a GPU, or when the
    user set OMP_NUM_THREADS, nothing changes.
    """
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
