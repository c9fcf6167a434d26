"""bsnas: BS-NAS, broadening-and-shrinking one-shot NAS with searchable channel numbers.

Importing the package loads the compiled ops (`bsnas.extension`) and the model-level
API below; training, search and the pipeline load only when imported.
"""
from bsnas.extension import _C, cuda_compiled
from bsnas.ops import masked_dwconv2d, masked_pwconv2d
from bsnas.profiler import cost
from bsnas.space import Arch, EnabledSpace, LayerChoice, SearchSpace, load_space
from bsnas.supernet import Supernet
from bsnas.export import export

__version__ = "0.1.0"
__all__ = ["cuda_compiled", "masked_dwconv2d", "masked_pwconv2d"]
__all__ += ["Arch", "EnabledSpace", "LayerChoice", "SearchSpace", "Supernet", "cost", "export", "load_space"]
