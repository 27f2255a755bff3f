"""FOSSIL/MiSS bat: y = x W'ᵀ + b with W'_{b,c} = W_{b,c}(I + D_b) + D_b built tile by tile in the matmul."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .matmul import dot_precision, launch
from .reference import bat_weight

MAX_R = 64  # a block of r×r weights and one of D sit in registers/shared memory: larger r takes the torch path


@triton.jit
def _bat_kernel(x_ptr, w_ptr, d_ptr, bias_ptr, y_ptr, M, K, r,
                sxm, sxk, swn, swk, sdb, sdt, sdq, sym, syn,
                HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, RP: tl.constexpr):
    """y[:, block b] = Σ_c x[:, block c] · (W_{b,c}(I + D_b) + D_b)ᵀ for one output block b of r rows."""
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    rp = tl.arange(0, RP)
    pmask = rp < r
    square = pmask[:, None] & pmask[None, :]
    rows = b * r + rp
    d = tl.load(d_ptr + b * sdb + rp[:, None] * sdt + rp[None, :] * sdq, mask=square, other=0.0)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for c0 in range(0, K, r):
        cols = c0 + rp
        xt = tl.load(x_ptr + rm[:, None] * sxm + cols[None, :] * sxk,
                     mask=(rm < M)[:, None] & pmask[None, :], other=0.0)
        wt = tl.load(w_ptr + rows[:, None] * swn + cols[None, :] * swk, mask=square, other=0.0)
        w_new = tl.dot(wt, d, wt.to(tl.float32) + d.to(tl.float32), input_precision=PRECISION)
        acc = tl.dot(xt, tl.trans(w_new.to(xt.dtype)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=pmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * sym + rows[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm < M)[:, None] & pmask[None, :])


def bat_forward(x2: Tensor, weight: Tensor, bias: Tensor | None, D: Tensor) -> Tensor:
    """The bat layer's output for 2-D x, W' never stored."""
    M, K = x2.shape
    N, r = weight.shape[0], D.shape[-1]
    y = x2.new_empty(M, N)
    if M == 0:
        return y
    BM = 64
    launch(_bat_kernel, (triton.cdiv(M, BM), N // r), x2, weight, D, bias if bias is not None else D, y, M, K, r,
           *x2.stride(), *weight.stride(), *D.stride(), *y.stride(),
           HAS_BIAS=bias is not None, PRECISION=dot_precision(x2.dtype), BM=BM, RP=max(16, triton.next_power_of_2(r)))
    return y


class BatLinear(torch.autograd.Function):
    """Autograd for bat_linear: Triton forward; the backward builds W' once with torch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, D: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight, D)
        ctx.x_shape = x.shape
        y = bat_forward(x2, weight, bias, D)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy: Tensor):
        x2, weight, D = ctx.saved_tensors
        g = gy.reshape(-1, gy.shape[-1])
        with torch.enable_grad():
            d = D.detach().requires_grad_()
            w_new = bat_weight(weight, d)
        dx = (g @ w_new.detach()).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        dD = torch.autograd.grad(w_new, d, g.t() @ x2)[0] if ctx.needs_input_grad[3] else None
        return dx, None, None, dD
