"""A byte-level transformer language model whose feed-forward blocks are dpsn ``PoolLayer``s.

    python examples/lm.py                          # pool FFN blocks, 300 steps, a few minutes
    python examples/lm.py --dense                  # the same model with dense FFN blocks
    python examples/lm.py --steps 1000 --store runs/lm --checkpoint-every 100
    python examples/lm.py --store runs/lm --resume --steps 1500   # go on from the checkpoint

Data (``--text``): ``pydoc``, CPython's own ``pydoc_data/topics.py`` (the text of ``help()``,
~750 KB of English prose with code examples), or ``code``, the source of a few pure-Python
stdlib modules (Python code, another kind of text); both are on every machine with Python.
Each is cut into train (bytes 0-70%), test (70-80%: reported, never looked at while tuning)
and validation (80-100%: what any setting may be tuned on; see :class:`Splits`). The script prints
validation and test bits per byte (mean cross-entropy in bits per held-out byte).

Model: pre-LayerNorm GPT (causal self-attention, learned positions, tied byte embeddings).
Each feed-forward block is a ``PoolLayer`` over its own pool (``--rows`` rows, ``--k`` active
per token; a pool per layer keeps their rows disjoint), optionally beside a small dense FFN
of width ``--d-ff`` (``--d-ff 0``: none), or with ``--dense`` an ordinary FFN of width
``--d-ff``.

Checkpoints (``--checkpoint-every``, and at the end) commit each pool atomically (rows, their
optimizer state, the router) and save the dense weights and optimizer beside them in
``STORE/dense.pt``; ``dpsn info STORE/layer0`` shows a pool, ``dpsn.open(...).log()`` its
commits. Runs are deterministic for a seed and thread count (``--threads``, default 1: on a
shared or small machine one thread per process is the fastest and the only reproducible
choice for torch's CPU kernels).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dpsn
from dpsn.index import ProductKeyRouter

VOCAB = 256


@dataclass
class LMConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context: int = 128
    batch: int = 8
    ffn: str = "pool"  # "pool" or "dense"
    d_ff: int = 0  # dense FFN width ("dense"), or of the small dense FFN beside a pool (0: none)
    k: int = 32  # active rows per token
    rows: int = 32_000  # rows per pool (one pool per layer)
    router_heads: int = 1
    d_key: int = 32  # product-key width (query and sub-keys)
    # Batch norm on the query (PKM section 3.3): without it the router collapses onto a few
    # hundred rows within 20 steps; with it ~60% of the rows are in use after 300 steps.
    query_batchnorm: bool = True
    row_optimizer: str = "adagrad"
    row_lr: float = 0.025
    generator_memory: int = 1 << 20  # floats in the hashed-slices array behind the base rows
    # The base rows' generator: "hashed_slices" (frozen) or "region_mlp" (its region embeddings
    # and MLP trained with the model: train_generator), see docs/generators.md.
    generator: str = "hashed_slices"
    generator_options: dict = field(default_factory=dict)  # e.g. {"hidden": 64} for region_mlp
    train_generator: bool = False
    # The per-token budget: "fixed" k, or "learned" in [k_min, k] with budget_cost nats of loss
    # per row per token (the learned head's compute penalty; index/_budget.py).
    budget: str = "auto"
    k_min: int | None = None
    budget_cost: float = 0.0
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def rows_per_step(self) -> int:
        return self.batch * self.context * self.k


# -- data ---------------------------------------------------------------------------------------


# The second text: pure-Python stdlib modules (code, not prose), in a fixed order.
CODE_MODULES = ("_pydecimal", "argparse", "typing", "inspect", "dataclasses")
TEXTS = ("pydoc", "code")


@dataclass(frozen=True)
class Splits:
    """A text's bytes cut in three: ``train`` (bytes 0-70%), ``test`` (70-80%: for reporting
    only) and ``val`` (80-100%: for tuning).

    Why this order: earlier versions of bench/quality.py chose their settings on the last 10%
    of pydoc's text, and ``--tune`` runs on bytes 80-90%; the test split is the one part that
    no setting was ever chosen on (it was only ever trained on)."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def load_splits(text: str = "pydoc") -> Splits:
    """The bytes of ``text`` (see the module docstring) as :class:`Splits`."""
    import importlib

    if text == "pydoc":
        import pydoc_data.topics

        raw = Path(pydoc_data.topics.__file__).read_bytes()
    elif text == "code":
        files = [importlib.import_module(m).__file__ for m in CODE_MODULES]
        raw = b"".join(Path(f).read_bytes() for f in files if f)
    else:
        raise ValueError(f"unknown text {text!r}; choose one of {TEXTS}")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    a, b = int(len(data) * 0.7), int(len(data) * 0.8)
    return Splits(text, train=data[:a], val=data[b:], test=data[a:b])


def load_text() -> tuple[torch.Tensor, torch.Tensor]:
    """``pydoc``'s (train, validation) bytes."""
    s = load_splits("pydoc")
    return s.train, s.val


def get_batch(
    data: torch.Tensor, batch: int, context: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx]
    return chunk[:, :-1], chunk[:, 1:]


def val_windows(data: torch.Tensor, context: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[n, context + 1]`` windows of the held-out bytes (evenly spaced
    ``limit`` of them when given: a cheaper, fixed subset for curves)."""
    n = (len(data) - 1) // context
    starts = torch.arange(n) * context
    if limit is not None and limit < n:
        starts = starts[torch.linspace(0, n - 1, limit).long()]
    return data[starts[:, None] + torch.arange(context + 1)]


# -- model --------------------------------------------------------------------------------------


class DenseFFN(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class PoolFFN(nn.Module):
    """A ``PoolLayer`` (``k`` of ``rows`` single-neuron experts per token), plus an optional
    small dense FFN on the same input, summed."""

    def __init__(self, layer: dpsn.PoolLayer, dense: DenseFFN | None) -> None:
        super().__init__()
        self.pool_layer = layer
        self.dense = dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool_layer(x)
        return y if self.dense is None else y + self.dense(x)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, ffn: nn.Module) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ffn(self.ln2(x))


class ByteLM(nn.Module):
    def __init__(self, cfg: LMConfig, ffns: Sequence[nn.Module]) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg, f) for f in ffns)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.embed.weight.T  # tied output head

    def pool_layers(self) -> list[dpsn.PoolLayer]:
        return [m for m in self.modules() if isinstance(m, dpsn.PoolLayer)]


def pool_path(store: Path, i: int) -> Path:
    return store / f"layer{i}"


def build_model(cfg: LMConfig, store: Path | None, *, resume: bool = False) -> ByteLM:
    """The model; for ``ffn="pool"`` one pool per layer under ``store`` (created, or opened
    for writing with ``resume``)."""
    torch.manual_seed(cfg.seed)
    d = cfg.d_model
    ffns: list[nn.Module] = []
    for i in range(cfg.n_layers):
        if cfg.ffn == "dense":
            ffns.append(DenseFFN(d, cfg.d_ff))
            continue
        if store is None:
            raise ValueError("pool FFN blocks need a store directory")
        # Distinct rows of one forward are at most batch * context * k; keep 2x that (at most
        # the whole pool) so a step never evicts rows it is still using.
        cache_rows = min(cfg.rows, 2 * cfg.rows_per_step())
        if resume:
            pool = dpsn.open(pool_path(store, i), mode="r+", cache_rows=cache_rows)
            router = pool.load_router("router")
        else:
            pool = dpsn.create(
                pool_path(store, i),
                rows=cfg.rows,
                dim=2 * d,
                seed=cfg.seed * 1000 + i,
                generator=(
                    {"kind": "hashed_slices", "memory_size": cfg.generator_memory}
                    if cfg.generator == "hashed_slices"
                    else {"kind": cfg.generator, **cfg.generator_options}
                ),
                cache_rows=cache_rows,
            )
            router = ProductKeyRouter(
                d_in=d,
                num_rows=cfg.rows,
                k=cfg.k,
                heads=cfg.router_heads,
                d_key=cfg.d_key,
                query_batchnorm=cfg.query_batchnorm,
                seed=cfg.seed * 1000 + i,
                k_min=cfg.k_min,
                budget=cfg.budget,
                budget_cost=cfg.budget_cost,
            )
        layer = dpsn.PoolLayer(
            pool,
            d,
            d,
            router=router,
            k=cfg.k,
            row_optimizer=cfg.row_optimizer,
            row_lr=cfg.row_lr,
            train_generator=cfg.train_generator,
        )
        ffns.append(PoolFFN(layer, DenseFFN(d, cfg.d_ff) if cfg.d_ff else None))
    return ByteLM(cfg, ffns)


def macs_per_token(cfg: LMConfig) -> dict[str, int]:
    """Multiply-adds per token of one forward, by part (the router counted on its own).

    FFN: a dense FFN of width h costs ``h * 2d``; each active pool row costs ``2d`` (``x . u``
    and ``act * v``), so ``k`` rows cost ``k * 2d``. Router: query ``d * H * d_key``, sub-key
    scores ``H * (n1 + n2) * d_key / 2``, the k*k candidate sums ``H * k * k`` and the
    differentiable re-scoring of the chosen rows ``H * k * d_key``. Attention: QKV and output
    projections ``4 d^2`` and scores/values ``2 * context * d`` (causal: half of it, on average).
    """
    d, n = cfg.d_model, cfg.n_layers
    attn = n * (4 * d * d + cfg.context * d)
    head = VOCAB * d
    out = {"attention": attn, "output_head": head, "ffn_dense": n * cfg.d_ff * 2 * d}
    if cfg.ffn == "pool":
        side = math.isqrt(cfg.rows - 1) + 1
        h = cfg.router_heads
        router = (
            d * h * cfg.d_key
            + h * 2 * side * cfg.d_key // 2
            + h * cfg.k * cfg.k
            + h * cfg.k * cfg.d_key
        )
        out["ffn_pool_rows"] = n * cfg.k * 2 * d
        out["router"] = n * router
    out["total"] = sum(out.values())
    return out


def active_params_per_token(cfg: LMConfig) -> int:
    """FFN parameters one token touches (the pool's rows; the router's query and sub-keys
    not counted)."""
    width = cfg.d_ff + (cfg.k if cfg.ffn == "pool" else 0)
    return cfg.n_layers * width * 2 * cfg.d_model


# -- training -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: ByteLM, windows: torch.Tensor, batch: int) -> float:
    """Bits per byte of ``windows [n, context + 1]`` (mean over every predicted byte)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, VOCAB), w[:, 1:].reshape(-1), reduction="sum")
        count += w[:, 1:].numel()
    model.train(was_training)
    return float(total) / count / math.log(2)


@dataclass
class Curves:
    """Loss curves; ``seconds`` counts training time only (evaluation excluded)."""

    train_step: list[int] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    train_bpb: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_seconds: list[float] = field(default_factory=list)
    val_bpb: list[float] = field(default_factory=list)


def lr_at(cfg: LMConfig, step: int, progress: float) -> float:
    """Linear warmup over ``cfg.warmup`` steps, then cosine decay to 10% as ``progress`` (the
    fraction of the step or time budget spent) goes from 0 to 1."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, max(0.0, progress))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def save_checkpoint(
    model: ByteLM, opt: torch.optim.Optimizer, store: Path, step: int, message: str
) -> None:
    """Commit every pool (rows, row optimizer state, router: each atomic) and write the dense
    weights and optimizer to ``store/dense.pt`` (atomically, by rename)."""
    for layer in model.pool_layers():
        layer.commit(message)
    store.mkdir(parents=True, exist_ok=True)
    tmp = store / "dense.pt.tmp"
    torch.save(
        {
            "step": step,
            "config": asdict(model.cfg),
            "model": model.state_dict(),
            "opt": opt.state_dict(),
        },
        tmp,
    )
    tmp.replace(store / "dense.pt")


def train(
    cfg: LMConfig,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    store: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 0,
    eval_every: int = 50,
    eval_windows: int = 64,
    final_windows: int | None = None,
    progress: bool = True,
    desc: str = "",
    text: str = "pydoc",
    profile_steps: int = 0,
    clock: str = "wall",
    inspect: Callable[[ByteLM, Splits], Any] | None = None,
) -> dict[str, Any]:
    """Train for ``steps`` steps or ``seconds`` of training time (whichever comes first; the
    learning rate decays over that budget).

    Training time is counted by ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"``
    (the process's CPU time, ``time.process_time``: on a machine shared with other work it is
    what the step cost, without the time other processes held the cores; on an idle machine
    with one thread the two agree). Both are measured and returned either way.

    Validation bits/byte is measured on a fixed subset of ``eval_windows`` validation windows
    every ``eval_every`` steps (evaluation time is not counted as training time), and at the
    end on ``final_windows`` evenly spaced windows (default: all) of the validation and of the
    test split. ``profile_steps`` more steps after training are run under ``torch.profiler``
    (not counted either) and their parts are returned as ``"profile"``.
    ``inspect(model, splits)``, if given, runs on the trained model before its pools close;
    what it returns is ``"inspect"``.
    """
    from tqdm import tqdm

    if steps is None and seconds is None:
        raise ValueError("give steps, seconds or both")
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    splits = load_splits(text)
    train_data, val_data = splits.train, splits.val
    model = build_model(cfg, store, resume=resume)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume:
        assert store is not None
        state = torch.load(store / "dense.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    subset = val_windows(val_data, cfg.context, eval_windows)
    eval_batch = cfg.batch  # same tokens per forward as training: the cache is sized for it
    curves = Curves()
    g = torch.Generator()
    tokens_per_step = cfg.batch * cfg.context
    elapsed = 0.0  # training time by `clock`
    wall = cpu = 0.0
    step = start
    bar = tqdm(total=steps, initial=start, desc=desc or cfg.ffn, disable=not progress, unit="step")

    def budget_spent(step: int, elapsed: float) -> float:
        return max(step / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)

    def validate() -> None:
        curves.val_step.append(step)
        curves.val_seconds.append(elapsed)
        curves.val_bpb.append(evaluate(model, subset, eval_batch))

    model.train()
    while (steps is None or step < steps) and (seconds is None or elapsed < seconds):
        if step % eval_every == 0:
            validate()
        g.manual_seed(cfg.seed * 1_000_003 + step)  # batch of step s is fixed: exact resume
        x, y = get_batch(train_data, cfg.batch, cfg.context, g)
        t0, c0 = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, budget_spent(step, elapsed))
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # pool rows are updated here, by each layer's row optimizer
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        wall += dt
        cpu += dc
        elapsed += dt if clock == "wall" else dc
        step += 1
        bpb = loss.item() / math.log(2)
        curves.train_step.append(step)
        curves.train_seconds.append(elapsed)
        curves.train_bpb.append(bpb)
        bar.update(1)
        bar.set_postfix(loss=f"{bpb:.3f} bpb", tok_s=f"{tokens_per_step / dt:,.0f}")
        if store is not None and checkpoint_every and step % checkpoint_every == 0:
            save_checkpoint(model, opt, store, step, f"step {step}, train {bpb:.4f} bpb")
    bar.close()
    validate()
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "steps": step,
        "clock": clock,
        "train_seconds": elapsed,
        "train_wall_seconds": wall,
        "train_cpu_seconds": cpu,
        "tokens_per_s": (step - start) * tokens_per_step / elapsed if elapsed else float("nan"),
        "tokens_per_wall_s": (step - start) * tokens_per_step / wall if wall else float("nan"),
        "tokens_per_cpu_s": (step - start) * tokens_per_step / cpu if cpu else float("nan"),
        "macs_per_token": macs_per_token(cfg),
        "active_ffn_params_per_token": active_params_per_token(cfg),
        "curves": asdict(curves),
        "val_bpb_subset": curves.val_bpb[-1],
    }
    if profile_steps:
        result["profile"] = profile(model, opt, cfg, train_data, g, step, profile_steps, clock)
    t0 = time.perf_counter()
    final = val_windows(val_data, cfg.context, final_windows)
    result["val_bpb"] = evaluate(model, final, eval_batch)
    result["val_bytes"] = final[:, 1:].numel()
    test = val_windows(splits.test, cfg.context, final_windows)
    result["test_bpb"] = evaluate(model, test, eval_batch)
    result["test_bytes"] = test[:, 1:].numel()
    result["text"] = text
    result["eval_seconds"] = time.perf_counter() - t0
    if inspect is not None:
        result["inspect"] = inspect(model, splits)
    layers = model.pool_layers()
    if layers:
        result["pool_params"] = sum(layer.pool.rows * layer.pool.dim for layer in layers)
        result["router_usage"] = [layer.router.usage() for layer in layers]
    if store is not None:
        save_checkpoint(model, opt, store, step, f"final: step {step}")
        result["store"] = str(store)
    for layer in layers:
        if store is not None:
            result.setdefault("rows_trained", []).append(layer.pool.info()["persisted_rows"])
        layer.pool.close()
    return result


def profile(
    model: ByteLM,
    opt: torch.optim.Optimizer,
    cfg: LMConfig,
    data: torch.Tensor,
    g: torch.Generator,
    step: int,
    steps: int,
    clock: str = "wall",
) -> dict[str, float]:
    """Milliseconds per training step spent in each part dpsn names (``dpsn.pool.STEP_SCOPES``:
    routing, paging rows in, the executor forward and backward, the row optimizer), and the
    rest (attention, the dense layers, the dense optimizer, autograd), over ``steps`` steps
    timed by ``clock`` (see :func:`train`; ``dpsn.pool.step_timing``)."""
    from dpsn.pool import STEP_SCOPES as SCOPES
    from dpsn.pool import step_timing as timing

    def one(i: int) -> None:
        g.manual_seed(cfg.seed * 1_000_003 + step + i)
        x, y = get_batch(data, cfg.batch, cfg.context, g)
        loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    now = time.perf_counter if clock == "wall" else time.process_time
    one(0)  # warm
    with timing(now) as seconds:
        t0 = now()
        for i in range(steps):
            one(i + 1)
        total = now() - t0
    parts = {k: seconds.get(k, 0.0) * 1e3 / steps for k in SCOPES}
    parts["other"] = max(total * 1e3 / steps - sum(parts.values()), 0.0)
    parts["total"] = total * 1e3 / steps
    return parts


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    c = LMConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dense", action="store_true", help="dense FFN blocks of width --d-ff")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--store", type=Path, default=None, help="checkpoint dir (default: temp)")
    ap.add_argument("--resume", action="store_true", help="go on from the checkpoint in --store")
    ap.add_argument("--checkpoint-every", type=int, default=100, help="steps; 0: only at the end")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows per eval")
    ap.add_argument("--val-windows", type=int, default=None, help="final eval (default: all)")
    ap.add_argument("--d-model", type=int, default=c.d_model)
    ap.add_argument("--layers", type=int, default=c.n_layers)
    ap.add_argument("--heads", type=int, default=c.n_heads, help="attention heads")
    ap.add_argument("--context", type=int, default=c.context)
    ap.add_argument("--batch", type=int, default=c.batch)
    ap.add_argument(
        "--d-ff",
        type=int,
        default=None,
        help="dense FFN width (default: 0 beside a pool, k with --dense)",
    )
    ap.add_argument("--k", type=int, default=c.k, help="active pool rows per token")
    ap.add_argument("--rows", type=int, default=c.rows, help="rows per pool (one pool a layer)")
    ap.add_argument("--router-heads", type=int, default=c.router_heads)
    ap.add_argument(
        "--query-batchnorm", action=argparse.BooleanOptionalAction, default=c.query_batchnorm
    )
    ap.add_argument("--row-optimizer", default=c.row_optimizer, choices=["adam", "adagrad", "sgd"])
    ap.add_argument("--row-lr", type=float, default=c.row_lr)
    ap.add_argument("--lr", type=float, default=c.lr)
    ap.add_argument("--seed", type=int, default=c.seed)
    ap.add_argument("--text", default="pydoc", choices=TEXTS, help="training text")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ffn = "dense" if args.dense else "pool"
    d_ff = args.d_ff if args.d_ff is not None else (args.k if args.dense else 0)
    cfg = LMConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        context=args.context,
        batch=args.batch,
        ffn=ffn,
        d_ff=d_ff,
        k=args.k,
        rows=args.rows,
        router_heads=args.router_heads,
        query_batchnorm=args.query_batchnorm,
        row_optimizer=args.row_optimizer,
        row_lr=args.row_lr,
        lr=args.lr,
        seed=args.seed,
    )
    tmp = None
    store = args.store
    if store is None:
        tmp = Path(tempfile.mkdtemp(prefix="dpsn-lm-"))
        store = tmp / "store"
    try:
        result = train(
            cfg,
            steps=args.steps,
            store=store,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every,
            eval_windows=args.eval_windows,
            final_windows=args.val_windows,
            progress=not args.no_progress,
            text=args.text,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    macs = result["macs_per_token"]
    print(
        f"{ffn} FFN: {result['steps']} steps, {result['tokens_per_s']:,.0f} tokens/s, "
        f"validation {result['val_bpb']:.4f} / test {result['test_bpb']:.4f} bits/byte; "
        f"{macs['total']:,} multiply-adds/token"
    )
    if args.store is not None:
        print(f"checkpoint: {args.store} (pools in {args.store}/layer*, dense part in dense.pt)")
    return result


if __name__ == "__main__":
    main()
