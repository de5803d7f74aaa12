"""Networks shared by the model families: the convolutional trunks (the seed article's layout, generalised),
the residual block of VQ-VAE (van den Oord et al. 2017) and the spectral-norm PatchGAN discriminator
(Isola et al. 2017; Miyato et al. 2018) of the adversarial families."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

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


class Residual(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))): VQ-VAE's residual block, (B, width, H, W) -> the same shape."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(width, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def stage_widths(width: int, stages: int) -> list[int]:
    """Channels after each stride-2 stage, from the image side, halving towards the image (at least 8):
    width 64, 2 stages -> [32, 64]."""
    return [max(width // 2 ** (stages - 1 - i), 8) for i in range(stages)]


def residual_encoder(in_channels: int, out_channels: int, downsample: int, width: int, res_blocks: int,
                     res_width: int) -> nn.Sequential:
    """VQ-VAE's encoder, (B, in, H, W) -> (B, out, H/d, W/d), d = ``downsample`` (a power of 2): 4x4 stride-2
    convs with ReLU, a 3x3 conv to ``width``, ``res_blocks`` residual blocks, ReLU and a 1x1 conv."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in stage_widths(width, int(math.log2(downsample))):
        layers += [DownConv(c, w), nn.ReLU()]
        c = w
    layers.append(nn.Conv2d(c, width, 3, padding=1))
    layers += [Residual(width, res_width) for _ in range(res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(width, out_channels, 1)]
    return nn.Sequential(*layers)


def residual_decoder(in_channels: int, out_channels: int, downsample: int, width: int, res_blocks: int,
                     res_width: int) -> nn.Sequential:
    """The mirror of :func:`residual_encoder`, (B, in, h, w) -> (B, out, h*d, w*d) pre-activation: a 3x3 conv,
    residual blocks, ReLU, 4x4 stride-2 transposed convs (the last one to ``out_channels``)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
    layers += [Residual(width, res_width) for _ in range(res_blocks)]
    layers.append(nn.ReLU())
    widths = stage_widths(width, int(math.log2(downsample)))[::-1]  # [width, ..., smallest]
    c = width
    for w in widths[1:]:
        layers += [UpConv(c, w), nn.ReLU()]
        c = w
    layers.append(UpConv(c, out_channels))
    return nn.Sequential(*layers)


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) in [0, 1] -> patch logits (B, H / 2^L, W / 2^L) and the features of every layer: 4x4
    stride-2 convolutions with spectral normalisation and LeakyReLU, no BatchNorm (its statistics would mix
    real and fake batches)."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        blocks, c = [], channels
        for i in range(layers):
            w = width * 2 ** min(i, 3)
            blocks.append(nn.Sequential(spectral_norm(nn.Conv2d(c, w, 4, 2, 1)), nn.LeakyReLU(0.2)))
            c = w
        self.blocks = nn.ModuleList(blocks)
        self.head = spectral_norm(nn.Conv2d(c, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats, h = [], x * 2.0 - 1.0
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return self.head(h)[:, 0].float(), feats
