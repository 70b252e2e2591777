"""Nothing that reaches the C loops of ``dpsn._native`` can crash the process (issue 20).

Hostile inputs (wrong dtypes, non-contiguous tensors, negative ids, ``-1`` = ``index.PAD_ID``,
huge ids, empty batches, NaN, odd shapes, scalars C divides or shifts by, optimizer subclasses
whose state does not fit the native loop) go through every public entry that reaches C: the
pool's read/write/train path, ``PoolLayer``, ``PoolEmbedding``, the product-key router, the
tier classes ``dpsn.tiers`` exports (``DeviceCache``, ``SlotTable``), and the private wrappers
of ``dpsn._kernels`` themselves. Each case may succeed or raise a typed error (``dpsn.errors``,
or a builtin ``ValueError`` / ``TypeError`` / ``IndexError`` / ``LookupError``); none may kill
the process. What each case did before the boundary was checked (measured: this file run
per case on the previous code) is marked ``# before:``: a SIGSEGV or SIGFPE, or a silent wrong
answer or write past a tensor, which the rest of the process may pay for later.

How: one child Python imports torch and dpsn once, then forks a grandchild per group of cases
(a fork before any parallel torch op is safe); a grandchild dying by a signal names the case it
was running. Each group writes one JSON line per case. The whole run takes a few seconds.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

TYPED = ("ValueError", "TypeError", "IndexError", "LookupError")


# ---- the cases (run in the grandchildren) -------------------------------------------------


def _groups(root: Path) -> dict[str, list[tuple[str, Callable[[], object]]]]:
    """Case groups: name -> [(case, thunk)]. Imports here, so only the children pay them."""
    import torch

    import dpsn
    from dpsn import _kernels as K
    from dpsn.index import ProductKeyRouter
    from dpsn.pool import PoolEmbedding, PoolLayer, RowAdagrad, RowAdam, RowSGD
    from dpsn.tiers import Column, DeviceCache, SlotTable

    i64 = torch.int64
    groups: dict[str, list[tuple[str, Callable[[], object]]]] = {}

    def case(group: str, name: str):
        def add(fn: Callable[[], object]) -> Callable[[], object]:
            groups.setdefault(group, []).append((name, fn))
            return fn

        return add

    # -- the slot table and the device cache (dpsn.tiers) --
    def table(capacity: int = 8) -> SlotTable:
        t = SlotTable(capacity, torch.full((capacity + 1,), -1, dtype=i64))
        return t

    def filled() -> tuple[DeviceCache, Column]:
        col = Column("row", 4, torch.float32, False)
        cache = DeviceCache(8, [col])

        def fill(ids: torch.Tensor, slots: torch.Tensor) -> None:
            cache.column(col)[slots] = ids.float()[:, None].expand(-1, 4)

        cache.lookup(torch.arange(8, dtype=i64), fill, lambda *a: None)
        return cache, col

    def expect(cond: bool, what: str) -> None:
        if not cond:
            raise AssertionError(what)  # not a typed error: the parent reports it

    @case("tiers", "SlotTable.find(-1) is a miss")  # before: a hit (the sentinel)
    def _():
        _, hit = table().find(torch.tensor([-1, -1, 3], dtype=i64))
        expect(not bool(hit.any()), "-1 hit an empty slot")

    @case("tiers", "SlotTable.find_gather(-1) gathers nothing")  # before: read past the column
    def _():
        t = table()
        col = torch.zeros((8, 4))
        last = torch.zeros(8, dtype=torch.float64)
        expect(t.find_gather(torch.tensor([-1], dtype=i64), col, last, 1.0) is None, "gathered")

    @case("tiers", "DeviceCache.read_hits(-1)")  # before: wrote past the LRU column
    def _():
        cache, col = filled()
        expect(cache.read_hits(torch.tensor([-1], dtype=i64), col) is None, "-1 was a hit")
        expect(cache.read_hits(torch.tensor([0, -1, 5], dtype=i64), col) is None, "-1 hit")

    @case("tiers", "DeviceCache.read_hits: odd ids")
    def _():
        cache, col = filled()
        for ids in (
            torch.tensor([2**62, -(2**62)], dtype=i64),
            torch.empty(0, dtype=i64),
            torch.arange(16, dtype=i64)[::2],  # non-contiguous
        ):
            cache.read_hits(ids, col)

    @case("tiers", "DeviceCache.read_hits: int32 ids")
    def _():
        cache, col = filled()
        cache.read_hits(torch.tensor([1, 2], dtype=torch.int32), col)

    @case("tiers", "DeviceCache.read_hits: 2-D ids")
    def _():
        cache, col = filled()
        cache.read_hits(torch.zeros((2, 2), dtype=i64), col)

    @case("tiers", "DeviceCache.read_hits: float ids with NaN")
    def _():
        cache, col = filled()
        cache.read_hits(torch.tensor([float("nan"), 1.0]), col)

    @case("tiers", "DeviceCache.lookup(-1) raises, cache unchanged")
    def _():
        cache, _ = filled()
        before = cache.slot_ids.clone()
        try:
            cache.lookup(torch.tensor([-1], dtype=i64), lambda i, s: None, lambda *a: None)
        finally:
            expect(torch.equal(before, cache.slot_ids), "the failed lookup changed the cache")

    @case("tiers", "DeviceCache.find: huge and negative ids")
    def _():
        cache, _ = filled()
        slots, hit = cache.find(torch.tensor([-1, -5, 2**63 - 1, -(2**63), 3], dtype=i64))
        expect(hit.tolist() == [False, False, False, False, True], f"hits {hit.tolist()}")
        expect(bool(((slots >= 0) & (slots < 8)).all()), "a slot outside the cache")

    @case("tiers", "SlotTable.insert: negative id")
    def _():
        table().insert(torch.tensor([-1], dtype=i64), torch.tensor([0], dtype=i64))

    @case("tiers", "SlotTable.insert: slot outside the cache")
    def _():
        table().insert(torch.tensor([5], dtype=i64), torch.tensor([8], dtype=i64))

    @case("tiers", "SlotTable.insert: ids and slots disagree")
    def _():
        table().insert(torch.tensor([5, 6], dtype=i64), torch.tensor([1], dtype=i64))

    @case("tiers", "SlotTable: bad sentinel column")
    def _():
        SlotTable(8, torch.full((8,), -1, dtype=i64))

    # -- the kernels' wrappers, called directly with what C must never see --
    if K.BUILT:
        ent = torch.full((2 * 128,), 8, dtype=torch.int32)
        sid = torch.full((9,), -1, dtype=i64)
        ids = torch.tensor([1, 2], dtype=i64)
        good = (ent, 128, 7, 3, 5, sid, 8)
        bad_tables = {
            "bits 0": (ent, 1, 0, 3, 5, sid, 8),  # before: a shift by 64 (undefined)
            "bits 63": (ent, 1 << 63, 63, 3, 5, sid, 8),
            "bits vs half": (ent, 128, 20, 3, 5, sid, 8),  # before: read past the entries
            "float entries": (ent.float(), 128, 7, 3, 5, sid, 8),
            "short slot_ids": (ent, 128, 7, 3, 5, sid[:4], 8),
            "capacity 0": (ent, 128, 7, 3, 5, sid[:1], 0),
            "multiplier past int64": (ent, 128, 7, 2**64, 5, sid, 8),
            "non-contiguous entries": (
                torch.full((512,), 8, dtype=torch.int32)[::2],
                128,
                7,
                3,
                5,
                sid,
                8,
            ),
        }
        for label, args in bad_tables.items():
            case("kernels", f"cuckoo_find: {label}")(lambda a=args: K.cuckoo_find(*a, ids))
            case("kernels", f"find_gather: {label}")(
                lambda a=args: K.find_gather(*a, ids, torch.zeros(8, 4))
            )
            case("kernels", f"cuckoo_insert: {label}")(
                lambda a=args: K.cuckoo_insert(*a, sid.clone(), ids, ids, 10)
            )
        for label, bad_ids in {
            "int32 ids": ids.int(),
            "2-D ids": ids[None],
            "float ids": torch.tensor([float("nan")]),
            "a list": [1, 2],
        }.items():
            case("kernels", f"cuckoo_find: {label}")(lambda b=bad_ids: K.cuckoo_find(*good, b))
            case("kernels", f"group_ids: {label}")(lambda b=bad_ids: K.group_ids(b))
        case("kernels", "find_gather: 1-D table")(lambda: K.find_gather(*good, ids, torch.zeros(8)))
        case("kernels", "find_gather: short last")(
            lambda: K.find_gather(
                *good, ids, torch.zeros(8, 4), torch.zeros(3, dtype=torch.float64)
            )
        )
        # the hot read's entries take a table checked once; what changed since is refused
        case("kernels", "find_gather_in: not a checked table")(
            lambda: K.find_gather_in(good, ids, torch.zeros(8, 4))  # type: ignore[arg-type]
        )

        def resized_after_check() -> None:
            e = ent.clone()
            checked = K.CuckooTable(e, *good[1:])
            e.resize_(4)  # same object, shorter: its pointer no longer covers 2 * half entries
            K.find_gather_in(checked, ids, torch.zeros(8, 4))

        def repointed_after_check() -> None:
            e = ent.clone()
            checked = K.CuckooTable(e, *good[1:])
            e.set_(torch.full((256,), 8, dtype=torch.int32))  # same size, other memory
            K.cuckoo_find_in(checked, ids)

        case("kernels", "find_gather_in: entries resized since checked")(resized_after_check)
        case("kernels", "cuckoo_find_in: entries re-pointed since checked")(repointed_after_check)
        case("kernels", "cuckoo_insert: negative id")(
            lambda: K.cuckoo_insert(*good, sid.clone(), torch.tensor([-1]), torch.tensor([0]), 9)
        )
        case("kernels", "cuckoo_insert: slot past the cache")(
            lambda: K.cuckoo_insert(*good, sid.clone(), torch.tensor([3]), torch.tensor([8]), 9)
        )
        case("kernels", "cuckoo_insert: negative max_kicks")(
            lambda: K.cuckoo_insert(*good, sid.clone(), torch.tensor([3]), torch.tensor([1]), -1)
        )
        case("kernels", "group_ids: negative")(lambda: K.group_ids(torch.tensor([3, -1])))
        case("kernels", "group_ids: empty")(lambda: K.group_ids(torch.empty(0, dtype=i64)))

        cap, dim = 4, 3
        cols = lambda w: (  # noqa: E731
            torch.zeros(cap, dim),
            torch.zeros(cap, w),
            torch.zeros(cap, dim),
            torch.zeros(cap, dim),
        )
        one, fresh, g = torch.tensor([1]), torch.tensor([True]), torch.ones(1, dim)
        hyper = (0.1, 1e-8, 0.9, 0.999)
        for label, (opt, width) in {
            "adam with adagrad's state": (K.OPT_ADAM, 1),  # before: wrote past the state
            "adam with a short state": (K.OPT_ADAM, dim),  # before: wrote past the state
            "adagrad without state": (K.OPT_ADAGRAD, 0),  # before: SIGSEGV
            "unknown kind 7": (7, 0),  # before: SIGSEGV (ran as Adam)
            "kind -1": (-1, dim + 2),
            "kind True": (True, 1),
        }.items():
            case("kernels", f"apply_rows: {label}")(
                lambda o=opt, w=width: K.apply_rows(o, hyper, *cols(w), one, fresh, g)
            )
            case("kernels", f"step_rows: {label}")(
                lambda o=opt, w=width: K.step_rows(
                    o, hyper, torch.zeros(1, dim), torch.zeros(1, w), g
                )
            )
            case("kernels", f"step_rows_tracked: {label}")(
                lambda o=opt, w=width: K.step_rows_tracked(
                    o,
                    hyper,
                    torch.zeros(1, dim),
                    torch.zeros(1, w),
                    g,
                    torch.zeros(1, K.USAGE_WIDTH, dtype=torch.float64),
                    one,
                    K.UsageStep(1, 0, 0.9, 0.9, 0.5),
                )
            )
            case("kernels", f"apply_rows_tracked: {label}")(
                lambda o=opt, w=width: K.apply_rows_tracked(
                    o,
                    hyper,
                    *cols(w),
                    one,
                    g,
                    torch.zeros(cap, K.USAGE_WIDTH, dtype=torch.float64),
                    torch.zeros(cap, dtype=torch.bool),
                    one,
                    K.UsageStep(1, 0, 0.9, 0.9, 0.5),
                )
            )
        sgd = (K.OPT_SGD, hyper)
        for label, fn in {
            "slot -1": lambda: K.apply_rows(*sgd, *cols(0), torch.tensor([-1]), fresh, g),
            "slot past the cache": lambda: K.apply_rows(
                *sgd, *cols(0), torch.tensor([cap]), fresh, g
            ),
            "short grads": lambda: K.apply_rows(*sgd, *cols(0), one, fresh, torch.ones(1, 1)),
            "short fresh": lambda: K.apply_rows(*sgd, *cols(0), one, fresh[:0], g),
            "1-D delta": lambda: K.step_rows(*sgd, torch.zeros(3), torch.zeros(3, 0), g),
            "zero dim": lambda: K.step_rows(
                *sgd, torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0)
            ),
            "non-contiguous delta": lambda: K.step_rows(
                *sgd, torch.zeros(dim, 1).t(), torch.zeros(1, 0), g
            ),
            "float64 grads": lambda: K.step_rows(
                *sgd, torch.zeros(1, dim), torch.zeros(1, 0), g.double()
            ),
            "NaN everywhere": lambda: K.step_rows(
                K.OPT_ADAM,
                (float("nan"),) * 4,
                torch.full((1, dim), float("nan")),
                torch.full((1, dim + 2), float("nan")),
                torch.full((1, dim), float("nan")),
            ),
            "usage_touch slot past the cache": lambda: K.usage_touch(
                torch.zeros(cap, K.USAGE_WIDTH, dtype=torch.float64),
                torch.tensor([cap]),
                one,
                torch.ones(cap, dtype=torch.bool),
                torch.zeros(cap, dtype=torch.bool),
                1,
                0,
                0.9,
            ),
            "usage_touch narrow usage": lambda: K.usage_touch(
                torch.zeros(cap, 3, dtype=torch.float64),
                one,
                one,
                torch.ones(cap, dtype=torch.bool),
                torch.zeros(cap, dtype=torch.bool),
                1,
                0,
                0.9,
            ),
            "usage step past int64": lambda: K.step_rows_tracked(
                *sgd,
                torch.zeros(1, dim),
                torch.zeros(1, 0),
                g,
                torch.zeros(1, K.USAGE_WIDTH, dtype=torch.float64),
                one,
                K.UsageStep(2**70, 0, 0.9, 0.9, 0.5),
            ),
        }.items():
            case("kernels", label)(fn)

        # a per-row update scale (the loops' per-row learning rate): float32 [n], finite
        for label, sc in {
            "NaN": torch.tensor([float("nan")]),
            "Inf": torch.tensor([float("inf")]),
            "float64": torch.ones(1, dtype=torch.float64),
            "int": torch.ones(1, dtype=torch.int64),
            "short": torch.ones(0),
            "long": torch.ones(2),
            "2-D": torch.ones(1, 1),
            "non-contiguous": torch.ones(2)[::2],
            "a list": [1.0],
        }.items():
            case("kernels", f"apply_rows: {label} scale")(
                lambda s=sc: K.apply_rows(*sgd, *cols(0), one, fresh, g, s)
            )
            case("kernels", f"step_rows: {label} scale")(
                lambda s=sc: K.step_rows(*sgd, torch.zeros(1, dim), torch.zeros(1, 0), g, s)
            )
            case("kernels", f"step_rows_tracked: {label} scale")(
                lambda s=sc: K.step_rows_tracked(
                    *sgd,
                    torch.zeros(1, dim),
                    torch.zeros(1, 0),
                    g,
                    torch.zeros(1, K.USAGE_WIDTH, dtype=torch.float64),
                    one,
                    K.UsageStep(1, 0, 0.9, 0.9, 0.5),
                    s,
                )
            )
            case("kernels", f"apply_rows_tracked: {label} scale")(
                lambda s=sc: K.apply_rows_tracked(
                    *sgd,
                    *cols(0),
                    one,
                    g,
                    torch.zeros(cap, K.USAGE_WIDTH, dtype=torch.float64),
                    torch.zeros(cap, dtype=torch.bool),
                    one,
                    K.UsageStep(1, 0, 0.9, 0.9, 0.5),
                    s,
                )
            )

        table_ = torch.randn(6, 5)

        def peer(d_in=3, act="gelu", index=None, offsets=None, order=None, token=None, x=None):
            return K.peer_forward(
                table_,
                torch.tensor([0, 5]) if index is None else index,
                torch.tensor([0, 1, 2]) if offsets is None else offsets,
                torch.tensor([0, 1]) if order is None else order,
                torch.tensor([0, 1]) if token is None else token,
                torch.randn(2, d_in) if x is None else x,
                torch.ones(2),
                act,
                d_in,
            )

        for label, kw in {
            "d_in past dim": {"d_in": 9, "x": torch.randn(2, 9)},  # before: RuntimeError
            "negative d_in": {"d_in": -1, "x": torch.randn(2, 0)},
            "unknown activation": {"act": "swish"},
            "row past the table": {"index": torch.tensor([0, 6])},
            "row -1": {"index": torch.tensor([-1, 0])},
            "offsets not a CSR": {"offsets": torch.tensor([0, 5, 2])},
            "offsets short": {"offsets": torch.tensor([0, 2])},
            "use past M": {"order": torch.tensor([0, 7])},
            "token past T": {"token": torch.tensor([0, 2])},
            "token -1": {"token": torch.tensor([-1, 0])},
            "float64 x": {"x": torch.randn(2, 3).double()},
        }.items():
            case("kernels", f"peer_forward: {label}")(lambda k=kw: peer(**k))
        case("kernels", "peer_backward: d_in past dim")(
            lambda: K.peer_backward(
                table_,
                torch.tensor([0]),
                torch.tensor([0, 1]),
                torch.tensor([0]),
                torch.tensor([0]),
                torch.randn(1, 9),
                torch.ones(1),
                torch.ones(1),
                torch.randn(1, 0),
                "relu",
                9,
            )
        )

        q, k1, k2 = torch.randn(2, 1, 4), torch.randn(1, 5, 2), torch.randn(1, 3, 2)
        for label, fn in {
            "n2 == 0": lambda: K.pk_search(
                q, k1, torch.randn(1, 0, 2), 2, 1
            ),  # before: ZeroDivisionError
            "n_valid 0": lambda: K.pk_search(q, k1, k2, 2, 0),
            "n_valid past the grid": lambda: K.pk_search(q, k1, k2, 2, 16),
            "k 0": lambda: K.pk_search(q, k1, k2, 0, 15),
            "k huge": lambda: K.pk_search(q, k1, k2, 2**40, 15),
            "keys disagree": lambda: K.pk_search(q, k1, torch.randn(1, 3, 3), 2, 15),
            "heads disagree": lambda: K.pk_search(q, torch.randn(2, 5, 2), k2, 2, 15),
            "float64 q": lambda: K.pk_search(q.double(), k1, k2, 2, 15),
            "2-D q": lambda: K.pk_search(q[0], k1, k2, 2, 15),
            "NaN scores": lambda: K.pk_search(torch.full_like(q, float("nan")), k1, k2, 4, 15),
            "budgets wrong length": lambda: K.pk_search(q, k1, k2, 2, 15, torch.tensor([1])),
            "budgets negative": lambda: K.pk_search(q, k1, k2, 2, 15, torch.tensor([-5, 2**62])),
            "backward n2 == 0": lambda: K.pk_scores_backward(  # before: SIGFPE
                q, k1, torch.randn(1, 0, 2), torch.zeros(2, 1, 2, dtype=i64), torch.ones(2, 1, 2)
            ),
            "backward id past the grid": lambda: K.pk_scores_backward(
                q, k1, k2, torch.full((2, 1, 2), 15, dtype=i64), torch.ones(2, 1, 2)
            ),
            "backward ids 2-D": lambda: K.pk_scores_backward(
                q, k1, k2, torch.zeros(2, 2, dtype=i64), torch.ones(2, 2)
            ),
        }.items():
            case("kernels", f"pk: {label}")(fn)

    # -- the pool's public read / write / train path --
    opened: dict[str, object] = {}

    def pool(name: str, **kw):
        """The store ``name`` of this group, created on first use (a failed call must leave
        a store usable, so read and write cases share one)."""
        if name not in opened:
            opened[name] = dpsn.create(
                root / name,
                rows=1000,
                dim=8,
                seed=3,
                generator={"kind": "hashed_slices", "memory_size": 256},
                **kw,
            )
        return opened[name]

    for label, bad in {
        "-1": [-1],
        "past the rows": [1000],
        "2**62": [2**62],
        "-(2**63)": torch.tensor([-(2**63)]),
        "float NaN": torch.tensor([float("nan")]),
        "float": torch.tensor([1.5]),
        "bool": torch.tensor([True]),
        "empty": torch.empty(0, dtype=i64),
        "non-contiguous": torch.arange(20)[::3],
        "3-D": torch.zeros((2, 1, 2), dtype=i64),
        "int32": torch.tensor([1, 2], dtype=torch.int32),
        "a string": "12",
        "None": None,
    }.items():
        for cached in (False, True):
            p_kw = {"cache_rows": 64} if cached else {}
            case("pool", f"read({label}) cached={cached}")(
                lambda b=bad, k=p_kw, n=f"read{cached}": pool(n, **k).read(b)
            )
        case("pool", f"write({label})")(
            lambda b=bad: pool("write", cache_rows=64).write(b, torch.zeros(1, 8))
        )
    for label, deltas in {
        "NaN deltas": torch.full((2, 8), float("nan")),
        "wrong width": torch.zeros(2, 5),
        "float64": torch.zeros(2, 8, dtype=torch.float64),
        "non-contiguous": torch.zeros(8, 2).t(),
        "int": torch.zeros(2, 8, dtype=i64),
        "3 rows for 2 ids": torch.zeros(3, 8),
    }.items():
        case("pool", f"write: {label}")(
            lambda d=deltas: pool("write", cache_rows=64).write([1, 2], d)
        )

    class WiderAdam(RowAdam):  # before: the native Adam ran on a state it does not fill
        def state_width(self, dim: int) -> int:
            return dim + 4

    class NarrowAdam(RowAdam):  # before: the native Adam wrote past the state (exit 139)
        def state_width(self, dim: int) -> int:
            return 1

    class Liar(RowSGD):  # claims Adam's kernel with SGD's state
        native = 2

    class Adagrad5(RowAdagrad):  # a kind that is no kernel's
        native = 5

    def train_layer(optimizer, x=None, commit: bool = False) -> None:
        p = pool(f"layer{len(opened)}", cache_rows=128)
        router = ProductKeyRouter(d_in=4, num_rows=1000, k=4)
        layer = PoolLayer(p, 4, 4, router=router, row_optimizer=optimizer)
        x = torch.randn(6, 4) if x is None else x
        for _ in range(2):
            layer(x).square().sum().backward()
        if commit:
            p.commit("fuzz")

    for label, opt in {
        "RowAdam state_width + 2": WiderAdam(),
        "RowAdam state_width 1": NarrowAdam(),
        "RowSGD claiming Adam's loop": Liar(),
        "RowAdagrad claiming kind 5": Adagrad5(),
    }.items():
        case("train", f"PoolLayer: {label}")(lambda o=opt: train_layer(o, commit=True))
    for label, x in {
        "NaN input": torch.full((6, 4), float("nan")),
        "inf input": torch.full((6, 4), float("inf")),
        "non-contiguous input": torch.randn(4, 6).t(),
        "float64 input": torch.randn(6, 4, dtype=torch.float64),
        "no tokens": torch.randn(0, 4),
        "wrong width": torch.randn(6, 3),
    }.items():
        case("train", f"PoolLayer: {label}")(lambda x=x: train_layer("adam", x=x))

    class Duck:  # no RowOptimizer: the protocol alone, claiming Adam's loop with SGD's state
        native = 2

        def native_hyper(self):
            return (0.1, 1e-8, 0.9, 0.999)

        def state_width(self, dim: int) -> int:
            return 0

        def step(self, delta, grad, state):
            return delta - 0.1 * grad, state

    def step_batch(grads, optimizer=None, cached: bool = True, scale=None) -> None:
        p = pool(f"batch{len(opened)}", **({"cache_rows": 64} if cached else {}))
        optimizer = optimizer or RowAdam()
        p.set_state_width(optimizer.state_width(8))
        with p.page_in(torch.tensor([1, 5, 5, 9])) as batch:
            g = grads(len(batch)) if callable(grads) else grads
            s = scale(len(batch)) if callable(scale) else scale
            batch.apply_grads(g, optimizer, scale=s)

    for cached in (True, False):
        for label, grads in {
            "wrong shape": torch.ones(2, 8),
            "wrong width": lambda n: torch.ones(n, 3),
            "a list": [[0.0] * 8] * 3,
            "NaN": lambda n: torch.full((n, 8), float("nan")),
            "float64": lambda n: torch.ones(n, 8, dtype=torch.float64),
            "int": lambda n: torch.ones(n, 8, dtype=torch.int64),
            "non-contiguous": lambda n: torch.ones(8, n).t(),
        }.items():
            case("train", f"RowBatch.apply_grads: {label} grads, cached={cached}")(
                lambda g=grads, c=cached: step_batch(g, cached=c)
            )
        for label, sc in {
            "NaN": lambda n: torch.full((n,), float("nan")),
            "Inf": lambda n: torch.full((n,), float("inf")),
            "negative": lambda n: -torch.ones(n),
            "short": torch.ones(1),
            "2-D": lambda n: torch.ones(n, 1),
            "int": lambda n: torch.ones(n, dtype=torch.int64),
            "non-contiguous": lambda n: torch.ones(2 * n)[::2],
            "float64": lambda n: torch.full((n,), 0.5, dtype=torch.float64),
            "a list": [1.0, 1.0, 1.0],
        }.items():
            case("train", f"RowBatch.apply_grads: {label} scale, cached={cached}")(
                lambda s=sc, c=cached: step_batch(lambda n: torch.ones(n, 8), cached=c, scale=s)
            )
        odd = {"a duck claiming Adam's loop": Duck(), "RowAdam width 1": NarrowAdam()}
        for label, opt in odd.items():
            case("train", f"RowBatch.apply_grads: {label}, cached={cached}")(
                lambda o=opt, c=cached: step_batch(lambda n: torch.ones(n, 8), o, cached=c)
            )

    def embed(ids, offsets=None, optimizer="adagrad") -> None:
        p = pool(f"emb{len(opened)}", cache_rows=64)
        emb = PoolEmbedding(p, row_optimizer=optimizer)
        out = emb(ids, offsets)
        out.square().sum().backward()

    for label, ids in {
        "-1": torch.tensor([[1, -1]]),
        "past the rows": torch.tensor([[1, 1000]]),
        "huge": torch.tensor([[2**62]]),
        "float": torch.tensor([[1.0, 2.0]]),
        "int32": torch.tensor([[1, 2]], dtype=torch.int32),
        "empty": torch.empty((0, 2), dtype=i64),
        "non-contiguous": torch.arange(12).view(3, 4)[:, ::2],
        "3-D": torch.zeros((1, 2, 2), dtype=i64),
    }.items():
        case("train", f"PoolEmbedding({label})")(lambda i=ids: embed(i))
    case("train", "PoolEmbedding: offsets out of order")(
        lambda: embed(torch.tensor([1, 2, 3]), torch.tensor([2, 0]))
    )
    case("train", "PoolEmbedding: offsets past the ids")(
        lambda: embed(torch.tensor([1, 2, 3]), torch.tensor([0, 7]))
    )
    case("train", "PoolEmbedding: RowAdam state_width 1")(
        lambda: embed(torch.tensor([[1, 2]]), optimizer=NarrowAdam())
    )

    def route(x, **kw) -> None:
        router = ProductKeyRouter(d_in=4, num_rows=kw.pop("rows", 1000), k=kw.pop("k", 4), **kw)
        out = router(x)
        out.scores.sum().backward()

    for label, fn in {
        "NaN queries": lambda: route(torch.full((3, 4), float("nan"))),
        "no queries": lambda: route(torch.randn(0, 4)),
        "wrong width": lambda: route(torch.randn(3, 5)),
        "float64 queries": lambda: route(torch.randn(3, 4, dtype=torch.float64)),
        "non-contiguous": lambda: route(torch.randn(4, 3).t()),
        "k past the rows": lambda: route(torch.randn(3, 4), rows=5, k=8),
        "one row": lambda: route(torch.randn(3, 4), rows=1, k=1),
        "prime rows": lambda: route(torch.randn(3, 4), rows=997),
    }.items():
        case("router", f"ProductKeyRouter: {label}")(fn)
    return groups


def _run_group(cases: list[tuple[str, Callable[[], object]]], out: Path) -> None:
    """In a grandchild: run ``cases`` one after another, one JSON line each."""
    from dpsn.errors import DpsnError

    with open(out, "a") as f:
        for name, fn in cases:
            f.write(json.dumps({"case": name, "start": True}) + "\n")
            f.flush()
            try:
                fn()
                result = {"case": name, "outcome": "ok"}
            except Exception as e:  # the outcome is the point: classify it
                typed = isinstance(e, (DpsnError, ValueError, TypeError, IndexError, LookupError))
                result = {
                    "case": name,
                    "outcome": "typed" if typed else "untyped",
                    "error": f"{type(e).__name__}: {e}"[:300],
                    "trace": "" if typed else traceback.format_exc()[-1500:],
                }
            f.write(json.dumps(result) + "\n")
            f.flush()


def _main(root: Path) -> None:
    """The child: fork a grandchild per group, report each group's cases and how it ended."""
    import torch

    torch.set_num_threads(1)
    groups = _groups(root)
    report = {}
    for group, cases in groups.items():
        out = root / f"{group}.jsonl"
        pid = os.fork()
        if pid == 0:  # the grandchild
            code = 0
            try:
                _run_group(cases, out)
            except BaseException:
                traceback.print_exc()
                code = 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
        report[group] = {
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
            "results": [r for r in lines if "outcome" in r],
            "last_started": next((r["case"] for r in reversed(lines) if r.get("start")), None),
            "cases": len(cases),
        }
    print(json.dumps(report))


# ---- the test -------------------------------------------------------------------------------


@functools.cache
def _report(native: bool) -> dict:
    env = {**os.environ, "DPSN_NATIVE": "1" if native else "0"}
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, __file__, tmp],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_no_hostile_input_kills_the_process(native: bool) -> None:
    """Every case ends in success or a typed error, in a process that no signal killed; with
    ``DPSN_NATIVE=0`` (the PyTorch paths) the same holds."""
    report = _report(native)
    problems = []
    for group, r in report.items():
        if r["signal"] is not None:
            name = signal.Signals(r["signal"]).name
            problems.append(f"{group}: killed by {name} in case {r['last_started']!r}")
        elif r["exit"] != 0:
            problems.append(f"{group}: exit {r['exit']} after {r['last_started']!r}")
        elif len(r["results"]) != r["cases"]:
            problems.append(f"{group}: {len(r['results'])} of {r['cases']} cases reported")
        problems += [
            f"{group}: {x['case']}: {x['error']}\n{x['trace']}"
            for x in r["results"]
            if x["outcome"] == "untyped"
        ]
    assert not problems, "\n".join(problems)
    total = sum(r["cases"] for r in report.values())
    assert total >= (150 if native else 80), total  # the cases ran, not an empty table


def test_what_crashed_before_now_raises_or_misses() -> None:
    """The inputs that killed the process or went past a tensor before (issue 20): ``-1`` is
    a miss, the rest a typed error."""
    results = {x["case"]: x for r in _report(True).values() for x in r["results"]}
    for name in (
        "SlotTable.find(-1) is a miss",
        "SlotTable.find_gather(-1) gathers nothing",
        "DeviceCache.read_hits(-1)",
    ):
        assert results[name]["outcome"] == "ok", results[name]
    typed = [
        "PoolLayer: RowAdam state_width + 2",  # the PyTorch path: its step does not fit
        "PoolLayer: RowAdam state_width 1",
        "PoolEmbedding: RowAdam state_width 1",
    ]
    if "pk: n2 == 0" in results:  # the kernels group runs where the extension was built
        typed += [
            f"{f}: {what}"
            for f in ("apply_rows", "step_rows", "step_rows_tracked", "apply_rows_tracked")
            for what in ("adagrad without state", "unknown kind 7", "adam with adagrad's state")
        ]
        typed += ["pk: n2 == 0", "pk: backward n2 == 0", "cuckoo_find: bits 0"]
        typed += ["cuckoo_find: bits vs half", "peer_forward: d_in past dim"]
        typed += [
            "find_gather_in: not a checked table",
            "find_gather_in: entries resized since checked",
            "cuckoo_find_in: entries re-pointed since checked",
        ]
    for name in typed:
        assert results[name]["outcome"] == "typed", results[name]


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
