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

from collections import deque

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
