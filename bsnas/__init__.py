"""bsnas: BS-NAS, broadening-and-shrinking one-shot NAS with searchable channel numbers."""
import torch  # noqa: F401  (loads libtorch, which bsnas._C links against)

from bsnas import _C
from bsnas.ops import masked_dwconv2d, masked_pwconv2d
from bsnas import cost
from bsnas.arch import Arch, LayerChoice
from bsnas.enabled import EnabledSpace
from bsnas.export import export
from bsnas.space import SearchSpace, load_space
from bsnas.supernet import Supernet

__version__ = "0.1.0"
__all__ = ["cuda_compiled", "masked_dwconv2d", "masked_pwconv2d"]
__all__ += ["Arch", "EnabledSpace", "LayerChoice", "SearchSpace", "Supernet", "cost", "export", "load_space"]


def cuda_compiled() -> bool:
    """Whether the CUDA kernels were compiled into this build of bsnas._C."""
    return bool(_C.cuda_compiled())
