"""The fused CPU loops of ``dpsn._native`` (csrc/native.c), behind checks they rely on.

Every caller keeps its PyTorch path: these run only when the extension was built, the tensors
are on the CPU and the environment does not say ``DPSN_NATIVE=0``; the row path's tests run on
both paths (the ``row_kernels`` fixture in tests/conftest.py), and CUDA always takes the
PyTorch one. The loops take raw pointers, so each wrapper first checks dtype, contiguity and
shape, and the loops check every index they follow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    from dpsn import _native as _lib
except ImportError:  # built without a C compiler: PyTorch paths only
    _lib = None

ENABLED = _lib is not None and os.environ.get("DPSN_NATIVE", "1") != "0"

# Optimizer kinds the loops know (csrc/native.c OPT_*): never renumber.
OPT_SGD, OPT_ADAGRAD, OPT_ADAM = 0, 1, 2
# The usage column's width and field order the usage loops know (csrc/native.c U_*), those of
# tiers/_usage_fields.py (a test checks they agree).
USAGE_WIDTH = 10


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


def cuckoo_insert(
    entries: torch.Tensor,
    half: int,
    bits: int,
    mult0: int,
    mult1: int,
    slot_ids: torch.Tensor,
    capacity: int,
    home: torch.Tensor,
    ids: torch.Tensor,
    slots: torch.Tensor,
    max_kicks: int,
) -> bool:
    """The slot table's insertion of new ``ids`` into ``slots``, one id after another (see
    ``_slot_table.SlotTable.insert``); False if a chain of moves ran past ``max_kicks`` (the
    table must then be rebuilt)."""
    assert _lib is not None
    n = len(ids)
    ids, slots = ids.contiguous(), slots.contiguous()
    _check(slot_ids, torch.int64, (capacity + 1,))
    done = _lib.cuckoo_insert(
        _check(entries, entries.dtype, (2 * half,)),
        int(entries.dtype == torch.int64),
        half,
        bits,
        mult0,
        mult1,
        capacity,
        slot_ids.data_ptr(),
        _check(home, torch.int64, (capacity + 1,)),
        _check(ids, torch.int64, (n,)),
        _check(slots, torch.int64, (n,)),
        n,
        max_kicks,
    )
    return done == n


def group_ids(
    ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(uniq, counts, inverse, order)`` of 1-D int64 ``ids`` (each >= 0), as
    ``torch.sort(ids, stable=True)`` + ``unique_consecutive`` give them: ``uniq`` ascending,
    ``counts`` its multiplicities, ``uniq[inverse] == ids``, ``ids[order]`` sorted (stably)."""
    assert _lib is not None
    ids = ids.contiguous()
    n = len(ids)
    order, uniq, counts, inverse = (torch.empty(n, dtype=torch.int64) for _ in range(4))
    scratch = torch.empty((3, n), dtype=torch.int64)
    m = _lib.group_ids(
        _check(ids, torch.int64),
        n,
        order.data_ptr(),
        uniq.data_ptr(),
        counts.data_ptr(),
        inverse.data_ptr(),
        scratch[0].data_ptr(),
        scratch[1].data_ptr(),
        scratch[2].data_ptr(),
    )
    return uniq[:m], counts[:m], inverse, order


def find_gather(
    entries: torch.Tensor,
    half: int,
    bits: int,
    mult0: int,
    mult1: int,
    slot_ids: torch.Tensor,
    capacity: int,
    ids: torch.Tensor,
    table: torch.Tensor,
    last: torch.Tensor | None = None,
    step: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A hot read in one pass: the slots of ``ids`` and their rows of ``table`` (``[capacity,
    dim]``, any dtype), or None if some id is not cached (nothing gathered then). ``last``: an
    LRU policy's float64 ``[capacity]`` column, stamped with ``step`` for every slot read."""
    assert _lib is not None
    n = len(ids)
    slots = torch.empty(n, dtype=torch.int64)
    out = torch.empty((n, table.shape[1]), dtype=table.dtype)
    _check(slot_ids, torch.int64, (capacity + 1,))
    _check(table, table.dtype, (capacity, table.shape[1]))
    misses = _lib.find_gather(
        _check(entries, entries.dtype, (2 * half,)),
        int(entries.dtype == torch.int64),
        half,
        bits,
        mult0,
        mult1,
        capacity,
        slot_ids.data_ptr(),
        _check(ids, torch.int64, (n,)),
        n,
        slots.data_ptr(),
        table.data_ptr(),
        table.shape[1] * table.element_size(),
        out.data_ptr(),
        0 if last is None else _check(last, torch.float64, (capacity,)),
        step,
    )
    return None if misses else (slots, out)


def _cache_columns(
    delta: torch.Tensor, state: torch.Tensor, base: torch.Tensor, row: torch.Tensor
) -> tuple[int, int, int, int, int, int, int]:
    """The checked float32 step columns of a cache (``delta``, ``state``, ``base``, ``row``):
    their pointers, then capacity, dim and state width, in the order the loops take them."""
    capacity, dim = delta.shape
    width = state.shape[1]
    for col in (base, row):
        _check(col, torch.float32, (capacity, dim))
    _check(state, torch.float32, (capacity, width))
    ptrs = (_check(delta, torch.float32), state.data_ptr(), base.data_ptr(), row.data_ptr())
    return (*ptrs, capacity, dim, width)


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
    columns = _cache_columns(delta, state, base, row)
    dim = columns[-2]
    n = len(slots)
    lr, eps, b1, b2 = hyper
    _lib.apply_rows(
        opt,
        *columns,
        _check(slots, torch.int64, (n,)),
        _check(fresh, torch.bool, (n,)),
        _check(grads, torch.float32, (n, dim)),
        n,
        lr,
        eps,
        b1,
        b2,
    )


def _compact_arrays(
    delta: torch.Tensor, state: torch.Tensor, grads: torch.Tensor
) -> tuple[int, int, int, int, int, int]:
    """The checked compact float32 arrays of a step on rows outside the cache (``delta``,
    ``state``, ``grads``): their pointers, then dim, state width and rows."""
    n, dim = delta.shape
    width = state.shape[1]
    return (
        _check(delta, torch.float32),
        _check(state, torch.float32, (n, width)),
        _check(grads, torch.float32, (n, dim)),
        dim,
        width,
        n,
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
    lr, eps, b1, b2 = hyper
    _lib.step_rows(
        opt,
        *_compact_arrays(delta, state, grads),
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
    order: torch.Tensor,
    token: torch.Tensor,
    x: torch.Tensor,
    gates: torch.Tensor,
    act: str,
    d_in: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEER's forward without gathering rows: use ``u`` reads row ``table[index[i]]`` (``u |
    v``) for token ``token[u]`` with gate ``gates[u]``, and row ``i``'s uses are
    ``order[offsets[i]:offsets[i + 1]]`` (a ``RowBatch``'s grouping). Returns ``y [T, d_out]``
    and the pre-activations ``h [M]``; ``T = len(x)``."""
    assert _lib is not None
    rows, dim = table.shape
    t, m, n = len(x), len(token), len(index)
    y = torch.empty((t, dim - d_in), dtype=torch.float32)
    h = torch.empty(m, dtype=torch.float32)
    _lib.peer_forward(
        _check(table, torch.float32),
        rows,
        dim,
        d_in,
        _check(index, torch.int64, (n,)),
        _check(offsets, torch.int64, (n + 1,)),
        _check(order, torch.int64, (m,)),
        _check(token, torch.int64, (m,)),
        _check(x, torch.float32, (t, d_in)),
        _check(gates, torch.float32, (m,)),
        t,
        m,
        n,
        ACTIVATIONS[act],
        y.data_ptr(),
        h.data_ptr(),
    )
    return y, h


def peer_backward(
    table: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    order: torch.Tensor,
    token: torch.Tensor,
    x: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    dy: torch.Tensor,
    act: str,
    d_in: int,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEER's backward (arguments as :func:`peer_forward`, plus ``h`` and ``dy [T, d_out]``):
    ``dx [T, d_in]``, ``dgates [M]`` and each distinct row's summed gradient ``[n, dim]``
    (written into ``out`` if given)."""
    assert _lib is not None
    rows, dim = table.shape
    t, m, n = len(x), len(token), len(index)
    dx = torch.empty((t, d_in), dtype=torch.float32)
    dgates = torch.empty(m, dtype=torch.float32)
    rowgrad = torch.empty((n, dim), dtype=torch.float32) if out is None else out
    _lib.peer_backward(
        _check(table, torch.float32),
        rows,
        dim,
        d_in,
        _check(index, torch.int64, (n,)),
        _check(offsets, torch.int64, (n + 1,)),
        _check(order, torch.int64, (m,)),
        _check(token, torch.int64, (m,)),
        _check(x, torch.float32, (t, d_in)),
        _check(gates, torch.float32, (m,)),
        _check(h, torch.float32, (m,)),
        _check(dy, torch.float32, (t, dim - d_in)),
        t,
        m,
        n,
        ACTIVATIONS[act],
        dx.data_ptr(),
        dgates.data_ptr(),
        _check(rowgrad, torch.float32, (n, dim)),
    )
    return dx, dgates, rowgrad


def pk_search(
    q: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    k: int,
    n_valid: int,
    budgets: torch.Tensor | None = None,
    *,
    simd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact product-key top-k (``index/_product_keys.py``): for queries ``q [T, H, 2e]`` and
    sub-keys ``keys1 [H, n1, e]``, ``keys2 [H, n2, e]``, the best ``k`` grid ids below
    ``n_valid`` of ``q_a . keys1[i] + q_b . keys2[j]`` (id ``i * n2 + j``) per query and head,
    best first: ``(ids, vals)``, each ``[T, H, k]``. The sub-key scores are two batched
    matmuls (BLAS); the loop does the selection: each half's top-k, then the pairs that can
    make the top-k of the sums. ``budgets`` (int64 ``[T]``, optional): query ``t`` stops at its
    best ``budgets[t]`` rows (clamped to ``[1, k]``) and the rest of its entries are padding
    (id -1, value -inf); the selection's cost falls with the budget. On a CPU with AVX2 and
    ``k <= 16`` (routing's usual k) the selection keeps each top-k in vector registers
    (``csrc/native.c`` ``top16_*``): about 2x faster than the scalar insertion it falls back
    to, with the same results (ties keep the earlier candidate first; NaN scores stop the same
    way). ``simd=False`` forces the scalar selection."""
    assert _lib is not None
    t, heads, _ = q.shape
    _, n1, e = keys1.shape
    n2 = keys2.shape[1]
    f, r = divmod(n_valid, n2)
    kk = min(k, n_valid)
    qh = q.transpose(0, 1)  # [H, T, 2e]
    s1 = torch.matmul(qh[..., :e], keys1.transpose(1, 2)).contiguous()  # [H, T, n1]
    s2 = torch.matmul(qh[..., e:], keys2.transpose(1, 2)).contiguous()  # [H, T, n2]
    ids = torch.empty((t, heads, kk), dtype=torch.int64)
    vals = torch.empty((t, heads, kk), dtype=torch.float32)
    if budgets is not None:
        budgets = budgets.contiguous()  # kept alive through the call
    _lib.pk_search(
        _check(s1, torch.float32, (heads, t, n1)),
        _check(s2, torch.float32, (heads, t, n2)),
        t,
        heads,
        n1,
        n2,
        kk,
        f,
        r,
        ids.data_ptr(),
        vals.data_ptr(),
        0 if budgets is None else _check(budgets, torch.int64, (t,)),
        simd,
    )
    return ids, vals


def pk_scores_backward(
    q: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    ids: torch.Tensor,
    grad: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the scores :func:`pk_search` returned, for ``grad [T, H, k]``: ``(dq,
    dkeys1, dkeys2)``."""
    assert _lib is not None
    t, heads, _ = q.shape
    _, n1, e = keys1.shape
    n2 = keys2.shape[1]
    k = ids.shape[2]
    dq = torch.empty_like(q)
    dk1, dk2 = torch.zeros_like(keys1), torch.zeros_like(keys2)
    _lib.pk_scores_backward(
        _check(q, torch.float32, (t, heads, 2 * e)),
        _check(keys1, torch.float32, (heads, n1, e)),
        _check(keys2, torch.float32, (heads, n2, e)),
        _check(ids, torch.int64, (t, heads, k)),
        _check(grad, torch.float32, (t, heads, k)),
        t,
        heads,
        e,
        n1,
        n2,
        k,
        dq.data_ptr(),
        dk1.data_ptr(),
        dk2.data_ptr(),
    )
    return dq, dk1, dk2


def usage_touch(
    usage: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    trained: torch.Tensor,
    dirty: torch.Tensor,
    step: int,
    epoch: int,
    use_decay: float,
) -> None:
    """``_usage.touch`` of the trained rows among cached ``slots`` (used ``counts`` times), on
    the cache's float64 usage column, in place and in one pass: ``dirty[slot] = True`` for them;
    rows without statistics are left alone. RECENT's decay comes from libm's ``pow``, which may
    differ from PyTorch's in the last bit."""
    assert _lib is not None
    capacity = usage.shape[0]
    n = len(slots)
    _check(usage, torch.float64, (capacity, USAGE_WIDTH))
    _lib.usage_touch(
        usage.data_ptr(),
        capacity,
        _check(slots, torch.int64, (n,)),
        _check(counts, torch.int64, (n,)),
        _check(trained, torch.bool, (capacity,)),
        _check(dirty, torch.bool, (capacity,)),
        n,
        step,
        epoch,
        use_decay,
    )


@dataclass(frozen=True, slots=True)
class UsageStep:
    """What a tracked row step records besides the step: the clock and the lifecycle's rates,
    and whether the rows' use in this step is still to be counted (``touch``: what
    :func:`usage_touch` does, first)."""

    step: int
    epoch: int
    use_decay: float
    update_decay: float
    inertia: float
    touch: bool = False

    def args(self) -> tuple[int, int, float, float, float, bool]:
        return (
            int(self.step),
            int(self.epoch),
            float(self.use_decay),
            float(self.update_decay),
            float(self.inertia),
            bool(self.touch),
        )


def apply_rows_tracked(
    opt: int,
    hyper: tuple[float, float, float, float],
    delta: torch.Tensor,
    state: torch.Tensor,
    base: torch.Tensor,
    row: torch.Tensor,
    slots: torch.Tensor,
    grads: torch.Tensor,
    usage: torch.Tensor,
    trained: torch.Tensor,
    counts: torch.Tensor,
    rates: UsageStep,
) -> None:
    """:func:`apply_rows` with a lifecycle, in the same pass over the rows (each used
    ``counts`` times in the step): rows without a delta (``~trained``) start fresh; a SCREENED
    row's change is damped by its inertia (``_usage.damping``); every row's statistics in the
    cache's ``usage`` column record the step (``_usage.start`` for new ones,
    ``_usage.updated`` with its gradient's float32 norm). The caller marks the rows trained and
    dirty."""
    assert _lib is not None
    columns = _cache_columns(delta, state, base, row)
    capacity, dim = columns[-3], columns[-2]
    n = len(slots)
    lr, eps, b1, b2 = hyper
    _lib.apply_rows_tracked(
        opt,
        *columns,
        _check(slots, torch.int64, (n,)),
        _check(grads, torch.float32, (n, dim)),
        n,
        lr,
        eps,
        b1,
        b2,
        _check(usage, torch.float64, (capacity, USAGE_WIDTH)),
        _check(trained, torch.bool, (capacity,)),
        _check(counts, torch.int64, (n,)),
        rates.args(),
    )


def step_rows_tracked(
    opt: int,
    hyper: tuple[float, float, float, float],
    delta: torch.Tensor,
    state: torch.Tensor,
    grads: torch.Tensor,
    usage: torch.Tensor,
    counts: torch.Tensor,
    rates: UsageStep,
) -> None:
    """The same tracked step on compact float32 arrays (rows not in the cache), in place:
    ``delta [n, dim]``, ``state``, ``usage [n, USAGE_WIDTH]`` (a row without statistics, NaN,
    starts them). The same code per row as :func:`apply_rows_tracked`, so a row gets the same
    bits cached or spilled."""
    assert _lib is not None
    n = len(delta)
    lr, eps, b1, b2 = hyper
    _lib.step_rows_tracked(
        opt,
        *_compact_arrays(delta, state, grads),
        lr,
        eps,
        b1,
        b2,
        _check(usage, torch.float64, (n, USAGE_WIDTH)),
        _check(counts, torch.int64, (n,)),
        rates.args(),
    )


def has_usage_loops() -> bool:
    """Whether the built extension has the usage loops (an extension built from an older
    checkout may not)."""
    return _lib is not None and hasattr(_lib, "step_rows_tracked")
