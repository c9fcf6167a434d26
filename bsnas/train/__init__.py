"""Supernet training: the trainer (`trainer`), the broadening schedule (`broadening`),
checkpoint files (`checkpoint`), process set-up shared with search and retraining
(`runtime`), collectives and host memory settings (`collectives`, `host_memory`).

`Trainer` is imported on first use (`from bsnas.train import Trainer`), so that search
and retraining, which use `bsnas.train.runtime` and `bsnas.train.checkpoint`, do not
load the trainer.
"""
from bsnas.train.runtime import (DataSplits, Dist, append_csv_row, build_data, init_distributed, lr_lambda,
                                 param_groups, pick_device, rng_state, seed_everything, set_rng_state)

__all__ = ["DataSplits", "Dist", "Trainer", "append_csv_row", "build_data", "init_distributed", "lr_lambda",
           "param_groups", "pick_device", "rng_state", "seed_everything", "set_rng_state"]


def __getattr__(name: str):
    if name == "Trainer":
        from bsnas.train.trainer import Trainer
        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
