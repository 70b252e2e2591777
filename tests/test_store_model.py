"""A Hypothesis state machine drives a real store and checks it against a trivially correct
model: a dict of row id -> delta for what is committed, and one for what is staged."""

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import dpsn

ROWS, DIM = 64, 4
ids_st = st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=12)
small_float = st.floats(-8, 8, allow_nan=False, width=32)


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="dpsn-model-"))
        self.pool = dpsn.create(
            self.dir / "s",
            rows=ROWS,
            dim=DIM,
            chunk_rows=4,
            generator={"kind": "hashed_slices", "memory_size": 256},
        )
        self.committed: dict[int, torch.Tensor] = {}
        self.staged: dict[int, torch.Tensor | None] = {}  # None: staged drop
        self.snapshots: dict[str, dict[int, torch.Tensor]] = {}

    def view(self) -> dict[int, torch.Tensor]:
        out = dict(self.committed)
        for i, d in self.staged.items():
            if d is None:
                out.pop(i, None)
            else:
                out[i] = d
        return out

    @rule(ids=ids_st, value=small_float)
    def write(self, ids, value):
        d = torch.full((len(ids), DIM), value) + torch.arange(len(ids))[:, None].float()
        self.pool.write(ids, d)
        for i, row in zip(ids, d, strict=True):
            self.staged[i] = row.clone()

    @rule(ids=ids_st, value=small_float)
    def add(self, ids, value):
        current = self.view()
        self.pool.write(ids, torch.full((len(ids), DIM), value), add=True)
        for i in ids:
            base = self.staged.get(i) if i in self.staged else current.get(i)
            if i in self.staged and self.staged[i] is None:
                base = None
            self.staged[i] = (base if base is not None else torch.zeros(DIM)) + value

    @rule(ids=ids_st)
    def drop(self, ids):
        self.pool.drop(ids)
        for i in ids:
            self.staged[i] = None

    @rule()
    def commit(self):
        self.pool.commit()
        self.committed = self.view()
        self.staged = {}

    @rule()
    def discard(self):
        self.pool.discard()
        self.staged = {}

    @rule()
    def reopen(self):
        self.pool.close()
        self.pool = dpsn.open(self.dir / "s", mode="r+")
        self.staged = {}

    @precondition(lambda self: len(self.snapshots) < 3)
    @rule()
    def snapshot(self):
        name = f"s{len(self.snapshots)}"
        self.pool.snapshot(name)
        self.snapshots[name] = dict(self.committed)

    @rule()
    def gc(self):
        self.pool.gc()

    @invariant()
    def reads_match_the_model(self):
        expected = torch.zeros(ROWS, DIM)
        for i, d in self.view().items():
            expected[i] = d
        assert torch.allclose(self.pool.delta(torch.arange(ROWS)), expected, atol=1e-5)
        assert torch.allclose(
            self.pool.read(torch.arange(ROWS)),
            self.pool.base(torch.arange(ROWS)) + expected,
            atol=1e-5,
        )

    def teardown(self):
        for name, state in self.snapshots.items():
            with dpsn.open(self.dir / "s", at=name) as snap:
                expected = torch.zeros(ROWS, DIM)
                for i, d in state.items():
                    expected[i] = d
                assert torch.allclose(snap.delta(torch.arange(ROWS)), expected, atol=1e-5)
        assert self.pool.verify().ok
        self.pool.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreModel = StoreModel.TestCase
