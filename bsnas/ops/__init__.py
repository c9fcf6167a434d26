"""Custom ops of bsnas (`torch.ops.bsnas.*`), with Python entry points."""
from bsnas.ops.bn_act import bn_act
from bsnas.ops.bn_act_dwconv import ACTIVATION_CODES, bn_act_dwconv2d, bn_train_act_dwconv2d
from bsnas.ops.bn_from_sums import bn_affine_from_sums, bn_update_running_stats_
from bsnas.ops.channel_stats import channel_stats
from bsnas.ops.masked_conv import masked_dwconv2d, masked_pwconv2d
from bsnas.ops.mbconv_folded import mbconv_folded
from bsnas.ops.mbconv_train import mbconv_train

__all__ = ["ACTIVATION_CODES", "bn_act", "bn_act_dwconv2d", "bn_affine_from_sums",
           "bn_update_running_stats_", "bn_train_act_dwconv2d", "channel_stats",
           "masked_dwconv2d", "masked_pwconv2d", "mbconv_folded", "mbconv_train"]
