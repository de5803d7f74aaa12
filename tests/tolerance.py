"""Tolerances from the arithmetic, not from one CPU's rounding.

Another CPU (AMX, AVX-512, AVX2, ARM) or kernel library sums in another order and rounds differently; what
holds everywhere are the bounds of rounding error analysis (Higham, "Accuracy and Stability of Numerical
Algorithms", 2002): a length-n dot product or sum in floating point, in any order, is within
gamma_n = n u / (1 - n u) of the exact one, relative to sum |a_i b_i| (Lemma 3.1, eq. 3.5), u the unit
roundoff of the arithmetic (eps / 2). A layer that rounds its inputs and weights to bf16 and accumulates in
fp32 (oneDNN under autocast) adds the two roundings of the factors, 2 u_bf16. A network's first-order bound
is the sum over its layers: valid for well-conditioned quantities (normalised activations, sums of
same-sign terms), which is what the tests compare.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Relative error bound of a length-n sum or dot product in ``dtype`` (any summation order)."""
    nu = n * unit_roundoff(dtype)
    assert nu < 1, f"n = {n} is too long for {dtype}: no bound"
    return nu / (1 - nu)


def fan_in(layer: nn.Module) -> int:
    """Terms summed for one output of a convolution or linear layer (an upper bound for a transposed one)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups * int(np.prod(layer.kernel_size))


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """Its convolutions and linear layers (medivae's DownConv / UpConv are nn.Conv2d / nn.ConvTranspose2d)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]


def network_bound(model: nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """First-order relative error bound of ``model``'s output when every layer runs in ``dtype`` (bf16: its
    factors rounded to bf16, fp32 accumulation) against exact arithmetic."""
    total = 0.0
    for layer in linear_layers(model):
        rounding = 2 * unit_roundoff(dtype) if dtype != torch.float32 else 0.0
        total += rounding + gamma(fan_in(layer), torch.float32)
    return total


def rel_err(a, b) -> float:
    """Norm-wise relative error ||a - b|| / ||b||."""
    a, b = (torch.as_tensor(v).detach().to(torch.float64) for v in (a, b))
    return float((a - b).norm() / b.norm())


def assert_same_order(fast, exact, rtol: float, name: str = "") -> None:
    """Every pair of scores that ``exact`` tells apart by more than rounding of ``rtol`` relative to each can
    move ranks in ``fast`` only if the rounding exceeded its bound: those pairs keep their order."""
    fast, exact = np.asarray(fast, np.float64), np.asarray(exact, np.float64)
    d_exact = exact[:, None] - exact[None, :]
    margin = rtol * (np.abs(exact)[:, None] + np.abs(exact)[None, :])
    clear = np.abs(d_exact) > margin
    swapped = clear & (np.sign(fast[:, None] - fast[None, :]) != np.sign(d_exact))
    assert clear.any(), f"{name}: no pair is clearly apart; the test cannot tell"
    assert not swapped.any(), f"{name}: {int(swapped.sum()) // 2} clearly ordered pairs swapped"


def mean_bound(x: torch.Tensor, dim) -> torch.Tensor:
    """Rounding bound of an fp32 mean of ``x`` over ``dim`` (any summation order): gamma(n) mean |x|, n the
    number of terms in each mean."""
    x = x.detach().double()
    n = x.numel() // x.mean(dim).numel()
    return gamma(n) * x.abs().mean(dim)


def std_rel_bound(x: torch.Tensor, dim) -> torch.Tensor:
    """Relative rounding bound of an fp32 standard deviation over ``dim`` (any order): gamma(n) times the
    condition number rms(x) / std(x) of the variance (Chan, Golub & LeVeque 1983: the bound of the updating
    algorithm torch uses); the square root would halve it, kept as a margin."""
    x = x.detach().double()
    n = x.numel() // x.mean(dim).numel()
    return gamma(n) * x.pow(2).mean(dim).sqrt() / x.std(dim)
