"""The trunks' 4x4 stride-2 convolutions, with two CPU fast paths where oneDNN's kernels are slow.

``DownConv`` / ``UpConv`` are ``nn.Conv2d`` / ``nn.ConvTranspose2d`` with kernel 4, stride 2, padding 1
(same parameters, same state_dict keys, so every checkpoint loads either way). On CPU they compute the
same function with different kernels in two places, measured on 2 AVX-512-BF16 cores (batch 128, the
article's 64 px model; benchmarks/results/speed_ablation.json has the whole-step effect):

- The output layer (a transposed convolution to ONE channel, channels_last input): oneDNN's
  deconvolution takes ~4.7 ms forward for 0.13 GFLOP. Written as one matmul (every input pixel's 16
  tap contributions) plus four shifted sums per output phase, forward + backward take ~4.6 ms instead
  of ~8.2 (bf16) and ~6.4 instead of ~8.8 (fp32). With two or more output channels it is slower.
- The weight gradient of the layers whose small side is 4x4 (the encoder's last convolution, the
  decoder's first transposed one) in bf16: oneDNN's bf16 backward-weights kernel (jit_bf16, not the
  brgemm one) runs at about half the forward's speed there; gathering the 16 taps of every window and
  doing one GEMM is ~20 % faster for those layers. In fp32, or with larger maps, oneDNN is faster, so
  those keep it.

Everything else (other devices, torch.compile, other layouts and sizes) is the plain PyTorch layer.
Tests compare values and gradients against ``nn.Conv2d`` / ``nn.ConvTranspose2d`` (tests/test_cpu_conv.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# per axis, output 2m + a of a k4 s2 p1 transposed convolution receives input m + d through kernel tap k:
# the two (d, k) pairs of each output phase a
_PHASE_TAPS = {0: ((0, 1), (-1, 3)), 1: ((0, 2), (1, 0))}
_SMALL_SIDE = 16  # positions (4x4) up to which the GEMM weight gradient wins in bf16


def _cast_for_autocast(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What autocast would feed a convolution: both in the autocast dtype when it is on for CPU."""
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return x.to(dtype), w.to(dtype)
    return x, w


def _windows(t: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """t: (B, C, H, W) -> (B*oh*ow, 16*C): the 16 taps of every 4x4 stride-2 window of ``t`` padded by 1,
    columns ordered (kh, kw, c) (im2col; written out because F.unfold was 3-8x slower here on channels_last)."""
    th = F.pad(t, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H+2, W+2, C), a view for channels_last input
    taps = [th[:, kh : kh + 2 * oh : 2, kw : kw + 2 * ow : 2, :] for kh in range(4) for kw in range(4)]
    return torch.stack(taps, dim=-2).reshape(-1, 16 * t.shape[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), one row per pixel (a view for channels_last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _GemmWeightGrad(torch.autograd.Function):
    """conv2d (w: (C_out, C_in, 4, 4)) or conv_transpose2d (w: (C_in, C_out, 4, 4)), stride 2, padding 1,
    with the weight gradient as one GEMM over the 4x4 windows. For the transposed convolution x's grid is
    the output grid of the adjoint convolution of y, so the windows are those of grad y."""

    @staticmethod
    def forward(ctx, x, w, b, transposed: bool):
        ctx.save_for_backward(x, w)
        ctx.transposed = transposed
        return (F.conv_transpose2d if transposed else F.conv2d)(x, w, b, 2, 1)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            if ctx.transposed:
                gx = F.conv2d(gy, w, None, 2, 1)  # the adjoint of the transposed convolution
            else:
                gx = torch.nn.grad.conv2d_input(x.shape, w, gy, stride=2, padding=1)
        if ctx.needs_input_grad[1]:
            small, big = (x, gy) if ctx.transposed else (gy, x)  # the 4x4 side, and the side with the windows
            rows = w.shape[0]
            cols = _rows(small).t() @ _windows(big, small.shape[2], small.shape[3])  # (rows, 16 * w.shape[1])
            gw = cols.view(rows, 4, 4, w.shape[1]).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[2]:
            gb = gy.sum(dim=(0, 2, 3), dtype=torch.float32)
        return gx, gw, gb, None


def _shift_add(acc: torch.Tensor, z: torch.Tensor, dr: int, dc: int) -> None:
    """acc[..., m, n] += z[..., m + dr, n + dc] wherever that exists (dr, dc in -1, 0, 1)."""
    h, w = z.shape[-2:]
    rows_acc, rows_z = slice(max(0, -dr), h - max(0, dr)), slice(max(0, dr), h - max(0, -dr))
    cols_acc, cols_z = slice(max(0, -dc), w - max(0, dc)), slice(max(0, dc), w - max(0, -dc))
    acc[..., rows_acc, cols_acc] += z[..., rows_z, cols_z]


class _ThinConvTranspose(torch.autograd.Function):
    """conv_transpose2d(x, w, b, stride 2, padding 1) with ONE output channel, w: (C, 1, 4, 4).

    Per axis, output 2m + a sums two taps (``_PHASE_TAPS``); so z = W^T x gives every input pixel's 16
    tap values, one (B, H, W) plane per tap, each output phase is a sum of four shifted planes, and the
    phases interleave into the output. Backward: grad z is the 16 stride-2 views of grad y (the windows)."""

    @staticmethod
    def forward(ctx, x, w, b):
        bsz, c, h, wd = x.shape
        z = (w.reshape(c, 16).t() @ _rows(x).t()).view(4, 4, bsz, h, wd)  # (kh, kw, B, H, W)
        phases = []
        for a in (0, 1):
            row = []
            for a2 in (0, 1):
                (d0, k0), (d1, k1) = _PHASE_TAPS[a]
                (e0, l0), (e1, l1) = _PHASE_TAPS[a2]
                acc = z[k0, l0].clone()  # the unshifted tap (d = 0 on both axes)
                _shift_add(acc, z[k0, l1], d0, e1)
                _shift_add(acc, z[k1, l0], d1, e0)
                _shift_add(acc, z[k1, l1], d1, e1)
                row.append(acc)
            phases.append(torch.stack(row, dim=-1))  # (B, H, W, 2): column phase last
        y = torch.stack(phases, dim=2).view(bsz, 1, 2 * h, 2 * wd)  # (B, H, 2, W, 2) interleaved
        if b is not None:
            y += b.to(y.dtype)
        ctx.save_for_backward(x, w)
        ctx.bias_dtype = None if b is None else b.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        c = x.shape[1]
        gz = _windows(gy, x.shape[2], x.shape[3])  # (B*H*W, 16): grad of each pixel's 16 tap values
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gz @ w.reshape(c, 16).t()).view(x.shape[0], x.shape[2], x.shape[3], c).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            gw = (_rows(x).t() @ gz).view(c, 1, 4, 4)
        if ctx.needs_input_grad[2]:
            gb = gy.sum(dim=(0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype)
        return gx, gw, gb


def _eager_cpu(x: torch.Tensor) -> bool:
    """CPU, outside torch.compile. A compiled step measured the same with or without the fast paths (~90 ms
    against ~80 eager), so under compile the layers stay plain and Inductor gets the graph it knows."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _trains(layer: nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (layer.weight.requires_grad or x.requires_grad)


def _gemm_weight_grad(layer: nn.Module, x: torch.Tensor, transposed: bool) -> torch.Tensor | None:
    """The layer's output through ``_GemmWeightGrad`` when it runs in bf16; None otherwise (fp32 keeps oneDNN)."""
    xc, w = _cast_for_autocast(x, layer.weight)
    if xc.dtype != torch.bfloat16:
        return None
    b = None if layer.bias is None else layer.bias.to(xc.dtype)
    with torch.autocast("cpu", enabled=False):
        return _GemmWeightGrad.apply(xc, w, b, transposed)


class DownConv(nn.Conv2d):
    """4x4 stride-2 convolution, padding 1: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small = x.shape[-2] * x.shape[-1] // 4 <= _SMALL_SIDE
        if _eager_cpu(x) and small and _trains(self, x):
            y = _gemm_weight_grad(self, x, transposed=False)
            if y is not None:
                return y
        return super().forward(x)


class UpConv(nn.ConvTranspose2d):
    """4x4 stride-2 transposed convolution, padding 1: (B, C_in, H, W) -> (B, C_out, 2H, 2W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 4, 2, 1)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if not _eager_cpu(x) or output_size is not None:
            return super().forward(x, output_size)
        if self.out_channels == 1 and x.is_contiguous(memory_format=torch.channels_last):  # also inference
            xc, w = _cast_for_autocast(x, self.weight)
            with torch.autocast("cpu", enabled=False):
                return _ThinConvTranspose.apply(xc, w, self.bias)
        if x.shape[-2] * x.shape[-1] <= _SMALL_SIDE and _trains(self, x):
            y = _gemm_weight_grad(self, x, transposed=True)
            if y is not None:
                return y
        return super().forward(x)
