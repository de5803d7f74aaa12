"""A learned prior over a VQ-VAE's code grid: a small causal transformer (GPT-style, pre-LayerNorm)
over the codes in raster order, as in VQGAN (Esser et al. 2021) and the autoregressive priors of
VQ-VAE (van den Oord et al. 2017, a PixelCNN) and VQ-VAE-2 (Razavi et al. 2019, PixelSNAIL).

Why a transformer and not a gated PixelCNN: drawing a 16x16 grid takes 256 sequential steps. A
PixelCNN recomputes the whole grid at every step; the transformer keeps each layer's keys and values
(a KV cache) and computes one position per step, about 100x less work on a CPU.

p(c | y) = prod_i p(c_i | c_<i, y). The sequence fed in is [start(y), c_0, ..., c_{L-2}] and position i
predicts c_i; the start token is one learned vector per class (one in all for an unconditional prior).
The output layer starts at zero, so an untrained prior is exactly uniform (log K nats per code): the
VQ-VAE's negative ELBO then has the constant KL term of the paper's uniform prior until the prior trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medivae.runtime.device import full_precision


class _Block(nn.Module):
    """Pre-LN transformer block: causal self-attention, then a 4x MLP, each with a residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor, cache: dict | None = None, length: int = 0) -> torch.Tensor:
        """h: (B, T, W). With ``cache`` (sampling, T = 1) h is the next position: its key and value go into
        buffers of ``length`` positions, allocated once (concatenating them every step took a quarter of
        the sampling time), and its query sees every position so far."""
        b, t, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(w, dim=2)
        q, k, v = (a.view(b, t, self.heads, w // self.heads).transpose(1, 2) for a in (q, k, v))  # (B, nh, T, hd)
        if cache is not None:
            if "k" not in cache:
                cache["k"], cache["v"], cache["n"] = k.new_empty(b, self.heads, length, k.shape[-1]), \
                    v.new_empty(b, self.heads, length, v.shape[-1]), 0
            n = cache["n"] + t
            cache["k"][:, :, cache["n"] : n], cache["v"][:, :, cache["n"] : n], cache["n"] = k, v, n
            k, v = cache["k"][:, :, :n], cache["v"][:, :, :n]
        with full_precision(h.device.type):  # CPU flash attention is faster in fp32 than in bf16
            a = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=cache is None).to(q.dtype)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.ln2(h))


def code_nll(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """-log p(codes) in nats per sequence, float (B,), of logits (B, L, K) for codes int64 (B, L); in fp32.
    The logits are flattened to (B*L, K), not transposed to (B, K, L): cross-entropy then reads them in place
    instead of copying a strided view."""
    b, length, k = logits.shape
    nll = F.cross_entropy(logits.float().reshape(b * length, k), codes.reshape(-1), reduction="none")
    return nll.view(b, length).sum(1)


def top_k_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (n, K) with all but the k largest of each row set to -inf (k = 0 or >= K: unchanged). Ties at the
    k-th value are all kept, so the result does not depend on how topk orders equal values."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[:, -1:]  # (n, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


class CodePrior(nn.Module):
    """Autoregressive prior over ``length`` codes from a codebook of ``codebook_size``."""

    def __init__(self, codebook_size: int, length: int, width: int, layers: int, heads: int, num_classes: int):
        super().__init__()
        self.codebook_size, self.length = codebook_size, length
        self.tok = nn.Embedding(codebook_size, width)
        self.start = nn.Embedding(max(1, num_classes), width)  # one start token per class
        self.pos = nn.Parameter(torch.randn(length, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, codebook_size)
        nn.init.zeros_(self.head.weight)  # an untrained prior is uniform (see the module docstring)
        nn.init.zeros_(self.head.bias)

    def _start(self, n: int, y: torch.Tensor | None, device) -> torch.Tensor:
        y = torch.zeros(n, dtype=torch.long, device=device) if y is None else y.to(device).long()
        return self.start(y)[:, None]  # (n, 1, W)

    def forward(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """codes: int64 (B, L) in raster order -> logits float (B, L, K) of p(c_i | c_<i, y)."""
        h = torch.cat([self._start(len(codes), y, codes.device), self.tok(codes[:, :-1])], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def nll(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(codes | y) in nats per sequence, float (B,). codes: int64 (B, L)."""
        return code_nll(self(codes, y), codes)

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
        """n code sequences int64 (n, L) on the model's device. Each step's categorical draw is made on the
        CPU with ``generator`` (so a seed gives the same codes on every device); logits are divided by T.
        ``top_k`` > 0: each draw is restricted to the ``top_k`` most likely codes (1: the greedy mode)."""
        device = self.pos.device
        caches = [{} for _ in self.blocks]
        h = self._start(n, y, device) + self.pos[0]
        out = torch.empty(n, self.length, dtype=torch.long)
        for i in range(self.length):
            for block, cache in zip(self.blocks, caches, strict=True):
                h = block(h, cache, self.length)
            logits = top_k_logits(self.head(self.norm(h[:, -1])).float().cpu() / temperature, top_k)  # (n, K)
            out[:, i] = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
            if i + 1 < self.length:
                h = self.tok(out[:, i].to(device))[:, None] + self.pos[i + 1]
        return out.to(device)
