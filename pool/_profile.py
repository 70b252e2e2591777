"""Named parts of a training step, timed for bench/quality.py and visible to ``torch.profiler``.

``record_function`` costs tens of microseconds even with no profiler running, so a scope only
opens one while a profiler runs; and ``torch.profiler``'s own per-op overhead swells the parts
made of many small ops (the router), so :func:`timing` measures the parts by wall clock instead.
Outside both, a scope costs a flag check; a caller on the hot path (the row step) reads the
flags itself (``timing_on``, ``profiling()``) and opens no scope at all.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch.profiler import record_function

# The parts of a step, as bench/quality.py reports them.
ROUTE = "dpsn.route"
PAGE_IN = "dpsn.page_in"
EXECUTOR_FORWARD = "dpsn.executor.forward"
EXECUTOR_BACKWARD = "dpsn.executor.backward"
ROW_STEP = "dpsn.row_step"
SCOPES = (ROUTE, PAGE_IN, EXECUTOR_FORWARD, EXECUTOR_BACKWARD, ROW_STEP)

_NONE = nullcontext()
_timings: dict[str, float] | None = None  # seconds per scope while timing() runs
_clock: Callable[[], float] = time.perf_counter
timing_on = False  # True while timing() runs (read as an attribute: no call)
# whether a torch profiler runs now (torch's own C function: a call that enters no dpsn file)
profiling: Callable[[], bool] = torch.autograd._profiler_enabled


class _Timer:
    __slots__ = ("name", "start")

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.start = _clock()

    def __exit__(self, *exc: object) -> None:
        if _timings is not None:
            _timings[self.name] += _clock() - self.start


def scope(name: str) -> AbstractContextManager[object]:
    """``with scope(ROUTE): ...`` names that part of the step for a profile or a timing."""
    if _timings is not None:
        return _Timer(name)
    if profiling():
        return record_function(name)
    return _NONE


@contextmanager
def timing(clock: Callable[[], float] = time.perf_counter) -> Iterator[dict[str, float]]:
    """Sum the seconds spent in each scope inside the block, by ``clock`` (wall clock, or
    ``time.process_time`` for CPU time on a shared machine). On the CPU the time is the work;
    on CUDA it is only the launch time, as nothing waits for the device here."""
    global _timings, _clock, timing_on
    _timings, _clock, timing_on = defaultdict(float), clock, True
    try:
        yield _timings
    finally:
        _timings, _clock, timing_on = None, time.perf_counter, False
