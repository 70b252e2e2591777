"""The fused CPU loops of ``dpsn._native`` (csrc/native.c), behind the checks they rely on.

Private to dpsn: the row path and its optimizers (``tiers/``), the pool's layer (``pool/``)
and the product-key router (``index/``) call it; nothing here is API.

Every caller keeps its PyTorch path: these run only when the extension was built, the tensors
are on the CPU and the environment does not say ``DPSN_NATIVE=0``; the row path's tests run on
both paths (the ``row_kernels`` fixture in tests/conftest.py), and CUDA always takes the
PyTorch one.

The loops take raw pointers, so nothing that reaches them may be wrong. Each wrapper checks, in
one place per call, what C cannot: every tensor's type, dtype, device, contiguity and shape
(so every pointer covers what the loop reads or writes), and the scalars that size a loop
(the hash table's ``bits``/``half``, a grid's ``n2``, an optimizer's kind against its state
width). What only a pass over the data shows (an id or slot out of range, a negative id) the C
loops check as they go, at no extra pass: they raise ``IndexError`` / ``ValueError`` before
following a bad index, never after. ``tests/test_c_boundary_fuzz.py`` drives every public
entry that reaches here with hostile inputs in forked children and asserts none dies by a
signal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

try:
    from dpsn import _native as _lib
except ImportError:  # built without a C compiler: PyTorch paths only
    _lib = None

BUILT = _lib is not None  # the extension was built (whatever DPSN_NATIVE says)
ENABLED = BUILT and os.environ.get("DPSN_NATIVE", "1") != "0"

# Optimizer kinds the loops know (csrc/native.c OPT_*): never renumber.
OPT_SGD, OPT_ADAGRAD, OPT_ADAM = 0, 1, 2
OPTIMIZER_KINDS = (OPT_SGD, OPT_ADAGRAD, OPT_ADAM)
# The usage column's width and field order the usage loops know (csrc/native.c U_*), those of
# store/usage_fields.py (a test checks they agree).
USAGE_WIDTH = 10
_INT64 = (-(2**63), 2**63 - 1)


def usable(*tensors: torch.Tensor) -> bool:
    """True if the native loops may run on ``tensors`` (all on the CPU)."""
    # ``is_cpu`` is a flag read; ``device.type`` builds a torch.device first (a hot read asks
    # this on every call)
    return ENABLED and all(t.is_cpu for t in tensors)


def _check(t: Any, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> int:
    """The pointer of ``t`` once it is a contiguous CPU tensor of ``dtype`` (and ``shape``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"native loop needs a tensor, got {type(t).__name__}")
    if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
        raise ValueError(
            f"native loop needs a contiguous CPU {dtype} tensor, got a"
            f"{'' if t.is_contiguous() else ' non-contiguous'} {t.device.type} {t.dtype} one"
        )
    if shape is not None and t.shape != shape:  # (torch.Size is a tuple: no copy to compare)
        raise ValueError(f"native loop needs shape {shape}, got {tuple(t.shape)}")
    return t.data_ptr()


def _ids(t: Any) -> torch.Tensor:
    """A 1-D int64 CPU tensor of ids, made contiguous (a read-only input: a copy is fine)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ids must be a tensor, got {type(t).__name__}")
    if t.dtype != torch.int64 or t.dim() != 1:
        raise ValueError(f"ids must be a 1-D int64 tensor, got {t.dim()}-D {t.dtype}")
    return t.contiguous()


def _int(x: Any, name: str, low: int = _INT64[0], high: int = _INT64[1]) -> int:
    """``x`` as a Python int in ``[low, high]`` (what C's ``long long`` holds)."""
    if type(x) is not int and (isinstance(x, bool) or not isinstance(x, int)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if not low <= x <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {x}")
    return x


def _table_args(
    entries: torch.Tensor,
    half: int,
    bits: int,
    mult0: int,
    mult1: int,
    slot_ids: torch.Tensor,
    capacity: int,
) -> tuple[int, int, int, int, int, int, int, int]:
    """The checked arguments of a cuckoo table, in the order the loops take them (csrc/native.c
    ``TABLE_FMT``): ``entries`` int32 or int64 ``[2 * half]`` with ``half == 2**bits``,
    ``slot_ids`` int64 ``[capacity + 1]`` (the last entry the empty sentinel slot)."""
    bits = _int(bits, "bits", 1, 62)
    if _int(half, "half") != 1 << bits:
        raise ValueError(f"hash table half {half} is not 2**bits (bits {bits})")
    capacity = _int(capacity, "capacity", 1)
    if not isinstance(entries, torch.Tensor) or entries.dtype not in (torch.int32, torch.int64):
        raise ValueError("hash table entries must be an int32 or int64 tensor")
    wide = entries.dtype == torch.int64
    if not wide and capacity > 2**31 - 1:
        raise ValueError(f"an int32 hash table cannot name {capacity} slots")
    return (
        _check(entries, entries.dtype, (2 * half,)),
        int(wide),
        half,
        bits,
        _int(mult0, "mult0"),
        _int(mult1, "mult1"),
        capacity,
        _check(slot_ids, torch.int64, (capacity + 1,)),
    )


class CuckooTable:
    """A slot table's arguments for the cuckoo loops, checked once (all that ``_table_args``
    checks) so that a hot read does not check them again on every call (they were ~5 us of a
    ~60 us read of a few ids).

    Holds ``entries`` and ``slot_ids``, which stay alive while it does. Contract: its owner
    (``tiers.SlotTable``) builds a new one whenever a parameter changes or either tensor is
    replaced. A tensor resized or re-pointed in place since is still refused: every use
    compares both tensors' data pointers and sizes with the checked ones (``args``), a few
    flag reads, before C sees a pointer."""

    __slots__ = ("args", "entries", "slot_ids")

    def __init__(
        self,
        entries: torch.Tensor,
        half: int,
        bits: int,
        mult0: int,
        mult1: int,
        slot_ids: torch.Tensor,
        capacity: int,
    ) -> None:
        self.args = _table_args(entries, half, bits, mult0, mult1, slot_ids, capacity)
        self.entries, self.slot_ids = entries, slot_ids

    def current(self) -> tuple[int, int, int, int, int, int, int, int]:
        """The checked arguments, once both tensors are confirmed unchanged since the check."""
        a, e, s = self.args, self.entries, self.slot_ids
        if e.data_ptr() != a[0] or s.data_ptr() != a[7] or e.numel() != 2 * a[2]:
            raise ValueError("the hash table's entries were replaced or resized since checked")
        if s.numel() != a[6] + 1 or not (e.is_contiguous() and s.is_contiguous()):
            raise ValueError("the cache's slot ids were replaced or resized since checked")
        return a


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
    """The slot table's lookup in one pass (see ``_slot_table.SlotTable.find``); a negative id
    (``index.PAD_ID``) is never a hit."""
    return cuckoo_find_in(CuckooTable(entries, half, bits, mult0, mult1, slot_ids, capacity), ids)


def cuckoo_find_in(checked: CuckooTable, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cuckoo_find` on a table checked once (:class:`CuckooTable`)."""
    assert _lib is not None
    if not isinstance(checked, CuckooTable):
        raise TypeError(f"a checked CuckooTable is needed, got {type(checked).__name__}")
    table = checked.current()
    ids = _ids(ids)
    n = len(ids)
    slots = torch.empty(n, dtype=torch.int64)
    hit = torch.empty(n, dtype=torch.bool)
    _lib.cuckoo_find(*table, ids.data_ptr(), n, slots.data_ptr(), hit.data_ptr())
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
    """The slot table's insertion of new ``ids`` (each >= 0) into ``slots`` (each below the
    capacity), one id after another (see ``_slot_table.SlotTable.insert``); False if a chain of
    moves ran past ``max_kicks`` (the table must then be rebuilt)."""
    checked = CuckooTable(entries, half, bits, mult0, mult1, slot_ids, capacity)
    return cuckoo_insert_in(checked, home, ids, slots, max_kicks)


def cuckoo_insert_in(
    checked: CuckooTable,
    home: torch.Tensor,
    ids: torch.Tensor,
    slots: torch.Tensor,
    max_kicks: int,
) -> bool:
    """:func:`cuckoo_insert` on a table checked once (:class:`CuckooTable`)."""
    assert _lib is not None
    if not isinstance(checked, CuckooTable):
        raise TypeError(f"a checked CuckooTable is needed, got {type(checked).__name__}")
    table = checked.current()
    ids, slots = _ids(ids), _ids(slots)
    n = len(ids)
    done = _lib.cuckoo_insert(
        *table,
        _check(home, torch.int64, (table[6] + 1,)),
        ids.data_ptr(),
        _check(slots, torch.int64, (n,)),
        n,
        _int(max_kicks, "max_kicks", 0),
    )
    return done == n


def group_ids(
    ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(uniq, counts, inverse, order)`` of 1-D int64 ``ids`` (each >= 0, else ValueError), as
    ``torch.sort(ids, stable=True)`` + ``unique_consecutive`` give them: ``uniq`` ascending,
    ``counts`` its multiplicities, ``uniq[inverse] == ids``, ``ids[order]`` sorted (stably)."""
    assert _lib is not None
    ids = _ids(ids)
    n = len(ids)
    order, uniq, counts, inverse = (torch.empty(n, dtype=torch.int64) for _ in range(4))
    scratch = torch.empty((3, n), dtype=torch.int64)
    m = _lib.group_ids(
        ids.data_ptr(),
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
    dim]``, any dtype), or None if some id is not cached (nothing gathered then; a negative id
    never is). ``last``: an LRU policy's float64 ``[capacity]`` column, stamped with ``step``
    for every slot read."""
    checked = CuckooTable(entries, half, bits, mult0, mult1, slot_ids, capacity)
    return find_gather_in(checked, ids, table, last, step)


def find_gather_in(
    checked: CuckooTable,
    ids: torch.Tensor,
    table: torch.Tensor,
    last: torch.Tensor | None = None,
    step: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """:func:`find_gather` on a hash table checked once (:class:`CuckooTable`): the hot read's
    entry. ``ids``, ``table`` and ``last`` are still checked on every call (they change)."""
    assert _lib is not None
    if not isinstance(checked, CuckooTable):
        raise TypeError(f"a checked CuckooTable is needed, got {type(checked).__name__}")
    args = checked.current()
    ids = _ids(ids)
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise ValueError("find_gather needs a 2-D [capacity, width] table")
    capacity, width = args[6], table.shape[1]
    n = len(ids)
    slots = torch.empty(n, dtype=torch.int64)
    out = torch.empty((n, width), dtype=table.dtype)
    misses = _lib.find_gather(
        *args,
        ids.data_ptr(),
        n,
        slots.data_ptr(),
        _check(table, table.dtype, (capacity, width)),
        width * table.element_size(),
        out.data_ptr(),
        0 if last is None else _check(last, torch.float64, (capacity,)),
        float(step),
    )
    return None if misses else (slots, out)


def state_width(kind: int, dim: int) -> int:
    """The state floats per row that optimizer ``kind``'s loop reads and writes for rows of
    ``dim``: the kernel's own figure (csrc/native.c ``opt_width``), so no other code can
    disagree with it. ValueError for an unknown kind or ``dim < 1``."""
    assert _lib is not None
    return int(_lib.state_width(_int(kind, "optimizer kind", -(2**31), 2**31 - 1), int(dim)))


def native_kind(native: Any, width: Any, dim: int) -> int | None:
    """The loop kind that computes the step of an optimizer whose ``native`` attribute is
    ``native`` and which keeps ``width`` state floats a row (its ``state_width(dim)``) for rows
    of ``dim``, or None (take the PyTorch path): ``native`` must be one of
    :data:`OPTIMIZER_KINDS` and ``width`` the one that loop uses. The caller asks the optimizer
    for its width (the row step has it already), so nothing here calls into an optimizer. The
    built-in optimizers also drop ``native`` in any subclass that overrides their step, state
    width or hyperparameters."""
    if (
        _lib is None
        or isinstance(native, bool)
        or not isinstance(native, int)
        or native not in OPTIMIZER_KINDS
        or dim < 1
        or isinstance(width, bool)
        or not isinstance(width, int)
    ):
        return None
    return native if width == state_width(native, dim) else None


def _step_kind(opt: int, dim: int, width: int) -> int:
    """``opt`` once it is a known kind whose state width for ``dim`` is ``width``."""
    if isinstance(opt, bool) or opt not in OPTIMIZER_KINDS:
        raise ValueError(f"unknown native optimizer kind {opt!r}; known: {OPTIMIZER_KINDS}")
    need = state_width(opt, dim)
    if width != need:
        raise ValueError(f"optimizer kind {opt} keeps {need} state floats a row, got {width}")
    return opt


def _hyper(hyper: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    lr, eps, b1, b2 = (float(h) for h in hyper)
    return lr, eps, b1, b2


def _scale(scale: Any, n: int) -> int:
    """The pointer of a per-row update scale (0: none, every row 1): a contiguous CPU float32
    ``[n]`` tensor of finite values. The loops multiply row ``i``'s learning rate by
    ``scale[i]`` (csrc/native.c ``row_lr``); a NaN or Inf there would put non-finite values
    into resident rows, which the fused loops update in place, so it is refused here."""
    if scale is None:
        return 0
    ptr = _check(scale, torch.float32, (n,))
    if n and not bool(torch.isfinite(scale).all()):
        raise ValueError("native loop needs a finite update scale (NaN or Inf found)")
    return ptr


def _matrix(t: Any, name: str) -> tuple[int, int]:
    """The ``(rows, width)`` of a 2-D tensor ``t`` (checked further by :func:`_check`)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor")
    return t.shape[0], t.shape[1]


def _cache_columns(
    opt: int, delta: torch.Tensor, state: torch.Tensor, base: torch.Tensor, row: torch.Tensor
) -> tuple[int, int, int, int, int, int, int, int]:
    """The checked optimizer kind and float32 step columns of a cache (``delta``, ``state``,
    ``base``, ``row``, each ``[capacity, ...]``): the kind, the columns' pointers, then
    capacity, dim and state width, in the order the loops take them."""
    capacity, dim = _matrix(delta, "delta")
    width = _matrix(state, "state")[1]
    opt = _step_kind(opt, dim, width)
    for col in (base, row):
        _check(col, torch.float32, (capacity, dim))
    _check(state, torch.float32, (capacity, width))
    ptrs = (_check(delta, torch.float32), state.data_ptr(), base.data_ptr(), row.data_ptr())
    return (opt, *ptrs, capacity, dim, width)


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
    scale: torch.Tensor | None = None,
) -> None:
    """One optimizer step on the cache's float32 columns at ``slots`` (each below the
    capacity, else IndexError with nothing written), and ``row = base + delta`` for them, in
    one pass; ``fresh`` rows start from a zero delta and state, with their current row as
    base. ``scale`` (float32 ``[n]``, finite): each row's update scale (its learning rate
    times ``scale[i]``; the state sees the whole gradient)."""
    assert _lib is not None
    columns = _cache_columns(opt, delta, state, base, row)
    dim = columns[-2]
    slots = _ids(slots)
    n = len(slots)
    _lib.apply_rows(
        *columns,
        slots.data_ptr(),
        _check(fresh, torch.bool, (n,)),
        _check(grads, torch.float32, (n, dim)),
        n,
        *_hyper(hyper),
        _scale(scale, n),
    )


def _compact_arrays(
    opt: int, delta: torch.Tensor, state: torch.Tensor, grads: torch.Tensor
) -> tuple[int, int, int, int, int, int, int]:
    """The checked kind and compact float32 arrays of a step on rows outside the cache
    (``delta``, ``state``, ``grads``): the kind, their pointers, then dim, state width and
    rows."""
    n, dim = _matrix(delta, "delta")
    width = _matrix(state, "state")[1]
    return (
        _step_kind(opt, dim, width),
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
    scale: torch.Tensor | None = None,
) -> None:
    """The same step on compact float32 arrays, in place (rows not in the cache)."""
    assert _lib is not None
    arrays = _compact_arrays(opt, delta, state, grads)
    _lib.step_rows(*arrays, *_hyper(hyper), _scale(scale, arrays[-1]))


# Activation kinds of the PEER loops (csrc/native.c ACT_*): never renumber.
ACTIVATIONS = {"gelu": 0, "relu": 1, "silu": 2, "tanh": 3}


def _peer_sizes(table: Any, d_in: int, act: str) -> tuple[int, int, int, int]:
    """``(rows, dim, d_in, activation kind)`` of a PEER call once they make sense: a 2-D table
    whose rows are ``u (d_in) | v``, a known activation."""
    rows, dim = _matrix(table, "the PEER table")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    d_in = _int(d_in, "d_in", 0, dim)
    if dim < 1:
        raise ValueError("the PEER table has empty rows")
    return rows, dim, d_in, ACTIVATIONS[act]


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
    rows, dim, d_in, kind = _peer_sizes(table, d_in, act)
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
        kind,
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
    rows, dim, d_in, kind = _peer_sizes(table, d_in, act)
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
        kind,
        dx.data_ptr(),
        dgates.data_ptr(),
        _check(rowgrad, torch.float32, (n, dim)),
    )
    return dx, dgates, rowgrad


def _pk_sizes(q: Any, keys1: Any, keys2: Any) -> tuple[int, int, int, int, int]:
    """``(T, H, n1, n2, e)`` of queries ``[T, H, 2e]`` and sub-keys ``[H, n1, e]``, ``[H, n2,
    e]`` once they agree, with non-empty grids (ids are split by ``n2``)."""
    for name, a in (("q", q), ("keys1", keys1), ("keys2", keys2)):
        if not isinstance(a, torch.Tensor) or a.dim() != 3 or a.dtype != torch.float32:
            raise ValueError(f"product-key {name} must be a 3-D float32 tensor")
    t, heads, width = q.shape
    _, n1, e = keys1.shape
    n2 = keys2.shape[1]
    if (
        tuple(keys1.shape) != (heads, n1, e)
        or tuple(keys2.shape) != (heads, n2, e)
        or width != 2 * e
        or n1 < 1
        or n2 < 1
    ):
        raise ValueError(
            f"product-key shapes disagree: q {tuple(q.shape)}, keys1 {tuple(keys1.shape)}, "
            f"keys2 {tuple(keys2.shape)}"
        )
    return t, heads, n1, n2, e


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
    t, heads, n1, n2, e = _pk_sizes(q, keys1, keys2)
    k, n_valid = _int(k, "k", 1), _int(n_valid, "n_valid", 1, n1 * n2)
    f, r = divmod(n_valid, n2)
    kk = min(k, n_valid)
    qh = q.transpose(0, 1)  # [H, T, 2e]
    s1 = torch.matmul(qh[..., :e], keys1.transpose(1, 2)).contiguous()  # [H, T, n1]
    s2 = torch.matmul(qh[..., e:], keys2.transpose(1, 2)).contiguous()  # [H, T, n2]
    ids = torch.empty((t, heads, kk), dtype=torch.int64)
    vals = torch.empty((t, heads, kk), dtype=torch.float32)
    if budgets is not None:
        budgets = _ids(budgets)  # kept alive through the call
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
        bool(simd),
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
    t, heads, n1, n2, e = _pk_sizes(q, keys1, keys2)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 3:
        raise ValueError("product-key ids must be a 3-D [T, H, k] tensor")
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
    capacity = _matrix(usage, "usage")[0]
    _check(usage, torch.float64, (capacity, USAGE_WIDTH))
    slots = _ids(slots)
    n = len(slots)
    _lib.usage_touch(
        usage.data_ptr(),
        capacity,
        slots.data_ptr(),
        _check(counts, torch.int64, (n,)),
        _check(trained, torch.bool, (capacity,)),
        _check(dirty, torch.bool, (capacity,)),
        n,
        _int(step, "step"),
        _int(epoch, "epoch"),
        float(use_decay),
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
            _int(int(self.step), "step"),
            _int(int(self.epoch), "epoch"),
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
    scale: torch.Tensor | None = None,
) -> None:
    """:func:`apply_rows` with a lifecycle, in the same pass over the rows (each used
    ``counts`` times in the step): rows without a delta (``~trained``) start fresh; a SCREENED
    row's change is damped by its inertia (``_usage.damping``); every row's statistics in the
    cache's ``usage`` column record the step (``_usage.start`` for new ones,
    ``_usage.updated`` with its gradient's float32 norm). The caller marks the rows trained and
    dirty."""
    assert _lib is not None
    columns = _cache_columns(opt, delta, state, base, row)
    capacity, dim = columns[-3], columns[-2]
    slots = _ids(slots)
    n = len(slots)
    _lib.apply_rows_tracked(
        *columns,
        slots.data_ptr(),
        _check(grads, torch.float32, (n, dim)),
        n,
        *_hyper(hyper),
        _check(usage, torch.float64, (capacity, USAGE_WIDTH)),
        _check(trained, torch.bool, (capacity,)),
        _check(counts, torch.int64, (n,)),
        rates.args(),
        _scale(scale, n),
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
    scale: torch.Tensor | None = None,
) -> None:
    """The same tracked step on compact float32 arrays (rows not in the cache), in place:
    ``delta [n, dim]``, ``state``, ``usage [n, USAGE_WIDTH]`` (a row without statistics, NaN,
    starts them). The same code per row as :func:`apply_rows_tracked`, so a row gets the same
    bits cached or spilled."""
    assert _lib is not None
    arrays = _compact_arrays(opt, delta, state, grads)
    n = arrays[-1]
    _lib.step_rows_tracked(
        *arrays,
        *_hyper(hyper),
        _check(usage, torch.float64, (n, USAGE_WIDTH)),
        _check(counts, torch.int64, (n,)),
        rates.args(),
        _scale(scale, n),
    )


def has_usage_loops() -> bool:
    """Whether the built extension has the usage loops (an extension built from an older
    checkout may not)."""
    return _lib is not None and hasattr(_lib, "step_rows_tracked")
