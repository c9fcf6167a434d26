"""bsnas: BS-NAS, broadening-and-shrinking one-shot NAS with searchable channel numbers."""
from bsnas import _C
from bsnas.ops import masked_dwconv2d, masked_pwconv2d

__version__ = "0.1.0"
__all__ = ["cuda_compiled", "masked_dwconv2d", "masked_pwconv2d"]


def cuda_compiled() -> bool:
    """Whether the CUDA kernels were compiled into this build of bsnas._C."""
    return bool(_C.cuda_compiled())
