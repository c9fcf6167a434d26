"""Command line: `python -m bsnas <command> ...`.

Commands:
    train           train the supernet (broadening, shrinking); works under torchrun
    search          evolutionary search on a trained supernet checkpoint
    retrain         retrain an architecture (inherited weights or from scratch)
    run             the whole pipeline: train, search, export, retrain, report
    latency-table   measure the per-choice latency table of a space on this device
    latency-report  how well a latency table predicts end-to-end latency
    export          export an architecture from a supernet checkpoint as plain PyTorch

Run commands take `--config C` (a YAML file under configs/, see bsnas.config) and
`key.sub=value` overrides after it, e.g. `bsnas train --config configs/quickstart.yaml
train.epochs=3`. They log to stderr at INFO (rank 0 only under torchrun).

Each command is one `add_<command>(subparsers)` function below that declares its
arguments and sets `func` to the function that runs it; a new command (train, search,
...) is one more such function appended to `COMMANDS`. A command returns an exit
status; ValueErrors (bad input, e.g. a damaged checkpoint) and OSErrors are printed on
one line as `bsnas <command>: error: ...` with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable, Sequence

__all__ = ["COMMANDS", "build_parser", "main"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write_json(path: str, obj) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _add_timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); recorded in the output")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before each timing (default 5)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per round; median kept (default 10)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved passes over everything measured; median kept (default 3)")


# --------------------------------------------------------------------------- latency-table


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)


def _add_measure_args(p: argparse.ArgumentParser, when: str) -> None:
    """--space, the timing flags and the shape of the timed inputs, shared by the latency
    commands; `when` says when a table is measured."""
    p.add_argument("--space", required=True, help="preset name or YAML file")
    _add_timing_args(p)
    p.add_argument("--batch-size", type=int, default=1, help=f"batch size {when} (default 1)")
    p.add_argument("--resolution", type=int, default=None,
                   help=f"input resolution {when} (default: the space's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _measure_table(args: argparse.Namespace) -> dict:
    from bsnas.profiler.latency import measure_table
    return measure_table(args.space, args.device, batch_size=args.batch_size,
                         resolution=args.resolution, warmup=args.warmup, repeats=args.repeats,
                         rounds=args.rounds, progress=None if args.quiet else _log)


def _run_latency_table(args: argparse.Namespace) -> int:
    _set_threads(args)
    table = _measure_table(args)
    out = args.out or f"latency-{table['space']}-{table['device']}.json"
    _write_json(out, table)
    print(f"wrote {out}: {sum(len(w) for l in table['layers'] for w in l.values() if isinstance(w, dict))} "
          f"choices of space {table['space']!r} on {table['device_name']} ({table['device']})")
    return 0


def add_latency_table(sub) -> None:
    p = sub.add_parser("latency-table", help="measure the latency of every (layer, op, width) choice",
                       description="Measure every (layer, op, width) choice of a space on this device "
                                   "and write a JSON latency table (see bsnas.profiler.latency).")
    _add_measure_args(p, "of the timed inputs")
    p.add_argument("--out", default=None, help="output JSON (default latency-<space>-<device>.json)")
    p.set_defaults(func=_run_latency_table)


# --------------------------------------------------------------------------- latency-report


def _run_latency_report(args: argparse.Namespace) -> int:
    from bsnas.profiler.cost import load_latency_table
    from bsnas.profiler.latency import evaluate_table
    _set_threads(args)
    table = load_latency_table(args.table) if args.table else _measure_table(args)
    report = evaluate_table(args.space, table, archs=args.archs, seed=args.seed, device=args.device,
                            warmup=args.warmup, repeats=args.repeats, rounds=args.rounds,
                            progress=None if args.quiet else _log)
    report["table"] = table
    _write_json(args.out, report)
    print(f"{report['space']} on {report['device_name']} ({report['device']}, {report['threads']} threads), "
          f"{report['archs']} archs: Pearson {report['pearson']:.3f}, Kendall tau {report['kendall_tau']:.3f} "
          f"(MACs: {report['kendall_tau_macs']:.3f}), mean |rel. error| {report['mean_abs_rel_error']:.1%}; "
          f"wrote {args.out}")
    return 0


def add_latency_report(sub) -> None:
    p = sub.add_parser("latency-report", help="how well a latency table predicts end-to-end latency",
                       description="Measure N random architectures end to end and report Pearson and "
                                   "Kendall correlations with the latency-table sums.")
    _add_measure_args(p, "when measuring a table")
    p.add_argument("--archs", type=int, default=50, help="number of random architectures (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--table", default=None, help="latency table JSON (default: measure one first)")
    p.add_argument("--out", required=True, help="output JSON report (includes the table)")
    p.set_defaults(func=_run_latency_report)


# --------------------------------------------------------------------------- export


def _run_export(args: argparse.Namespace) -> int:
    from bsnas.export import export
    from bsnas.profiler import cost
    from bsnas.space import Arch
    from bsnas.supernet import Supernet
    from bsnas.train.checkpoint import CheckpointError, load_checkpoint, save_atomic
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a directory; give the model file, e.g. "
                         f"{os.path.join(args.out, 'model.pt')}")
    try:
        net, _ = Supernet.from_checkpoint(load_checkpoint(args.checkpoint))
    except RuntimeError as e:  # load_state_dict: one line with the first mismatch
        first = next((l.strip() for l in str(e).splitlines()[1:] if l.strip()), str(e))
        raise CheckpointError(f"checkpoint {args.checkpoint}: its weights do not fit its space: "
                              f"{first[:300]}") from None
    arch = net.space.validate(Arch.load(args.arch))
    model = export(net, arch)
    save_atomic(model, args.out)  # an existing file stays whole until the new one is
    print(f"wrote {args.out}: {arch.space} arch, {cost.params(net.space, arch):,} parameters, "
          f"{cost.flops(net.space, arch) / 1e6:.1f}M MACs at {net.space.resolution}x{net.space.resolution}")
    return 0


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export an architecture from a supernet checkpoint",
                       description="Export an architecture with its weights inherited from a supernet "
                                   "checkpoint as a plain-PyTorch module (torch.save'd; load it with "
                                   "torch.load(path, weights_only=False), no bsnas needed).")
    p.add_argument("--checkpoint", required=True,
                   help="supernet checkpoint you trust (read as a full pickle): a dict with 'space' "
                        "and 'model' (see bsnas.supernet)")
    p.add_argument("--arch", required=True, help="architecture JSON file (see bsnas.space.arch)")
    p.add_argument("--out", required=True, help="output file, e.g. model.pt")
    p.set_defaults(func=_run_export)


# --------------------------------------------------------------------------- train / search / retrain / run


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="run config YAML (default: bsnas.config.DEFAULTS)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.epochs=3 search.max_macs=2e6")


def _config(args: argparse.Namespace):
    from bsnas.config import load_config
    return load_config(args.config, args.overrides)


_OVERWRITE_HELP = ("replace the run in out_dir: first delete the files bsnas writes there (ckpt-*.pt, "
                   "config.json, the CSV logs, summary.json, shrink_log.json, run.json, model.pt, "
                   "training_curves.png and the tensorboard/, search/, retrain/, report/ folders); "
                   "other files are kept. Without it (or --resume), a fresh run refuses a folder "
                   "that holds a run")


def _add_resume_overwrite(p: argparse.ArgumentParser, resume_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help=resume_help)
    group.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def _single_process(command: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"`bsnas {command}` runs in one process; only `bsnas train` runs under torchrun")


def _run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from bsnas.pipeline.run import build_trainer
    trainer = build_trainer(_config(args), args.resume, args.overwrite)
    try:
        last = trainer.fit()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.dist.main:
        print(f"trained {trainer.epoch} epoch{'s' * (trainer.epoch != 1)} ({trainer.step} steps) into "
              f"{trainer.out_dir}: "
              f"largest path held-out top-1 {last.get('holdout_top1', float('nan')):.4f}, "
              f"enabled space {trainer.enabled.size():.3e} archs")
    return 0


def add_train(sub) -> None:
    p = sub.add_parser("train", help="train the supernet (broadening and shrinking)",
                       description="Train the supernet of the config's space with single-path sampling, "
                                   "the broadening schedule and, when shrink.enabled, shrinking. Also "
                                   "runs under `torchrun --nproc_per_node N -m bsnas train ...`.")
    _add_config_args(p)
    _add_resume_overwrite(p, "continue from the newest good checkpoint in out_dir")
    p.set_defaults(func=_run_train)


def _run_search(args: argparse.Namespace) -> int:
    from bsnas.pipeline.plots import plot_pareto
    from bsnas.strategy.evolution import search_checkpoint
    _single_process("search")
    cfg = _config(args)
    out = args.out or os.path.join(cfg.out_dir, "search")
    result = search_checkpoint(cfg, args.checkpoint, out, args.resume, plot=plot_pareto)
    b = result.best
    print(f"best of {len(result.candidates)} candidates: {b.arch} (held-out top-1 {b.top1:.4f}, "
          f"{b.macs / 1e6:.2f}M MACs, {b.params:,} params); wrote {os.path.join(out, 'best_arch.json')}")
    return 0


def add_search(sub) -> None:
    p = sub.add_parser("search", help="evolutionary search on a supernet checkpoint",
                       description="SPOS-style evolutionary search over the enabled space stored in a "
                                   "training checkpoint, with the held-out top-1 after BN recalibration "
                                   "as fitness and the search.* constraints (see "
                                   "bsnas.strategy.evolution).")
    p.add_argument("--checkpoint", required=True, help="training checkpoint (ckpt-*.pt) you trust")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="output folder (default <out_dir>/search)")
    p.add_argument("--resume", action="store_true", help="continue the search saved in the output folder")
    p.set_defaults(func=_run_search)


def _run_retrain(args: argparse.Namespace) -> int:
    from bsnas.pipeline.retrain import retrain
    from bsnas.space import Arch
    _single_process("retrain")
    cfg = _config(args)
    out = args.out or os.path.join(cfg.out_dir, "retrain")
    report = retrain(cfg, Arch.load(args.arch), checkpoint=args.checkpoint, out_dir=out)
    summary = {k: report[k] for k in ("val_top1", "val_top5", "macs", "params")}
    summary["latency_ms"] = report["latency"]["median_ms"]
    print(json.dumps(summary))
    return 0


def add_retrain(sub) -> None:
    p = sub.add_parser("retrain", help="retrain an architecture and report its accuracy and cost",
                       description="Train an exported architecture from scratch or fine-tune its weights "
                                   "inherited from a supernet checkpoint (retrain.inherit); writes "
                                   "retrain.json with validation top-1/top-5, MACs, parameters and the "
                                   "latency measured on this device (see bsnas.pipeline.retrain).")
    p.add_argument("--arch", required=True, help="architecture JSON (e.g. search/best_arch.json)")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="supernet checkpoint to inherit weights from")
    p.add_argument("--out", default=None, help="output folder (default <out_dir>/retrain)")
    p.set_defaults(func=_run_retrain)


def _run_run(args: argparse.Namespace) -> int:
    from bsnas.pipeline.run import run
    tic = time.perf_counter()
    summary = run(_config(args), args.resume, progress=_log, overwrite=args.overwrite)
    print(f"done in {time.perf_counter() - tic:.0f}s: best {summary['best']['macs'] / 1e6:.2f}M MACs, "
          f"held-out top-1 {summary['best']['top1']:.4f} in the supernet, validation top-1 "
          f"{summary['val_top1']:.4f} after retraining")
    print(f"report: {summary['report']}")
    return 0


def add_run(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: train, search, export, retrain, report",
                       description="Train the supernet (broadening + shrinking), search it, export the "
                                   "best architecture, retrain it briefly and write <out_dir>/report/"
                                   "report.md (see bsnas.pipeline.run).")
    _add_config_args(p)
    _add_resume_overwrite(p, "continue an interrupted run")
    p.set_defaults(func=_run_run)


# --------------------------------------------------------------------------- main

#: One function per command; each adds its parser to the subparsers.
COMMANDS: list[Callable] = [add_train, add_search, add_retrain, add_run, add_latency_table,
                            add_latency_report, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsnas", description="BS-NAS: broadening-and-shrinking one-shot "
                                                               "NAS with searchable channel numbers")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # INFO to stderr; under torchrun only rank 0 says more than warnings.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as e:
        # one line: bad input names what is wrong; the traceback is not for the user
        text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"bsnas {args.command}: error: {text or type(e).__name__}", file=sys.stderr)
        return 2
