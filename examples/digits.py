"""Digits: a small MLP whose hidden block is a dpsn ``PoolLayer``, beside the same MLP with a
dense hidden block, on scikit-learn's bundled 8x8 digits (1797 images, no download).

    python examples/digits.py                      # both models, ~10 s
    python examples/digits.py --model pool --steps 500 --store /tmp/digits-store

Model: ``x (64) -> Linear(64, width) -> GELU -> x + block(LayerNorm(x)) -> Linear(width, 10)``.
The block is either a ``PoolLayer`` over a pool of ``--rows`` rows (10**6 by default), ``--k``
of them active per input, or a dense ``Linear -> GELU -> Linear`` of hidden width ``k``: the
same active parameters and multiply-adds per input in the block (plus the router's query and
sub-key scores on the pool side). The data is split 75/25 with a fixed seed; the script prints
test accuracy and commits the pool (rows, their optimizer state and the router) at the end.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dpsn
from dpsn.index import ProductKeyRouter


@dataclass
class DigitsConfig:
    width: int = 64
    k: int = 16  # active rows per input (pool) = hidden width of the dense block
    rows: int = 10**6
    steps: int = 300
    batch: int = 128
    lr: float = 3e-3
    row_optimizer: str = "adam"
    row_lr: float = 1e-2
    query_batchnorm: bool = False
    seed: int = 0


def load_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """75/25 stratified split of the digits, features scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)

    def tensors(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.as_tensor(a, dtype=torch.float32) / 16.0, torch.as_tensor(b)

    return *tensors(x_tr, y_tr), *tensors(x_te, y_te)


class DenseBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class MLP(nn.Module):
    def __init__(self, width: int, block: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.norm = nn.LayerNorm(width)
        self.block = block
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x))
        h = h + self.block(self.norm(h))
        return self.out(h)


def build(cfg: DigitsConfig, kind: str, store: Path | None) -> tuple[MLP, dpsn.PoolLayer | None]:
    """The MLP with a ``"pool"`` or ``"dense"`` hidden block; a pool store is created at
    ``store``."""
    torch.manual_seed(cfg.seed)
    if kind == "dense":
        return MLP(cfg.width, DenseBlock(cfg.width, cfg.k)), None
    if store is None:
        raise ValueError("a pool model needs a store directory")
    pool = dpsn.create(
        store,
        rows=cfg.rows,
        dim=2 * cfg.width,
        seed=cfg.seed,
        # a small shared array is plenty for the procedural base of 10**6 rows of 128 floats
        generator={"kind": "hashed_slices", "memory_size": 1 << 16},
        cache_rows=4 * cfg.batch * cfg.k,  # >= the distinct rows of one batch (batch * k)
    )
    router = ProductKeyRouter(
        d_in=cfg.width,
        num_rows=cfg.rows,
        k=cfg.k,
        query_batchnorm=cfg.query_batchnorm,
        seed=cfg.seed,
    )
    layer = dpsn.PoolLayer(
        pool,
        cfg.width,
        cfg.width,
        router=router,
        k=cfg.k,
        row_optimizer=cfg.row_optimizer,
        row_lr=cfg.row_lr,
    )
    return MLP(cfg.width, layer), layer


def train_and_test(cfg: DigitsConfig, kind: str, store: Path | None) -> dict[str, Any]:
    """Train one model; return its final train loss, test accuracy, seconds and losses."""
    x_tr, y_tr, x_te, y_te = load_split(cfg.seed)
    model, layer = build(cfg, kind, store)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x_tr), (cfg.batch,), generator=g)
        loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # a PoolLayer's rows are updated here, inside backward
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        accuracy = sum(
            (model(x_te[i : i + cfg.batch]).argmax(-1) == y_te[i : i + cfg.batch]).sum().item()
            for i in range(0, len(x_te), cfg.batch)
        ) / len(x_te)
    out: dict[str, Any] = {
        "model": kind,
        "test_accuracy": accuracy,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_seconds": seconds,
        "losses": losses,
    }
    if layer is not None:
        commit = layer.commit(f"digits: {cfg.steps} steps, test accuracy {accuracy:.4f}")
        out["commit"] = commit.id
        out["rows_trained"] = int(layer.pool.info().get("persisted_rows", 0))
        layer.pool.close()
    return out


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", choices=["pool", "dense", "both"], default="both")
    ap.add_argument("--steps", type=int, default=DigitsConfig.steps)
    ap.add_argument("--k", type=int, default=DigitsConfig.k, help="active rows = dense width")
    ap.add_argument("--rows", type=int, default=DigitsConfig.rows)
    ap.add_argument(
        "--row-optimizer", default=DigitsConfig.row_optimizer, choices=["adam", "adagrad", "sgd"]
    )
    ap.add_argument("--row-lr", type=float, default=DigitsConfig.row_lr)
    ap.add_argument("--query-batchnorm", action="store_true", help="batch norm on the query")
    ap.add_argument("--seed", type=int, default=DigitsConfig.seed)
    ap.add_argument("--store", type=Path, default=None, help="pool store (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (see examples/lm.py)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DigitsConfig(
        k=args.k,
        rows=args.rows,
        steps=args.steps,
        row_optimizer=args.row_optimizer,
        row_lr=args.row_lr,
        query_batchnorm=args.query_batchnorm,
        seed=args.seed,
    )
    kinds = ["dense", "pool"] if args.model == "both" else [args.model]
    tmp = None
    store = args.store
    if store is None and "pool" in kinds:
        tmp = Path(tempfile.mkdtemp(prefix="dpsn-digits-"))
        store = tmp / "store"
    try:
        results = [train_and_test(cfg, kind, store if kind == "pool" else None) for kind in kinds]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        extra = f", pool committed as commit {r['commit']}" if "commit" in r else ""
        print(
            f"{r['model']:>5}: test accuracy {r['test_accuracy']:.4f}, "
            f"train loss {r['final_train_loss']:.4f}, {r['train_seconds']:.1f} s{extra}"
        )
    if args.store is not None and "pool" in kinds:
        print(f"store: {args.store} (inspect with `dpsn info {args.store}`)")
    return results


if __name__ == "__main__":
    main()
