"""``dpsn demo``: the whole life of a store in a few seconds, on the CPU.

A pool of 10**9 virtual rows learns a small task: 2048 "concept" rows are pulled toward target
vectors by gradient steps on their deltas (the rest of the pool stays procedural and costs
nothing). Checkpoints are commits; then the store is reopened read-only, inspected, verified.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROWS, DIM, CONCEPTS, BATCH, LR = 10**9, 64, 2048, 256, 0.3
DEMO_SEED = 1234


def _is_demo_store(path: Path) -> bool:
    """Whether ``path`` holds a store this demo made (its shape, seed and commit messages), so
    that running the demo again replaces its own output and nothing else."""
    from dpsn.errors import DpsnError
    from dpsn.store import StoreFacts

    try:
        with StoreFacts(path) as facts:
            info = facts.info()
            messages = {c["message"] for c in facts.log()}
    except (DpsnError, OSError):
        return False
    ours = {"final"} | {m for m in messages if m.startswith("checkpoint at step ")}
    return (
        (info["rows"], info["dim"], info["seed"]) == (ROWS, DIM, DEMO_SEED)
        and "final" in messages
        and messages - {""} <= ours | {"create"}
    )


def run_demo(directory: str, *, steps: int, force: bool, as_json: bool) -> int:
    """Run ``dpsn demo`` into ``directory``: create a store, train ``steps`` steps with
    checkpoints, reopen it read-only, inspect and verify it. Refuses a non-empty directory that
    an earlier demo did not make unless ``force``; ``as_json`` prints the result as JSON (the
    narration then goes to stderr). Returns the process exit status."""
    import dpsn
    from dpsn.errors import StoreExistsError
    from dpsn.store import read_manifest

    from ._format import fields, human_bytes, human_count, table

    out = sys.stderr if as_json else sys.stdout
    if steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")

    def say(text: str) -> None:
        print(text, file=out)

    path = Path(directory)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not (force or _is_demo_store(path)):
            raise StoreExistsError(
                f"{path} exists and is not a store an earlier `dpsn demo` made; pass --force "
                "to replace a dpsn store there, or give another DIR"
            )
        read_manifest(path)  # only ever delete something that is a dpsn store
        say(f"== replacing the store an earlier run left at {path}")
        shutil.rmtree(path)

    say(f"== creating {path}: {human_count(ROWS)} rows x {DIM}, hashed-slices generator")
    g = torch.Generator().manual_seed(0)
    concepts = torch.randint(0, ROWS, (CONCEPTS,), generator=g)
    targets = torch.randn(CONCEPTS, DIM, generator=g)
    # A Zipf-ish usage: a few concepts are seen far more often than the rest.
    weights = 1.0 / torch.arange(1, CONCEPTS + 1, dtype=torch.float64) ** 1.1
    losses = []
    from tqdm import tqdm

    with dpsn.create(path, rows=ROWS, dim=DIM, seed=DEMO_SEED) as pool:
        before = float(((pool.read(concepts) - targets) ** 2).mean())
        bar = tqdm(range(steps), desc="train", file=sys.stderr, disable=None, leave=False)
        for step in bar:
            pick = torch.unique(torch.multinomial(weights, BATCH, replacement=True, generator=g))
            ids = concepts[pick]
            rows = pool.read(ids).requires_grad_()
            loss = ((rows - targets[pick]) ** 2).sum(dim=1).mean()
            loss.backward()
            # Plain SGD on the rows' deltas: each step moves a row LR of the way to its target.
            pool.write(ids, -(LR * len(ids) / 2) * rows.grad, add=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if (step + 1) % max(1, steps // 4) == 0:
                pool.commit(f"checkpoint at step {step + 1}")
        pool.commit("final")
        pool.snapshot("trained")
        after = float(((pool.read(concepts) - targets) ** 2).mean())
    say(f"== trained {steps} steps: mean squared error on the concepts {before:.4f} -> {after:.4f}")

    with dpsn.open(path) as pool:
        info = pool.info()
        log = pool.log()
        sample = [*concepts[:3].tolist(), int(ROWS - 1)]
        deltas = pool.delta(sample).norm(dim=1).tolist()
        bases = pool.base(sample).norm(dim=1).tolist()
        last = pool.row_commits(sample).tolist()
        report = pool.verify()
    say("== reopened read-only")
    say(
        fields(
            [
                ("virtual parameters", human_count(info["virtual_parameters"])),
                ("persisted rows", info["persisted_rows"]),
                ("commits", info["commits"]),
                ("on disk", human_bytes(info["bytes_on_disk"])),
                ("ratio (raw / stored)", info["compression_ratio"]),
                ("verify", "ok" if report.ok else "; ".join(report.problems)),
            ]
        )
    )
    say(
        table(
            ["row", "base_norm", "delta_norm", "last_commit"],
            [
                (r, b, d, c or "procedural")
                for r, b, d, c in zip(sample, bases, deltas, last, strict=True)
            ],
        )
    )
    say(f"try: dpsn info {path}; dpsn log {path}; dpsn inspect {path} {sample[0]}")
    if as_json:
        json.dump(
            {
                "info": info,
                "loss_before": before,
                "loss_after": after,
                "commits": [c.to_json() for c in log],
                "verify": report.to_json(),
            },
            sys.stdout,
            indent=2,
            default=str,
        )
        print()
    if not report.ok:
        print(
            f"dpsn demo: error: verify found damage: {'; '.join(report.problems)}", file=sys.stderr
        )
        return 1
    if not after < before:
        print(
            f"dpsn demo: error: {steps} training step(s) did not lower the error "
            f"({before:.4f} -> {after:.4f}); try more --steps",
            file=sys.stderr,
        )
        return 1
    return 0
