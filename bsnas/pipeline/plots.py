"""Every plot bsnas draws, as PNG files (matplotlib with the headless Agg backend,
imported only when a plot is drawn; each function returns None when matplotlib is
missing):

- `plot_curves`: the supernet's training curves, from a run folder's CSV logs;
- `plot_pareto`: the accuracy-MACs candidates and Pareto front of a search;
- `plot_shrink_heatmap`: when shrinking turned each op and width off.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Any

from bsnas.space import SKIP, SearchSpace, kernel_size
from bsnas.strategy.evolution import SearchResult

__all__ = ["plot_curves", "plot_pareto", "plot_shrink_heatmap", "turned_off"]


def plot_curves(out_dir: str) -> str | None:
    """training_curves.png from train_log.csv and epochs.csv (matplotlib, headless)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return None
    steps, losses = [], []
    path = os.path.join(out_dir, "train_log.csv")
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    epochs, val, held = [], [], []
    path = os.path.join(out_dir, "epochs.csv")
    if os.path.exists(path):
        with open(path) as f:
            for row in csv.DictReader(f):
                epochs.append(int(row["epoch"]))
                val.append(100 * float(row["val_top1"]))
                held.append(100 * float(row["holdout_top1"]))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, losses, lw=1)
    a.set(xlabel="step", ylabel="training loss (sampled path)", title="supernet training")
    b.plot(epochs, held, marker="o", label="held-out")
    b.plot(epochs, val, marker="s", label="validation")
    b.set(xlabel="epoch", ylabel="top-1 % (largest path)", title="largest enabled path")
    b.legend()
    fig.tight_layout()
    out = os.path.join(out_dir, "training_curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_pareto(result: SearchResult, path: str) -> str | None:
    """Top-1 against MACs of every candidate (coloured by generation), the Pareto front
    and the best; PNG at `path` (None when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except Exception:  # noqa: BLE001
        return None
    cands, front, best = result.candidates, result.pareto, result.best
    fig, ax = plt.subplots(figsize=(6, 4))
    sc = ax.scatter([c.macs / 1e6 for c in cands], [100 * c.top1 for c in cands],
                    c=[c.generation for c in cands], cmap="viridis", s=14, alpha=0.7)
    bar = fig.colorbar(sc, ax=ax, label="generation")
    bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
    bar.update_ticks()
    ax.step([c.macs / 1e6 for c in front], [100 * c.top1 for c in front], where="post",
            color="tab:red", lw=1.5, label="Pareto front")
    ax.scatter([best.macs / 1e6], [100 * best.top1], marker="*", s=200, color="tab:red",
               edgecolor="k", zorder=5, label="best")
    ax.set(xlabel="MACs (M)", ylabel="held-out top-1 % (supernet)",
           title=f"evolutionary search: {len(cands)} candidates")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def turned_off(shrink_log: dict | None) -> dict[tuple[int, str, Any], int]:
    """`{(layer, "op"|"width", name): epoch}` of every candidate a decision turned off."""
    out = {}
    for d in (shrink_log or {}).get("decisions", []):
        for s in d["dropped"]:
            out[(s["layer"], s["kind"], s["name"])] = d["epoch"]
    return out


def _op_order(space: SearchSpace) -> list[str]:
    ops = {op for layer in space.layers for op in layer.ops}
    return sorted((op for op in ops if op != SKIP), key=kernel_size) + ([SKIP] if SKIP in ops else [])


def plot_shrink_heatmap(space: SearchSpace, shrink_log: dict | None, path: str,
                        last_epoch: int | None = None) -> str | None:
    """Two heat maps: layer x op and layer x width option, coloured by the epoch at which
    shrinking turned the candidate off; white "on" cells were never turned off, grey
    cells are not candidates of the layer. PNG at `path` (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
        import numpy as np
    except Exception:  # noqa: BLE001
        return None
    off = turned_off(shrink_log)
    ops = _op_order(space)
    n_w = max(len(layer.widths) for layer in space.layers)
    epochs = [e for e in off.values()]
    vmax = max(epochs + [last_epoch or 1])
    vmin = min(epochs + [vmax])
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    panels = []
    for kind, columns, cell in (
            ("op", ops, lambda layer, j: ops[j] if ops[j] in layer.ops else None),
            ("width", list(range(n_w)),
             lambda layer, j: layer.widths[j] if j < len(layer.widths) else None)):
        grid = np.full((space.num_layers, len(columns)), np.nan)
        labels = [["" for _ in columns] for _ in space.layers]
        absent = np.zeros_like(grid, dtype=bool)
        for layer in space.layers:
            for j in range(len(columns)):
                name = cell(layer, j)
                if name is None:
                    absent[layer.index, j] = True
                    continue
                epoch = off.get((layer.index, kind, name))
                if epoch is not None:
                    grid[layer.index, j] = epoch
                text = str(name) if kind == "width" else ""
                labels[layer.index][j] = f"{text}\n" * (kind == "width") + (
                    f"off@{epoch}" if epoch is not None else "on")
        panels.append((kind, columns, grid, labels, absent))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * (len(ops) + n_w), 1.2 + 0.55 * space.num_layers),
                             gridspec_kw={"width_ratios": [len(ops), n_w]})
    for ax, (kind, columns, grid, labels, absent) in zip(axes, panels):
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.imshow(np.ma.masked_where(~absent, absent.astype(float)), cmap="Greys", vmin=0, vmax=2,
                  aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                if not absent[i, j]:
                    ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7,
                            color="black" if math.isnan(grid[i, j]) else "white")
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels(columns if kind == "op" else [f"w{j + 1}" for j in columns])
        ax.set_yticks(range(space.num_layers))
        ax.set_yticklabels([f"L{layer.index} (s{layer.stage})" for layer in space.layers])
        ax.set_title(f"epoch each {kind} was turned off" if kind == "op" else
                     "epoch each width option was turned off (w1 = narrowest)", fontsize=9)
    bar = fig.colorbar(im, ax=axes, label="epoch turned off", shrink=0.8)
    bar.locator = matplotlib.ticker.MaxNLocator(integer=True)
    bar.update_ticks()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
