"""``bench/quality.py --budget-prices``: a learned per-token budget trained against its cost.

The pool model of bench/quality.py with a fixed ``k`` (the baseline) beside the same model whose
routers have a learned budget in ``[k_min, k]`` trained with ``budget_cost`` = each price
(``index/_budget.py``: expected rows x price added to the loss). For every run: validation and
test bits/byte on the whole splits, the mean budget over the test split, and which input bytes
got the smallest budgets (the seed's "stopword economy": does a frequent, easy byte cost fewer
rows?). Prices are chosen before the run, not tuned on test; compare on validation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lm
import torch
from _common import print_table


@torch.no_grad()
def budgets_by_byte(
    model: lm.ByteLM, splits: lm.Splits, batch: int, limit: int | None = None
) -> dict[str, Any]:
    """Mean budget per input byte over the test split (``limit`` evenly spaced windows; None:
    all of it), each pool layer and together."""
    was_training = model.training
    model.eval()
    layers = model.pool_layers()
    total = torch.zeros(len(layers), lm.VOCAB, dtype=torch.float64)
    count = torch.zeros(lm.VOCAB, dtype=torch.float64)
    windows = lm.val_windows(splits.test, model.cfg.context, limit)
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch, :-1]
        model(w)
        flat = w.reshape(-1)
        count.index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64))
        for j, layer in enumerate(layers):
            total[j].index_add_(0, flat, layer.last_route.k.double())
    model.train(was_training)
    seen = count > 0
    mean_by_byte = (total.sum(0) / len(layers)) / count.clamp_min(1)  # over layers
    overall = float(total.sum() / len(layers) / count.sum())
    frequent = torch.argsort(count, descending=True)[:10]
    common = count >= 100  # bytes seen often enough for a stable mean
    ranked = [b for b in torch.argsort(mean_by_byte).tolist() if common[b] and seen[b]]

    def entry(b: int) -> dict[str, Any]:
        return {"byte": b, "char": chr(b), "count": int(count[b]), "mean_k": float(mean_by_byte[b])}

    top10 = frequent.tolist()
    share = count[frequent].sum() / count.sum()
    k_top = float((mean_by_byte[frequent] * count[frequent]).sum() / count[frequent].sum())
    rest = seen.clone()
    rest[frequent] = False
    k_rest = float((mean_by_byte[rest] * count[rest]).sum() / count[rest].sum())
    return {
        "mean_k": overall,
        "mean_k_by_layer": (total.sum(1) / count.sum()).tolist(),
        "most_frequent_bytes": [entry(b) for b in top10],
        "mean_k_most_frequent_10": k_top,
        "share_of_bytes_most_frequent_10": float(share),
        "mean_k_other_bytes": k_rest,
        "smallest_budgets": [entry(b) for b in ranked[:8]],
        "largest_budgets": [entry(b) for b in ranked[-5:][::-1]],
    }


def run(
    pool_cfg: lm.LMConfig,
    prices: Sequence[float],
    k_min: int,
    steps: int,
    tmp: Path,
    common: dict[str, Any],
) -> dict[str, Any]:
    """The fixed-k run and one learned-budget run per price; returns the figures."""
    runs: dict[str, dict[str, Any]] = {}
    configs = {"fixed k": replace(pool_cfg, budget="fixed", k_min=None, budget_cost=0.0)}
    for price in prices:
        configs[f"learned, price {price:g}"] = replace(
            pool_cfg, budget="learned", k_min=k_min, budget_cost=float(price)
        )
    for name, cfg in configs.items():
        res = lm.train(
            cfg,
            steps=steps,
            store=tmp / name.replace(" ", "_").replace(",", ""),
            desc=name,
            inspect=lambda model, splits, cfg=cfg: budgets_by_byte(
                model, splits, cfg.batch, common.get("final_windows")
            ),
            **common,
        )
        res.pop("store", None)
        res["price"] = cfg.budget_cost
        runs[name] = res
    base = runs["fixed k"]
    rows = []
    for name, res in runs.items():
        b = res["inspect"]
        rows.append(
            (
                name,
                f"{res['val_bpb']:.4f}",
                f"{res['val_bpb'] / base['val_bpb'] - 1:+.2%}",
                f"{res['test_bpb']:.4f}",
                f"{res['test_bpb'] / base['test_bpb'] - 1:+.2%}",
                f"{b['mean_k']:.2f}",
                f"{b['mean_k'] / pool_cfg.k:.2f}",
                f"{b['mean_k_most_frequent_10']:.2f}",
                f"{b['mean_k_other_bytes']:.2f}",
            )
        )
    print_table(
        f"learned budget against its cost: k in [{k_min}, {pool_cfg.k}], {steps} steps "
        "(prices in nats of loss per row per token)",
        [
            "run",
            "val bpb",
            "vs fixed",
            "test bpb",
            "vs fixed",
            "mean k",
            "/ k_max",
            "k, 10 commonest bytes",
            "k, other bytes",
        ],
        rows,
    )
    for name, res in runs.items():
        if name == "fixed k":
            continue
        b = res["inspect"]
        small = ", ".join(f"{e['char']!r} {e['mean_k']:.1f}" for e in b["smallest_budgets"])
        large = ", ".join(f"{e['char']!r} {e['mean_k']:.1f}" for e in b["largest_budgets"])
        print(f"{name}: smallest budgets {small}; largest {large}")
    aims = {}
    for name, res in runs.items():
        if name == "fixed k":
            continue
        b = res["inspect"]
        ratio = b["mean_k"] / pool_cfg.k
        loss = res["test_bpb"] / base["test_bpb"] - 1
        aims[name] = {
            "mean_k_over_k_max": ratio,
            "test_bpb_vs_fixed": loss,
            "val_bpb_vs_fixed": res["val_bpb"] / base["val_bpb"] - 1,
            "aim_met": ratio <= 0.6 and loss <= 0.01,
            "frequent_bytes_fewer_rows": b["mean_k_most_frequent_10"] < b["mean_k_other_bytes"],
        }
    print_table(
        "against the aim (mean k <= 0.6 k_max at <= +1% test bits/byte vs fixed k_max)",
        ["run", "mean k / k_max", "test vs fixed", "aim", "commonest bytes cheaper"],
        [
            (
                n,
                f"{a['mean_k_over_k_max']:.2f}",
                f"{a['test_bpb_vs_fixed']:+.2%}",
                "met" if a["aim_met"] else "missed",
                "yes" if a["frequent_bytes_fewer_rows"] else "no",
            )
            for n, a in aims.items()
        ],
    )

    def strip(res: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in res.items() if k not in ("curves",)}

    return {
        "steps": steps,
        "k_min": k_min,
        "k_max": pool_cfg.k,
        "prices": list(prices),
        "config": asdict(pool_cfg),
        "runs": {n: strip(r) for n, r in runs.items()},
        "aims": aims,
        "bits_per_nat": 1 / math.log(2),
    }
