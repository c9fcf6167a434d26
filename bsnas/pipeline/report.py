"""The report of an end-to-end run: `<run>/report/report.md` with PNG plots, built only
from the files the run wrote (so it can be rebuilt at any time):

    config.json, epochs.csv, train_log.csv   supernet training (bsnas.train)
    shrink_log.json                          shrinking decisions (bsnas.strategy.shrinking)
    search/search_result.json, pareto.png    evolutionary search (bsnas.strategy.evolution)
    retrain/retrain.json                     the retrained architecture (bsnas.pipeline.retrain)

Plots (`bsnas.pipeline.plots`): the training curves, a layer x op heat map of the epoch
at which shrinking turned each op off (and a layer x width one), and the accuracy-MACs
Pareto front of the search. Missing pieces (e.g. shrinking disabled) are reported as
such.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from typing import Any

from bsnas.pipeline.plots import plot_curves, plot_shrink_heatmap
from bsnas.space import Arch, SearchSpace, load_space

__all__ = ["write_report"]


def _load_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt_int(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _arch_table(space: SearchSpace, arch: Arch) -> list[str]:
    lines = ["| layer | stage | channels in -> out | stride | op | hidden width (x input) |",
             "|---|---|---|---|---|---|"]
    for layer, c in zip(space.layers, arch.layers):
        width = "-" if c.width is None else f"{c.width} ({c.width / layer.in_channels:.1f}x)"
        lines.append(f"| {layer.index} | {layer.stage} | {layer.in_channels} -> {layer.out_channels} | "
                     f"{layer.stride} | {c.op} | {width} |")
    return lines


def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def write_report(run_dir: str, out_dir: str | None = None) -> str:
    """Write `report.md` and its PNGs into `out_dir` (default `<run_dir>/report`) from
    the files of the run in `run_dir`; returns the path of report.md."""
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    config = _load_json(os.path.join(run_dir, "config.json"))
    if config is None:
        raise ValueError(f"{run_dir!r} holds no config.json: not a bsnas run folder")
    space = load_space(config["space"])
    shrink_log = _load_json(os.path.join(run_dir, "shrink_log.json"))
    search = _load_json(os.path.join(run_dir, "search", "search_result.json"))
    retrained = _load_json(os.path.join(run_dir, "retrain", "retrain.json"))
    epochs = _read_csv(os.path.join(run_dir, "epochs.csv"))

    md = ["# BS-NAS run report", "",
          f"Run folder: `{os.path.abspath(run_dir)}`. Space `{space.name}` "
          f"({space.num_layers} searchable layers, {space.size():.3e} architectures, "
          f"{space.resolution}x{space.resolution} input, {space.classes} classes); "
          f"dataset `{config['data']['dataset']}`; {config['train']['epochs']} supernet epochs, seed "
          f"{config['seed']}.", ""]

    # ---------------------------------------------------------------- result
    md += ["## Chosen architecture", ""]
    if search is None:
        md += ["No search results (`search/search_result.json` is missing).", ""]
    else:
        best = search["best"]
        arch = Arch.from_dict(best["arch"])
        md += _arch_table(space, arch) + [""]
        rows = [("MACs", _fmt_int(best["macs"])), ("parameters", f"{best['params']:,}")]
        if best.get("latency_ms") is not None:
            rows.append(("latency (latency table)", f"{best['latency_ms']:.3f} ms"))
        rows.append(("held-out top-1 in the supernet (search fitness)", _pct(best["top1"])))
        if retrained is not None:
            lat = retrained["latency"]
            rows.append((f"latency measured ({lat['device_name']}, {lat['threads']} threads, batch 1)",
                         f"{lat['median_ms']:.3f} ms"))
            if retrained.get("inherited_val_top1") is not None:
                rows.append(("validation top-1 with inherited weights (before retraining)",
                             _pct(retrained["inherited_val_top1"])))
            how = "fine-tuned from inherited weights" if retrained["inherit"] else "trained from scratch"
            rows.append((f"validation top-1 / top-5 after {retrained['epochs']} epochs, {how}",
                         f"{_pct(retrained['val_top1'])} / {_pct(retrained['val_top5'])}"))
        md += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]
        md += [f"Architecture JSON: `{os.path.join(run_dir, 'search', 'best_arch.json')}`.", ""]

    # ---------------------------------------------------------------- training
    md += ["## Supernet training", ""]
    curves = plot_curves(run_dir)
    if curves:
        shutil.copy(curves, os.path.join(out_dir, "training_curves.png"))
        md += ["![training curves](training_curves.png)", ""]
    if epochs:
        last = epochs[-1]
        md += [f"After epoch {last['epoch']}: training loss {float(last['train_loss']):.4f}; largest enabled "
               f"path: held-out top-1 {_pct(float(last['holdout_top1']))}, validation top-1 "
               f"{_pct(float(last['val_top1']))}; enabled space {float(last['enabled_size']):.3e} "
               f"architectures.", ""]

    # ---------------------------------------------------------------- shrinking
    md += ["## Shrinking", ""]
    decisions = (shrink_log or {}).get("decisions", [])
    if not decisions:
        md += ["No shrinking decisions were made (shrinking disabled, or no decision was due before "
               "the last epoch: none follows it).", ""]
    else:
        st = shrink_log["settings"]
        floors = f"at least {st['min_ops']} ops and {st['min_widths']} widths kept per layer"
        if st.get("mode") == "random":
            rule = (f"Every {st['interval']} epochs from epoch {st['start']}: the random control, "
                    f"candidates turned off uniformly at random ({floors}).")
        elif "threshold" in st:
            per = " per MMAC" if st.get("cost_aware") == "per_macs" else ""
            rule = (f"Every {st['interval']} epochs from epoch {st['start']}: {st['samples']} sampled paths, "
                    f"scored by {st['score']}{per}; a candidate is turned off when its gap to its layer's "
                    f"best is more than {st['threshold']:g} standard errors (z), at most "
                    f"{st['max_op_drops']} ops and {st['max_width_drops']} widths per decision, most "
                    f"evident first ({floors}"
                    + ("; the cheapest architecture's candidates protected" if
                       st.get("cost_aware") == "protect_cheapest" else "") + ").")
        else:  # logs of the older fraction rule
            rule = (f"Every {st['interval']} epochs from epoch {st['start']}: {st['samples']} sampled paths, "
                    f"scored by {st['score']}; up to {100 * st['drop_fraction']:.0f}% of the enabled "
                    f"candidates turned off per decision ({floors}).")
        md += [rule + " Gap = how far a candidate's mean score is below its layer's best; z = gap / its "
               "standard error.", "",
               "| after epoch | paths (distinct) | turned off (layer: candidate, gap, z) | space size |",
               "|---|---|---|---|"]

        def _one(s):
            if s.get("gap") is None:
                return f"L{s['layer']}: {s['name']}"
            z = f", z {s['z']:.1f}" if s.get("z") is not None else ""
            return f"L{s['layer']}: {s['name']} ({s['gap']:.3f}{z})"

        for d in decisions:
            dropped = ", ".join(_one(s) for s in d["dropped"]) or "none"
            md.append(f"| {d['epoch']} | {d['samples']} ({d['distinct_paths']}) | {dropped} | "
                      f"{d['size_before']:.3e} -> {d['size_after']:.3e} |")
        md.append("")
        last = int(epochs[-1]["epoch"]) if epochs else None
        heat = plot_shrink_heatmap(space, shrink_log, os.path.join(out_dir, "shrink_heatmap.png"), last)
        if heat:
            md += ["![shrinking heat map](shrink_heatmap.png)", ""]
        final = decisions[-1]["enabled"]["layers"]
        md += ["Enabled space after the last decision:", "", "| layer | ops | widths |", "|---|---|---|"]
        md += [f"| {i} | {', '.join(l['ops'])} | {', '.join(map(str, l['widths']))} |"
               for i, l in enumerate(final)] + [""]

    # ---------------------------------------------------------------- search
    md += ["## Evolutionary search", ""]
    if search is not None:
        p = search["params"]
        c = search["constraints"]
        bounds = ", ".join(f"{k} <= {v:g}" for k, v in c.items() if k.startswith("max_") and v is not None)
        md += [f"Population {p['population']}, {search['generations']} generations run (of "
               f"{p['generations']}), top-k {p['top_k']}, {p['mutants']} mutants (gene probability "
               f"{p['mutation_prob']}), {p['crossovers']} crossovers; constraints: {bounds or 'none'}. "
               f"{search['evaluated']} architectures evaluated in {search['seconds']:.1f} s.", ""]
        src = os.path.join(run_dir, "search", "pareto.png")
        if os.path.exists(src):
            shutil.copy(src, os.path.join(out_dir, "pareto.png"))
            md += ["![Pareto front](pareto.png)", ""]
        md += ["Pareto front (held-out top-1 against MACs):", "",
               "| MACs | params | held-out top-1 | generation | architecture |", "|---|---|---|---|---|"]
        md += [f"| {_fmt_int(x['macs'])} | {x['params']:,} | {_pct(x['top1'])} | {x['generation']} | "
               f"`{Arch.from_dict(x['arch'])}` |" for x in search["pareto"]] + [""]
    else:
        md += ["No search results.", ""]

    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path
