"""Blocking collectives (torch.distributed) whose tensors are never freed on a
communication thread.

gloo runs a collective on a worker thread, which drops its reference to the finished
work a moment after `wait()` returns. If that reference is the last one, the worker
destroys the work and with it the last C++ references to the tensors; for tensors that
Python created, that needs the GIL. Late in a run (the final `all_gather` of a rank
that exits at once) the worker can reach that point while the interpreter is
finalizing: it is then made to exit and the process aborts ("terminate called without
an active exception"; a core dump showed `ProcessGroupGloo::runLoop` in
`~AsyncAllgatherWork`, in `decref_pyobject`, taking the GIL during `Py_FinalizeEx`).
Here every collective is started with `async_op=True`, waited for, and its work kept
among the last few, so the worker's reference is never the last: the work is freed
later on the Python thread."""
from __future__ import annotations

import pickle
from collections import deque
from typing import Any, Sequence

import torch
import torch.distributed as dist

# Finished works, newest last; each is long done on its worker by the time it falls out.
_FINISHED: deque = deque(maxlen=8)


def _wait(work) -> None:
    work.wait()
    _FINISHED.append(work)


def all_reduce(tensor: torch.Tensor) -> None:
    """Sum `tensor` over all ranks, in place."""
    _wait(dist.all_reduce(tensor, async_op=True))


def all_gather(out: list[torch.Tensor], tensor: torch.Tensor) -> None:
    """`out[r]` = rank r's `tensor`."""
    _wait(dist.all_gather(out, tensor, async_op=True))


def broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite `tensor` on every rank with rank `src`'s, in place."""
    _wait(dist.broadcast(tensor, src, async_op=True))


def broadcast_object(obj: Any, src: int = 0, device: torch.device | str = "cpu") -> Any:
    """Rank `src`'s `obj` (pickled; other ranks pass anything, e.g. None), returned on
    every rank. Two broadcasts on `device` (CUDA for NCCL): the size, then the bytes."""
    mine = dist.get_rank() == src
    payload = pickle.dumps(obj) if mine else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    broadcast(size, src)
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if mine
            else torch.empty(int(size), dtype=torch.uint8, device=device))
    broadcast(data, src)
    return obj if mine else pickle.loads(data.cpu().numpy().tobytes())


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each of `tensors` (any shapes, one dtype and device; views allowed) by its
    mean over all ranks, in place, with a single all-reduce of their concatenation."""
    if not tensors:
        return
    dtype, device = tensors[0].dtype, tensors[0].device
    if any(t.dtype != dtype or t.device != device for t in tensors):
        raise ValueError("all_reduce_mean_: tensors must share one dtype and device, got "
                         f"{sorted({(str(t.dtype), str(t.device)) for t in tensors})}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
