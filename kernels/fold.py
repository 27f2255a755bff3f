"""FOSSIL/MiSS balance and mini: y = x Wᵀ + b + fold_r(drop(x)) D with neither padded x nor ΔW built."""

from __future__ import annotations

import torch
from torch import Tensor

from .lowrank import base_linear
from .matmul import Y_FOLD, Y_UNFOLD, matmul


class FoldLinear(torch.autograd.Function):
    """Autograd for fold_linear; saves the (tokens, r) fold instead of x."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, D: Tensor, r: int,
                mini_r: int | None, p: float, seed: int) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        M, K = x2.shape
        y = base_linear(x2, weight, bias)
        N = y.shape[1]
        f = matmul(x2, None, x2.new_empty(M, r), y_mode=Y_FOLD, fold_r=r, drop_x=(K, 1), p=p, seed=seed)
        matmul(f, D, y, accumulate=True, y_mod=(r, mini_r or N))
        ctx.save_for_backward(weight, D, f if D.requires_grad else None)
        ctx.r, ctx.mini_r, ctx.p, ctx.seed, ctx.x_shape = r, mini_r, p, seed, x.shape
        return y.view(*x.shape[:-1], N)

    @staticmethod
    def backward(ctx, gy: Tensor):
        weight, D, f = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1])
        M, N = g.shape
        r, mini_r = ctx.r, ctx.mini_r
        dx = dD = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            K = dx.shape[1]
            gD = matmul(g, D.t(), g.new_empty(M, r), y_mod=(mini_r or N, r))
            matmul(gD, None, dx, accumulate=True, y_mode=Y_UNFOLD, fold_r=r, drop_c=(K, 1),
                   p=ctx.p, seed=ctx.seed)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            g_fold = g if mini_r is None else g.view(M, N // mini_r, mini_r).sum(1)
            dD = f.t() @ g_fold
        return dx, None, None, dD, None, None, None, None
