"""The compiled library `bsnas._C`: the one place that loads it.

Loading it registers the `torch.ops.bsnas.*` operators (CPU kernels always, CUDA kernels
when it was built with them) and exposes build facts (`_C.cuda_compiled()`,
`_C.cpu_isa()`, `_C.cpu_llc_bytes()`). Everything else imports `_C` from here, so a
missing or stale build fails once, with an error that says how to build it.
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch, which bsnas._C links against)

try:
    import bsnas._C as _C
except ImportError as e:  # not built, or built against another torch / Python
    raise ImportError(
        f"bsnas._C, the compiled extension of bsnas, could not be loaded ({e}); build it in "
        f"place with `make build` or `python setup.py build_ext --inplace` (rebuild it after "
        f"changing torch or Python)") from e

__all__ = ["_C", "cuda_compiled"]


def cuda_compiled() -> bool:
    """Whether the CUDA kernels were compiled into this build of bsnas._C."""
    return bool(_C.cuda_compiled())
