"""The trunks' convolutions compute what nn.Conv2d / nn.ConvTranspose2d compute, on every CPU path."""

from __future__ import annotations

import pytest
import torch

from medivae.models.cpu_conv import DownConv, UpConv

from tolerance import gamma, rel_err, unit_roundoff


def twin(layer: torch.nn.Module) -> torch.nn.Module:
    """The plain PyTorch layer with the same weights (strict state_dict load: same keys and shapes)."""
    plain_cls = torch.nn.Conv2d if isinstance(layer, DownConv) else torch.nn.ConvTranspose2d
    plain = plain_cls(layer.in_channels, layer.out_channels, 4, 2, 1)
    plain.load_state_dict(layer.state_dict())
    return plain


def run(layer, x, g, bf16: bool):
    """Output and gradients (input, weight, bias) of ``layer`` for upstream gradient ``g``."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    grads = torch.autograd.grad(y, [x, layer.weight, layer.bias], g.to(y.dtype))
    return y, [t.float() for t in (y, *grads)]


def make(kind: str, c_in: int, c_out: int, size: int, channels_last: bool, seed: int = 0):
    torch.manual_seed(seed)
    layer = (DownConv if kind == "down" else UpConv)(c_in, c_out)
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)  # a visible bias: the output layer trains its own
    x = torch.randn(5, c_in, size, size)  # odd batch: nothing assumes a multiple of anything
    if channels_last:
        layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out = size // 2 if kind == "down" else size * 2
    return layer, x, torch.randn(5, c_out, out, out)


# (kind, c_in, c_out, input size, the autograd node that shows which path ran)
CASES = [
    ("up", 6, 1, 8, "_ThinConvTransposeBackward"),  # the output layer, fp32 and bf16
    ("down", 6, 10, 8, "_GemmWeightGradBackward"),  # 8x8 -> 4x4: the encoder's last layer
    ("up", 10, 6, 4, "_GemmWeightGradBackward"),  # 4x4 -> 8x8: the decoder's first layer
]


@pytest.mark.parametrize("kind,c_in,c_out,size,node", CASES)
def test_bf16_paths_match_the_plain_layer_under_autocast(kind, c_in, c_out, size, node):
    layer, x, g = make(kind, c_in, c_out, size, channels_last=True)
    y, ours = run(layer, x, g, bf16=True)
    assert type(y.grad_fn).__name__.startswith(node)  # the fast path, not the fallback
    assert y.dtype == torch.bfloat16
    _, ref = run(twin(layer), x, g, bf16=True)
    _, exact = run(twin(layer).double(), x.double(), g.double(), bf16=False)
    for name, a, b, e in zip(("output", "grad x", "grad w", "grad b"), ours, ref, exact, strict=True):
        # bf16 rounding: ours is as close to the float64 answer as oneDNN's bf16 kernel is, give or take one
        # rounding of the factors to bf16 (2 u) and of the result (u)
        assert rel_err(a, e.float()) < 2 * rel_err(b, e.float()) + 3 * unit_roundoff(torch.bfloat16), name


def test_thin_output_layer_matches_in_fp32():
    layer, x, g = make("up", 6, 1, 8, channels_last=True)
    y, ours = run(layer, x, g, bf16=False)
    assert type(y.grad_fn).__name__.startswith("_ThinConvTransposeBackward")
    _, ref = run(twin(layer), x, g, bf16=False)
    _, exact = run(twin(layer).double(), x.double(), g.double(), bf16=False)
    # another summation order than oneDNN's: as close to the float64 answer as it, give or take the bound of
    # an fp32 sum as long as the longest reduction (the weight gradient sums over batch and positions)
    bound = gamma(x.numel())
    for name, a, b, e in zip(("output", "grad x", "grad w", "grad b"), ours, ref, exact, strict=True):
        assert rel_err(a, e.float()) <= 2 * rel_err(b, e.float()) + bound, name
    with torch.no_grad():  # inference takes the same path
        assert rel_err(layer(x), exact[0].float()) <= 2 * rel_err(twin(layer)(x), exact[0].float()) + bound


@pytest.mark.parametrize(
    "kind,c_in,c_out,size,bf16,channels_last",
    [
        ("down", 6, 10, 8, False, True),  # fp32
        ("down", 6, 10, 16, True, True),  # larger maps
        ("up", 10, 6, 8, True, True),
        ("up", 10, 6, 4, False, True),
        ("up", 10, 2, 8, True, True),  # two output channels
        ("up", 6, 1, 8, True, False),  # a contiguous (NCHW) model
    ],
)
def test_other_cases_are_the_plain_layer(kind, c_in, c_out, size, bf16, channels_last):
    """Where oneDNN is as fast or faster, the layer is nn.Conv2d's / nn.ConvTranspose2d's own."""
    layer, x, g = make(kind, c_in, c_out, size, channels_last)
    y, ours = run(layer, x, g, bf16=bf16)
    assert type(y.grad_fn).__name__ in ("ConvolutionBackward0", "ToCopyBackward0")
    _, ref = run(twin(layer), x, g, bf16=bf16)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def test_compiled_layers_are_the_plain_layers(monkeypatch):
    """Under torch.compile the layers trace as the plain ones (Inductor lowers those to oneDNN)."""
    layer, x, g = make("up", 6, 1, 8, channels_last=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what the layer sees while traced
    y, _ = run(layer, x, g, bf16=False)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0"
