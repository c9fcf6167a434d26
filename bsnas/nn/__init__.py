"""Modules of bsnas: the spring block, its building pieces and the static twins."""
from bsnas.nn.batchnorm import DynamicBatchNorm2d, recalibrate_bn
from bsnas.nn.masked_conv import MaskedDepthwiseConv2d, MaskedPointwiseConv2d
from bsnas.nn.spring_block import SpringBlock
from bsnas.nn.static import StaticMBConv

__all__ = ["DynamicBatchNorm2d", "MaskedDepthwiseConv2d", "MaskedPointwiseConv2d",
           "SpringBlock", "StaticMBConv", "recalibrate_bn"]
