"""Named scopes of a training step, for ``torch.profiler`` (bench/quality.py prints them).

``record_function`` costs tens of microseconds even with no profiler running, so a scope is
only opened while one is: outside a profile it costs a flag check.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

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


def scope(name: str) -> AbstractContextManager[object]:
    """``with scope(ROUTE): ...`` names that part of the step in a running profile."""
    if torch.autograd._profiler_enabled():
        return record_function(name)
    return _NONE
