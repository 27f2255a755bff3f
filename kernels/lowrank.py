"""Low-rank linear y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ: cuBLAS base, Triton shrink/expand with in-kernel dropout."""

from __future__ import annotations

import torch
from torch import Tensor

from .matmul import matmul, split_count


def base_linear(x2: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x Wᵀ (+ b) for 2-D x by cuBLAS; any strides of W (GPT-2 Conv1D passes a transposed view)."""
    return x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())


class LowRankLinear(torch.autograd.Function):
    """Autograd for lowrank_linear; keeps no dropout mask (the kernels redraw it from the seed)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                scale: float, p: float, seed: int) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        M, K = x2.shape
        y = base_linear(x2, weight, bias)
        h = matmul(x2, A.t(), x2.new_empty(M, A.shape[0]), drop_x=(K, 1), p=p, seed=seed)
        matmul(h, B.t(), y, scale=scale, accumulate=True)
        ctx.save_for_backward(x2 if A.requires_grad else None, weight, A, B, h if B.requires_grad else None)
        ctx.scale, ctx.p, ctx.seed, ctx.x_shape = scale, p, seed, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy: Tensor):
        x2, weight, A, B, h = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        g = gy.reshape(-1, gy.shape[-1])
        s, p, seed = ctx.scale, ctx.p, ctx.seed
        gB = g @ B if need_x or need_a else None
        dx = dA = dB = None
        if need_x:
            dx = g @ weight
            K = dx.shape[1]
            matmul(gB, A, dx, scale=s, accumulate=True, drop_c=(K, 1), p=p, seed=seed)
            dx = dx.view(ctx.x_shape)
        if need_a:
            dA = _grad_a(x2, gB, s, p, seed)
        if need_b:
            dB = (g.t() @ h).mul_(s)
        return dx, None, None, dA, dB, None, None, None


def _grad_a(x2: Tensor, gB: Tensor, s: float, p: float, seed: int) -> Tensor:
    """dA = s·(gB)ᵀ drop(x): cuBLAS without dropout, else the kernel redrawing the mask on xᵀ."""
    if p == 0:
        return (gB.t() @ x2).mul_(s)
    M, K = x2.shape
    dA = gB.new_empty(gB.shape[1], K)
    matmul(x2.t(), gB, dA.t(), scale=s, drop_x=(1, K), p=p, seed=seed,
           splits=split_count(K, gB.shape[1], M))
    return dA
