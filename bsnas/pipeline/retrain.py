"""Retraining a found architecture (`bsnas retrain --arch A.json --config C [--checkpoint K]`).

The architecture is exported as a plain-PyTorch model (`bsnas.export`), either with the
weights it inherits from the supernet checkpoint (`retrain.inherit: true`, fine-tuning;
its BN statistics are first recalibrated on the calibration images) or freshly
initialised (`retrain.inherit: false`, from scratch). It is trained for `retrain.epochs`
epochs with SGD (momentum, Nesterov and weight decay from `train.*`; learning rate
`retrain.lr` per 256 images, scaled linearly to the batch size, cosine or linear decay
as `train.schedule`) on the training images (the held-out split stays out), and
evaluated on the validation set. Outputs in the output folder:

    retrain.json      validation top-1/top-5, MACs, parameters, latency measured on the
                      current device (batch 1: median of repeats after warm-up), history
    retrain_log.csv   one row per epoch
    model.pt          the retrained model (`torch.load(path, weights_only=False)`)
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bsnas.evaluator import evaluate
from bsnas.export import export
from bsnas.nn import recalibrate_bn
from bsnas.profiler import cost
from bsnas.profiler.latency import time_module
from bsnas.space import Arch, load_space
from bsnas.supernet import Supernet
from bsnas.train.checkpoint import load_checkpoint, save_json_atomic
from bsnas.train.runtime import (Dist, append_csv_row, build_data, lr_lambda, param_groups, pick_device,
                                 seed_everything)

__all__ = ["measure_latency", "reinitialize", "retrain"]

log = logging.getLogger(__name__)


def reinitialize(model: nn.Module) -> nn.Module:
    """Fresh weights for training from scratch (torchvision's MobileNetV2 init): convs
    Kaiming-normal (fan out), BN weight 1 and bias 0 with reset statistics, linear
    N(0, 0.01) with bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def measure_latency(model: nn.Module, space, device: torch.device, warmup: int = 10,
                    repeats: int = 50) -> dict:
    """Latency of `model` in eval mode on one `[1, C, R, R]` image on `device`: the
    median of `repeats` timed runs after `warmup` runs, in milliseconds."""
    x = torch.randn(1, space.in_channels, space.resolution, space.resolution, device=device)
    was_training = model.training
    model.eval()
    try:
        ms = time_module(model, x, warmup, repeats)
    finally:
        model.train(was_training)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"median_ms": ms, "device": device.type, "device_name": name,
            "threads": torch.get_num_threads(), "batch_size": 1, "warmup": warmup, "repeats": repeats}


def train_epoch(model: nn.Module, loader, optimizer, scheduler,
                label_smoothing: float) -> list[float]:
    """One epoch of plain supervised training (cross-entropy, a scheduler step per batch);
    returns the batch losses."""
    model.train()
    losses = []
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def retrain(cfg, arch: Arch, checkpoint: str | None = None, out_dir: str | None = None,
            supernet: Supernet | None = None, data=None,
            progress: Callable[[str], None] | None = None) -> dict:
    """Retrain `arch` with the settings of `cfg` (see the module doc) and write the
    outputs into `out_dir` (default `<cfg.out_dir>/retrain`); returns the report dict.
    Weights are inherited from `supernet`, or else from the `checkpoint` file, when
    `cfg.retrain.inherit`; `data` (as `bsnas.train.runtime.build_data` makes it) is built from
    `cfg` when not given."""
    tic = time.perf_counter()
    r, t = cfg.retrain, cfg.train
    out_dir = out_dir or os.path.join(cfg.out_dir, "retrain")
    d = Dist()
    device = pick_device(cfg.device, d, cfg.keep_freed_memory)
    seed_everything(cfg.seed, cfg.deterministic)
    if supernet is None and checkpoint is not None:
        ckpt = load_checkpoint(checkpoint, map_location=device)
        supernet, _ = Supernet.from_checkpoint(ckpt, map_location=device)
    if r.inherit and supernet is None:
        raise ValueError("retrain.inherit is true but no supernet checkpoint was given "
                         "(--checkpoint); set retrain.inherit=false to train from scratch")
    space = supernet.space if supernet is not None else load_space(cfg.space)
    space.validate(arch)
    if data is None:
        data = build_data(cfg, space, device, d)

    if r.inherit:
        model = export(supernet, arch).to(device)
        recalibrate_bn(model, data.calib)
    else:
        model = reinitialize(export(Supernet(space), arch)).to(device)
    report = {"arch": arch.to_dict(), "inherit": bool(r.inherit), "epochs": r.epochs,
              "macs": cost.flops(space, arch), "params": cost.params(space, arch)}
    if r.inherit:
        start = evaluate(model, data.val)
        report.update(inherited_val_top1=start["top1"], inherited_val_top5=start["top5"])

    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "retrain_log.csv")
    if os.path.exists(log_path):
        os.unlink(log_path)
    steps = r.epochs * len(data.train)
    optimizer = torch.optim.SGD(param_groups(model, t.weight_decay),
                                lr=r.lr * cfg.data.batch_size / 256, momentum=t.momentum,
                                nesterov=t.nesterov and t.momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, steps), 0, t.schedule))
    history = []
    for epoch in range(r.epochs):
        data.train.set_epoch(epoch)
        losses = train_epoch(model, data.train, optimizer, scheduler, t.label_smoothing)
        val = evaluate(model, data.val)
        row = {"epoch": epoch + 1, "train_loss": sum(losses) / max(1, len(losses)),
               "val_top1": val["top1"], "val_top5": val["top5"], "lr": scheduler.get_last_lr()[0]}
        history.append(row)
        append_csv_row(log_path, row)
        line = (f"retrain epoch {epoch + 1}/{r.epochs}: loss {row['train_loss']:.4f}, "
                f"val top-1 {val['top1']:.4f}")
        log.info(line)
        if progress is not None:
            progress(line)

    final = evaluate(model, data.val)
    report.update(val_top1=final["top1"], val_top5=final["top5"], val_loss=final["loss"],
                  val_samples=final["samples"], latency=measure_latency(model, space, device),
                  history=history, seconds=round(time.perf_counter() - tic, 3))
    model.eval()
    torch.save(model, os.path.join(out_dir, "model.pt"))
    save_json_atomic(report, os.path.join(out_dir, "retrain.json"))
    log.info("retrained %s: val top-1 %.4f, top-5 %.4f, %.2fM MACs, %d params, %.3f ms on %s",
             arch, report["val_top1"], report["val_top5"], report["macs"] / 1e6, report["params"],
             report["latency"]["median_ms"], report["latency"]["device_name"])
    return report
