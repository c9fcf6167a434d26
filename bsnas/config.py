"""Run configuration: every default in one place (`DEFAULTS`), YAML files under
`configs/` that override them, and `key.sub=value` overrides from the command line.
Unknown keys, wrong types and out-of-range values raise ValueError naming the key."""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "space": "tiny",              # preset name or path to a space YAML
    "seed": 0,
    "device": "auto",             # auto | cpu | cuda
    "deterministic": False,       # deterministic algorithms (exact resume on CPU)
    "keep_freed_memory": False,   # CPU, glibc: reuse freed memory (bsnas.train.host_memory)
    "out_dir": "runs/default",
    "data": {
        "dataset": "digits",      # digits (built in) | folder (an ImageNet-layout tree) | fashion_mnist
        "root": None,             # folder with train/ and val/ (folder); the four idx files
                                  # (fashion_mnist, default /usr/share/datasets/fashion-mnist)
        "cache_dir": None,        # where the digits tree is written (default ~/.cache/bsnas)
        "loader": "auto",         # auto (DALI when importable) | dali | torch
        "holdout": 300,           # training images held out for shrinking and search
        "train_limit": None,      # use only this many training images (a seeded subset); None = all
        "batch_size": 64,         # per process
        "eval_batch_size": 256,
        "workers": 2,
        "size": None,             # crop size; default: the space's resolution
        "scale": [0.08, 1.0],     # random-resized-crop area fraction
        "ratio": [0.75, 1.3333],  # random-resized-crop aspect ratio
        "flip": True,
        "crop_fraction": 0.875,   # eval: resize to size / crop_fraction, centre crop
        "padding": 2,             # in-memory images (fashion_mnist): pad-and-crop shift, pixels
        "verify": True,           # decode every image fully before training
        "skip_unreadable": False, # leave out images that cannot be decoded (logged count)
        "calib_images": 2000,     # training images for BN recalibration of a path (at most all)
        "calib_batches": None,    # if set: calib_batches x batch_size images instead
    },
    "train": {
        "epochs": 120,
        "lr": 0.1,                # for a global batch of 256; scaled linearly
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 4.0e-5,   # not on BN parameters or biases
        "label_smoothing": 0.1,
        "schedule": "cosine",     # cosine | linear
        "warmup_epochs": 1.0,     # linear learning-rate warm-up
        "amp": False,             # bf16 autocast on CUDA
        "sampling": "uniform",    # uniform single path | fair (FairNAS strict fairness)
        "channels_last": False,
        "checkpoint_every": 0,    # steps; 0 = only at epoch ends
        "keep_checkpoints": 3,
        "log_every": 20,          # steps between CSV rows
        "progress": True,         # a progress bar per epoch (tqdm, when stderr is a terminal)
        "eval_every": 1,          # epochs between evaluations of the largest path; 0 = never
        "nonfinite": "stop",      # NaN/inf loss, gradient or BN statistic: stop | skip_step
    },
    "broaden": {
        "warmup_epochs": 10.0,    # every spring block at its largest width
        "broaden_epochs": 40.0,   # width range grows from [max] to [min, max]
        "reorder": True,          # re-order channels by importance at each step
    },
    "shrink": {
        "enabled": True,
        "start": 60,              # epoch of the first decision
        "interval": 10,           # epochs between decisions
        "samples": 100,           # paths evaluated per decision
        "mode": "evidence",       # evidence (z-test against the layer's best) | random (control)
        "threshold": 2.0,         # turn off only candidates with z = gap / SE(gap) above this
        "max_op_drops": 2,        # per decision, whole space, most evident first
        "max_width_drops": 2,
        "random_drops": None,     # random mode: [[n_ops, n_widths], ...] per decision
                                  # (None: max_op_drops, max_width_drops)
        "min_ops": 1,
        "min_widths": 2,
        "score": "accuracy",      # accuracy | loss
        "cost_aware": "none",     # none | per_macs (accuracy per MMAC) | protect_cheapest
        "macs_cap": None,         # protect_cheapest's cap; None = search.max_macs
    },
    "search": {
        "population": 50,
        "generations": 20,
        "top_k": 10,
        "mutants": 25,
        "mutation_prob": 0.1,
        "crossovers": 25,
        "max_macs": None,         # constraints; None = unconstrained
        "max_params": None,
        "max_latency_ms": None,
        "latency_table": None,    # JSON from `bsnas latency-table`
        "max_tries": 10000,       # resampling attempts before giving up on constraints
    },
    "retrain": {
        "epochs": 20,
        "lr": 0.05,
        "inherit": True,          # fine-tune inherited weights (False: from scratch)
    },
}

CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "data.dataset": ("digits", "folder", "fashion_mnist"),
    "data.loader": ("auto", "dali", "torch"),
    "train.schedule": ("cosine", "linear"),
    "train.sampling": ("uniform", "fair"),
    "train.nonfinite": ("stop", "skip_step"),
    "shrink.score": ("accuracy", "loss"),
    "shrink.mode": ("evidence", "random"),
    "shrink.cost_aware": ("none", "per_macs", "protect_cheapest"),
}

# Keys that no longer exist, with what replaced them (named in the error).
REMOVED = {"shrink.drop_fraction": "shrink.threshold, shrink.max_op_drops and shrink.max_width_drops "
                                   "(shrinking turns off candidates on evidence, not by a fraction)"}

POSITIVE = {"data.batch_size", "data.eval_batch_size", "train.epochs", "train.lr",
            "train.keep_checkpoints", "train.log_every", "search.population",
            "search.generations", "search.top_k", "shrink.interval", "shrink.samples",
            "data.calib_batches", "search.max_tries", "retrain.lr",
            "shrink.min_ops", "shrink.min_widths", "data.calib_images", "data.train_limit",
            "shrink.macs_cap"}
NON_NEGATIVE = {"data.holdout", "data.workers", "train.weight_decay", "train.momentum",
                "train.label_smoothing", "train.warmup_epochs", "train.checkpoint_every",
                "train.eval_every",
                "broaden.warmup_epochs", "broaden.broaden_epochs", "shrink.start",
                "shrink.threshold", "shrink.max_op_drops", "shrink.max_width_drops",
                "data.padding", "search.mutants",
                "search.crossovers", "search.mutation_prob",
                "retrain.epochs"}


# Keys whose default is None (= unset), with the type a set value must have.
NULLABLE = {"data.root": str, "data.cache_dir": str, "data.size": int,
            "search.max_macs": (int, float), "search.max_params": (int, float),
            "search.max_latency_ms": (int, float), "search.latency_table": str,
            "data.train_limit": int, "data.calib_batches": int,
            "shrink.macs_cap": (int, float), "shrink.random_drops": list}


class Config(dict):
    """A nested dict with attribute access (`cfg.train.lr`)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)
                for k, v in self.items()}


def _finite(key: str, value):
    """`value`, or ValueError when it is a NaN or an infinity (also spelled as a string)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key '{key}' must be a finite number, got {value!r}")
    return value


def _check_type(key: str, default, value):
    if value is None:
        return value
    if default is None:
        want = NULLABLE.get(key)
        if want is not None and (isinstance(value, bool) or not isinstance(value, want)):
            if isinstance(want, tuple):
                _finite(key, value)
            kind = "a number" if isinstance(want, tuple) else f"of type {want.__name__}"
            raise ValueError(f"config key '{key}' must be {kind}, got {value!r}")
        return _finite(key, value) if isinstance(value, float) else value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key '{key}' must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"config key '{key}' must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _finite(key, value)
            raise ValueError(f"config key '{key}' must be a number, got {value!r}")
        return _finite(key, float(value))
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"config key '{key}' must be a string, got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise ValueError(f"config key '{key}' must be a list of {len(default)}, got {value!r}")
        return [_check_type(f"{key}[{i}]", d, v) for i, (d, v) in enumerate(zip(default, value))]
    return value


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    if not isinstance(update, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, "
                         f"got {update!r}")
    for key, value in update.items():
        full = f"{prefix}{key}"
        if key not in base:
            if full in REMOVED:
                raise ValueError(f"config key '{full}' was removed; use {REMOVED[full]}")
            raise ValueError(f"unknown config key '{full}'")
        if isinstance(base[key], dict):
            _merge(base[key], value, full + ".")
        else:
            base[key] = _check_type(full, DEFAULTS_FLAT.get(full), value)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


DEFAULTS_FLAT = _flatten(DEFAULTS)


def _validate(cfg: dict) -> None:
    flat = _flatten(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise ValueError(f"config key '{key}' must be one of {list(allowed)}, got {flat[key]!r}")
    for key in POSITIVE:
        if flat[key] is not None and flat[key] <= 0:
            raise ValueError(f"config key '{key}' must be > 0, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] is not None and flat[key] < 0:
            raise ValueError(f"config key '{key}' must be >= 0, got {flat[key]!r}")
    drops = flat["shrink.random_drops"]
    if drops is not None and not all(
            isinstance(d, (list, tuple)) and len(d) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in d)
            for d in drops):
        raise ValueError(f"config key 'shrink.random_drops' must be a list of [n_ops, n_widths] "
                         f"pairs of integers >= 0 (one per decision), got {drops!r}")
    if drops is not None and flat["shrink.mode"] != "random":
        raise ValueError("config key 'shrink.random_drops' is only used with shrink.mode: random")
    if flat["shrink.cost_aware"] == "per_macs" and flat["shrink.score"] != "accuracy":
        raise ValueError("config key 'shrink.cost_aware' per_macs needs shrink.score: accuracy "
                         "(it scores paths by accuracy per MMAC)")
    if not 0 <= flat["search.mutation_prob"] <= 1:
        raise ValueError("config key 'search.mutation_prob' must be in [0, 1]")
    if flat["search.top_k"] > flat["search.population"]:
        raise ValueError("config key 'search.top_k' must not exceed 'search.population'")
    if flat["data.dataset"] == "folder" and not flat["data.root"]:
        raise ValueError("config key 'data.root' is required when data.dataset is 'folder'")
    lo, hi = flat["data.scale"]
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"config key 'data.scale' must satisfy 0 < min <= max <= 1, got {[lo, hi]}")


def _wrap(d: dict) -> Config:
    return Config({k: _wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, with YAML 1.2's floats: `1e30` and `2e6` are numbers (YAML 1.1
    reads an exponent without a dot as a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_problem(e: yaml.YAMLError) -> tuple[str, str]:
    """(" at line L, column C" or "", the problem) of a YAML error, on one line."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
    return where, " ".join(str(problem).split())


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.05` -> ("train.lr", 0.05); the value is parsed as YAML."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: the value of '{key.strip()}' is not valid YAML: "
                         f"{_yaml_problem(e)[1]}") from None
    return key.strip(), value


def _read_yaml_file(path: str):
    """The YAML document in `path`; ValueError naming the file (and line) when it is not
    valid YAML or not text."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        where, problem = _yaml_problem(e)
        raise ValueError(f"config file {path!r}: YAML syntax error{where}: {problem}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                extra: dict | None = None) -> Config:
    """DEFAULTS, then the YAML file at `path`, then `extra` (a nested dict), then the
    `key.sub=value` overrides, validated. A relative `space` path is resolved against
    the config file's folder when it exists there."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        data = _read_yaml_file(path) or {}
        _merge(cfg, data)
        space = cfg["space"]
        if isinstance(space, str) and space.endswith((".yaml", ".yml")) and not os.path.isabs(space):
            candidate = os.path.join(os.path.dirname(os.path.abspath(path)), space)
            if os.path.isfile(candidate):
                cfg["space"] = candidate
    if extra:
        _merge(cfg, extra)
    for text in overrides:
        key, value = parse_override(text)
        node = {}
        cursor = node
        parts = key.split(".")
        for p in parts[:-1]:
            cursor[p] = {}
            cursor = cursor[p]
        cursor[parts[-1]] = value
        _merge(cfg, node)
    _validate(cfg)
    return _wrap(cfg)
