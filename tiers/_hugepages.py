"""Large, long-lived CPU arrays of the device cache backed by transparent huge pages.

Why: the cache's columns are tens to hundreds of MiB read and written at random slots (a
batch's rows are wherever the cache put them). With 4 KiB pages nearly every row touched is also
a TLB miss and a page walk: measured on the 2-core machine of bench/lifecycle.py, an
all-cached PoolEmbedding step spent ~22% less in its row step with the columns on 2 MiB pages
(the same effect as PyTorch's ``THP_MEM_ALLOC_ENABLE=1``, which does this for every
allocation of a process). On Linux with transparent huge pages in ``madvise`` mode (the default
of many distributions) nothing uses them unless asked; ``always`` mode needs no asking and
``never`` refuses, in which case this changes nothing.

Only the 2 MiB-aligned interior of an array is advised (its edges stay on small pages), the
advice is given before the first write (a page already faulted in stays small until the kernel
collapses it in the background), and any failure is ignored: it is an optimization, never a
requirement. ``DPSN_HUGEPAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 2 * HUGE_PAGE  # smaller arrays gain little and would not hold an aligned page
_MADV_HUGEPAGE = 14  # linux/mman.h

_madvise = None
if sys.platform.startswith("linux") and os.environ.get("DPSN_HUGEPAGES", "1") != "0":
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


def advise(t: torch.Tensor) -> bool:
    """Ask for huge pages under ``t``'s storage (CPU, at least ``MIN_BYTES``); True if the
    kernel took the advice."""
    if _madvise is None or t.device.type != "cpu" or t.nbytes < MIN_BYTES:
        return False
    start = t.data_ptr()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    end = (start + t.nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= first:
        return False
    return _madvise(first, end - first, _MADV_HUGEPAGE) == 0


def full(
    shape: tuple[int, ...], value: float | int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``torch.full`` for a large long-lived array, advised onto huge pages before its first
    write where it lives on the CPU."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise(t)
    return t.fill_(value)
