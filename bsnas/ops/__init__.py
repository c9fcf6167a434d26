"""Custom ops of bsnas (`torch.ops.bsnas.*`), with Python entry points."""
from bsnas.ops.masked_conv import masked_dwconv2d, masked_pwconv2d

__all__ = ["masked_dwconv2d", "masked_pwconv2d"]
