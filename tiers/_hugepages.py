"""Large, long-lived CPU arrays of the device cache backed by transparent huge pages.

Why: the cache's columns are tens to hundreds of MiB read and written at random slots (a
batch's rows are wherever the cache put them). With 4 KiB pages nearly every row touched is also
a TLB miss and a page walk: on the 2-core machine of bench/lifecycle.py an all-cached
PoolEmbedding step spent ~15-20% less in its row step with the columns on 2 MiB pages (PyTorch's
``THP_MEM_ALLOC_ENABLE=1`` does the same for every allocation of a process). On Linux with
transparent huge pages in ``madvise`` mode (the default of many distributions) nothing uses them
unless asked; ``always`` needs no asking and ``never`` refuses, in which case this changes
nothing.

How: each such array is its own anonymous memory mapping, advised ``MADV_HUGEPAGE`` before its
first write (a page already faulted in stays small) and wrapped as a tensor that keeps the
mapping alive; it is unmapped with the tensor, so the advice never outlives it or spreads to
memory the process reuses for something else. It is filled at once, as ``torch.full`` would,
so its pages are faulted in when the cache is built, not in the middle of training steps.
Costs to know: where the kernel's THP ``defrag`` setting
is ``madvise`` (a common default), a fault in such a mapping may compact memory to find a huge
page, a pause on a fragmented host; ``DPSN_HUGEPAGES=0`` turns all of this off. Any failure
falls back to an ordinary tensor: it is an optimization, never a requirement.
"""

from __future__ import annotations

import contextlib
import mmap
import os

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 2 * HUGE_PAGE  # smaller arrays gain little and may not hold one aligned huge page

_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
ENABLED = _ADVICE is not None and os.environ.get("DPSN_HUGEPAGES", "1") != "0"


def _mapped(nbytes: int) -> mmap.mmap | None:
    """An anonymous zeroed mapping of ``nbytes`` advised onto huge pages, or None."""
    try:  # private: a shared anonymous mapping is shmem, whose huge pages are another setting
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):
        return None
    with contextlib.suppress(OSError):  # e.g. a kernel without THP: still a zeroed array
        mm.madvise(_ADVICE)
    return mm


def full(
    shape: tuple[int, ...], value: float | int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.full`` for a large long-lived array: on the CPU, from at least ``MIN_BYTES``,
    in its own mapping on huge pages (see the module docstring)."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not ENABLED or torch.device(device).type != "cpu" or nbytes < MIN_BYTES:
        return torch.full(shape, value, dtype=dtype, device=device)
    mm = _mapped(nbytes)
    if mm is None:
        return torch.full(shape, value, dtype=dtype, device=device)
    t = torch.frombuffer(mm, dtype=dtype, count=numel).view(shape)
    return t.fill_(value)
