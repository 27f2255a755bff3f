"""Plain torch implementations of the adapter linears: the CPU path and the oracle of the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def torch_dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """Float32 dropout multiplier (0 or 1/(1-p)) drawn from a torch generator seeded with `seed`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.float() / (1.0 - p)


def _drop(x: Tensor, mask: Tensor | None) -> Tensor:
    """x times the dropout multiplier, or x itself without one."""
    return x if mask is None else x * mask.to(x.dtype)


def lowrank_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                             scale: float, mask: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b + scale·(drop(x) Aᵀ) Bᵀ, as PEFT's LoRA layer computes it."""
    return F.linear(x, weight, bias) + F.linear(F.linear(_drop(x, mask), A), B) * scale


def fold(x: Tensor, r: int) -> Tensor:
    """f_j = Σ_g x[..., g·r + j]: zero-pad the last dim to a multiple of r and sum the groups."""
    pad = -x.shape[-1] % r
    return F.pad(x, (0, pad)).unflatten(-1, (-1, r)).sum(-2)


def fold_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, D: Tensor, r: int,
                          mini_r: int | None = None, mask: Tensor | None = None) -> Tensor:
    """y = x Wᵀ + b + fold_r(drop(x)) D, D tiled along the output for the mini variant (PEFT MiSS)."""
    if mini_r is not None:
        D = D.repeat(1, weight.shape[0] // mini_r)
    return F.linear(x, weight, bias) + fold(_drop(x, mask), r) @ D


def bat_weight(weight: Tensor, D: Tensor) -> Tensor:
    """W' with blocks W'_{b,c} = W_{b,c}(I + D_b) + D_b (output block b, input block c)."""
    r = D.shape[-1]
    out, inp = weight.shape
    blocks = weight.reshape(out // r, r, inp // r, r)
    affine = torch.einsum("bpct,btq->bpcq", blocks, D) + D[:, :, None, :]
    return (blocks + affine).reshape(out, inp)


def bat_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, D: Tensor) -> Tensor:
    """y = x W'ᵀ + b with the block-affine W' of FOSSIL/MiSS bat (PEFT applies no dropout there)."""
    return F.linear(x, bat_weight(weight, D), bias)
