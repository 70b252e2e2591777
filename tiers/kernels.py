"""The fused CPU loops of ``dpsn._native`` (csrc/native.c), behind checks they rely on.

Every caller keeps its PyTorch path: these run only when the extension was built, the tensors
are on the CPU and the environment does not say ``DPSN_NATIVE=0``; the row path's tests run on
both paths (the ``row_kernels`` fixture in tests/conftest.py), and CUDA always takes the
PyTorch one. The loops take raw pointers, so each wrapper first checks dtype, contiguity and
shape, and the loops check every index they follow.
"""

from __future__ import annotations

import os

import torch

try:
    from dpsn import _native as _lib
except ImportError:  # built without a C compiler: PyTorch paths only
    _lib = None

ENABLED = _lib is not None and os.environ.get("DPSN_NATIVE", "1") != "0"

# Optimizer kinds the loops know (csrc/native.c OPT_*): never renumber.
OPT_SGD, OPT_ADAGRAD, OPT_ADAM = 0, 1, 2


def usable(*tensors: torch.Tensor) -> bool:
    """True if the native loops may run on ``tensors`` (all on the CPU)."""
    return ENABLED and all(t.device.type == "cpu" for t in tensors)


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"native loop needs a contiguous CPU {dtype} tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"native loop needs shape {shape}, got {tuple(t.shape)}")
    return t.data_ptr()


def cuckoo_find(
    entries: torch.Tensor,
    half: int,
    bits: int,
    mult0: int,
    mult1: int,
    slot_ids: torch.Tensor,
    capacity: int,
    ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot table's lookup in one pass (see ``_slot_table.SlotTable.find``)."""
    assert _lib is not None
    n = len(ids)
    ids = ids.contiguous()
    slots = torch.empty(n, dtype=torch.int64)
    hit = torch.empty(n, dtype=torch.bool)
    wide = entries.dtype == torch.int64
    _check(slot_ids, torch.int64, (capacity + 1,))
    _lib.cuckoo_find(
        _check(entries, entries.dtype, (2 * half,)),
        int(wide),
        half,
        bits,
        mult0,
        mult1,
        capacity,
        slot_ids.data_ptr(),
        _check(ids, torch.int64),
        n,
        slots.data_ptr(),
        hit.data_ptr(),
    )
    return slots, hit


def apply_rows(
    opt: int,
    hyper: tuple[float, float, float, float],
    delta: torch.Tensor,
    state: torch.Tensor,
    base: torch.Tensor,
    row: torch.Tensor,
    slots: torch.Tensor,
    fresh: torch.Tensor,
    grads: torch.Tensor,
) -> None:
    """One optimizer step on the cache's float32 columns at ``slots``, and ``row = base +
    delta`` for them, in one pass; ``fresh`` rows start from a zero delta and state, with
    their current row as base."""
    assert _lib is not None
    capacity, dim = delta.shape
    n = len(slots)
    width = state.shape[1]
    for col in (base, row):
        _check(col, torch.float32, (capacity, dim))
    _check(state, torch.float32, (capacity, width))
    lr, eps, b1, b2 = hyper
    _lib.apply_rows(
        opt,
        _check(delta, torch.float32),
        state.data_ptr(),
        base.data_ptr(),
        row.data_ptr(),
        capacity,
        dim,
        width,
        _check(slots, torch.int64, (n,)),
        _check(fresh, torch.bool, (n,)),
        _check(grads, torch.float32, (n, dim)),
        n,
        lr,
        eps,
        b1,
        b2,
    )


def step_rows(
    opt: int,
    hyper: tuple[float, float, float, float],
    delta: torch.Tensor,
    state: torch.Tensor,
    grads: torch.Tensor,
) -> None:
    """The same step on compact float32 arrays, in place (rows not in the cache)."""
    assert _lib is not None
    n, dim = delta.shape
    width = state.shape[1]
    lr, eps, b1, b2 = hyper
    _lib.step_rows(
        opt,
        _check(delta, torch.float32),
        _check(state, torch.float32, (n, width)),
        _check(grads, torch.float32, (n, dim)),
        dim,
        width,
        n,
        lr,
        eps,
        b1,
        b2,
    )


# Activation kinds of the PEER loops (csrc/native.c ACT_*): never renumber.
ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3}


def peer_forward(
    table: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    x: torch.Tensor,
    gates: torch.Tensor,
    act: str,
    d_in: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEER's forward over a packed layout (token ``t``'s uses are
    ``offsets[t]:offsets[t + 1]``; use ``u`` reads row ``table[index[u]]`` = ``u | v`` with gate
    ``gates[u]``), without gathering the rows: ``y [T, d_out]`` and pre-activations ``h [M]``."""
    assert _lib is not None
    rows, dim = table.shape
    t, m = len(offsets) - 1, len(index)
    y = torch.empty((t, dim - d_in), dtype=torch.float32)
    h = torch.empty(m, dtype=torch.float32)
    _lib.peer_forward(
        _check(table, torch.float32),
        rows,
        dim,
        d_in,
        _check(index, torch.int64, (m,)),
        _check(offsets, torch.int64, (t + 1,)),
        _check(x, torch.float32, (t, d_in)),
        _check(gates, torch.float32, (m,)),
        t,
        m,
        ACTIVATIONS[act],
        y.data_ptr(),
        h.data_ptr(),
    )
    return y, h


def peer_backward(
    table: torch.Tensor,
    index: torch.Tensor,
    inverse: torch.Tensor,
    offsets: torch.Tensor,
    x: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    dy: torch.Tensor,
    act: str,
    d_in: int,
    n_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEER's backward: ``dx [T, d_in]``, ``dgates [M]`` and each distinct row's summed
    gradient ``[n_rows, dim]`` (use ``u`` belongs to row ``inverse[u]``), summed in the order
    of the uses."""
    assert _lib is not None
    rows, dim = table.shape
    t, m = len(offsets) - 1, len(index)
    dx = torch.empty((t, d_in), dtype=torch.float32)
    dgates = torch.empty(m, dtype=torch.float32)
    rowgrad = torch.zeros((n_rows, dim), dtype=torch.float32)
    _lib.peer_backward(
        _check(table, torch.float32),
        rows,
        dim,
        d_in,
        _check(index, torch.int64, (m,)),
        _check(inverse, torch.int64, (m,)),
        _check(offsets, torch.int64, (t + 1,)),
        _check(x, torch.float32, (t, d_in)),
        _check(gates, torch.float32, (m,)),
        _check(h, torch.float32, (m,)),
        _check(dy, torch.float32, (t, dim - d_in)),
        t,
        m,
        ACTIVATIONS[act],
        dx.data_ptr(),
        dgates.data_ptr(),
        rowgrad.data_ptr(),
        n_rows,
    )
    return dx, dgates, rowgrad
