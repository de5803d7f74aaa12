"""Convolutional trunks shared by the model families (the seed article's layout, generalised)."""

from __future__ import annotations

import math
from contextlib import contextmanager

from torch import nn

from medivae.models.cpu_conv import DownConv, UpConv


def widths_for(image_size: int, base_width: int, max_width: int) -> list[int]:
    """Channel widths of the stride-2 stages, enough to reach a 4x4 feature map.

    64 px, base 32 -> [32, 64, 128, 256] (the article); 32 px -> 3 stages; 128 -> 5; 256 -> 6.
    """
    depth = int(math.log2(image_size // 4))
    return [min(base_width * 2**i, max_width) for i in range(depth)]


def encoder_trunk(in_channels: int, widths: list[int]) -> nn.Sequential:
    """(B, in_channels, S, S) -> (B, widths[-1] * 16): 4x4 stride-2 convs with BatchNorm + ReLU."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers += [DownConv(c, w), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c = w
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def decoder_trunk(out_channels: int, widths: list[int]) -> nn.Sequential:
    """(B, widths[-1] * 16) -> (B, out_channels, S, S): the mirror of ``encoder_trunk``, no output activation."""
    rev = widths[::-1]
    layers: list[nn.Module] = [nn.Unflatten(1, (rev[0], 4, 4))]
    for a, b in zip(rev[:-1], rev[1:], strict=True):
        layers += [UpConv(a, b), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]
    layers.append(UpConv(rev[-1], out_channels))
    return nn.Sequential(*layers)


@contextmanager
def running_batchnorm(module: nn.Module):
    """Within the block every BatchNorm of ``module`` normalises with its running statistics and leaves
    them as they are (eval mode), whatever mode the rest of the model is in; gradients still flow. For
    inputs that are not a training batch (a VampPrior's pseudo-inputs, prior samples in a GAN step),
    whose own batch statistics would differ from what the network sees at sampling time and would
    leak into the running averages."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()
    try:
        yield module
    finally:
        for m, mode in zip(norms, modes, strict=True):
            m.train(mode)
