"""Named phases of a training step, timed only when asked (tools/bench_train.py --profile).

`phase(name)` marks a region of the step. Normally it is a `torch.profiler.record_function` range
(free when no profiler runs; named regions in a trace when one does). Inside `PhaseTimer()` it also
synchronises the device before and after the region and adds the wall time to the timer, so phases
that launch asynchronous CUDA work are charged their real duration. The synchronisation changes
what it measures a little (no overlap between phases), which is the point of a per-phase table
and why it is never on in training. A leaf module: nothing else of the package is imported.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

_ACTIVE: "PhaseTimer | None" = None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def phase(name: str):
    timer = _ACTIVE
    if timer is None or timer.depth:  # nested phases are charged to the outermost one
        with torch.profiler.record_function(name):
            yield
        return
    _sync()
    timer.depth += 1
    t0 = time.perf_counter()
    try:
        with torch.profiler.record_function(name):
            yield
        _sync()
    finally:
        timer.depth -= 1
        timer.seconds[name] += time.perf_counter() - t0
        timer.calls[name] += 1


class PhaseTimer:
    """Context manager collecting `phase` times: seconds[name], calls[name]."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.depth = 0
        self._previous = None

    def __enter__(self) -> "PhaseTimer":
        global _ACTIVE
        self._previous, _ACTIVE = _ACTIVE, self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = self._previous
