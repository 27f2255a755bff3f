"""One Triton matmul with the options the adapter kernels need: in-kernel dropout, fold matrices, in-place add."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Y operand modes: a tensor in memory, or the 0/1 fold matrix P (P[k, n] = k mod r == n) or its transpose.
Y_TENSOR, Y_FOLD, Y_UNFOLD = 0, 1, 2


@triton.jit
def _drop(t, seed, offsets, p, inv_keep):
    """t where the Philox draw for each element's offset keeps it (scaled by 1/(1-p)), else 0."""
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, t * inv_keep, 0.0).to(t.dtype)


@triton.jit
def _y_tile(y_ptr, rk, rn, kmask, N, syk, syn, ymod_k, ymod_n, fold_r, Y_MODE: tl.constexpr):
    """The (BK, BN) tile of the right operand: loaded (indices taken modulo ymod) or a fold matrix."""
    if Y_MODE == 0:
        ptrs = y_ptr + (rk % ymod_k)[:, None] * syk + (rn % ymod_n)[None, :] * syn
        return tl.load(ptrs, mask=kmask[:, None] & (rn < N)[None, :], other=0.0)
    elif Y_MODE == 1:
        return tl.where((rk[:, None] % fold_r) == rn[None, :], 1.0, 0.0)
    else:
        return tl.where((rn[None, :] % fold_r) == rk[:, None], 1.0, 0.0)


@triton.jit
def _mm_kernel(x_ptr, y_ptr, c_ptr, M, N, K, k_per_split,
               sxm, sxk, syk, syn, ymod_k, ymod_n, scs, scm, scn,
               dxm, dxk, dcm, dcn, seed, p, inv_keep, scale, fold_r,
               Y_MODE: tl.constexpr, DROP_X: tl.constexpr, DROP_C: tl.constexpr, ACC: tl.constexpr,
               PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[split] (+)= drop_C(scale · drop_X(X) @ Y) over this split's share of K."""
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
    split = tl.program_id(2)
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        rk = (k0 + tl.arange(0, BK)).to(tl.int64)
        kmask = rk < k_hi
        xt = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                     mask=(rm < M)[:, None] & kmask[None, :], other=0.0)
        if DROP_X:
            xt = _drop(xt, seed, rm[:, None] * dxm + rk[None, :] * dxk, p, inv_keep)
        yt = _y_tile(y_ptr, rk, rn, kmask, N, syk, syn, ymod_k, ymod_n, fold_r, Y_MODE)
        acc = tl.dot(xt, yt.to(xt.dtype), acc, input_precision=PRECISION)
    acc = acc * scale
    if DROP_C:
        acc = _drop(acc, seed, rm[:, None] * dcm + rn[None, :] * dcn, p, inv_keep)
    cmask = (rm < M)[:, None] & (rn < N)[None, :]
    c_ptrs = c_ptr + split * scs + rm[:, None] * scm + rn[None, :] * scn
    if ACC:
        acc += tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _mask_kernel(out_ptr, n, seed, p, inv_keep, BLOCK: tl.constexpr):
    """out[i] = the dropout multiplier of flat element i, exactly as _drop draws it."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ones = tl.full((BLOCK,), 1.0, tl.float32)
    tl.store(out_ptr + offs, _drop(ones, seed, offs, p, inv_keep), mask=offs < n)


def triton_dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """Materialise the multiplier the kernels apply to a row-major tensor of `shape` for (p, seed)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = out.numel()
    if n:
        _mask_kernel[(triton.cdiv(n, 1024),)](out, n, seed, p, 1.0 / (1.0 - p), BLOCK=1024)
    return out


def _pow2(n: int, lo: int = 16, hi: int = 128) -> int:
    """Block size for a dimension of n: a power of two in [lo, hi]."""
    return max(lo, min(hi, triton.next_power_of_2(n)))


def dot_precision(dtype: torch.dtype) -> str | None:
    """Full float32 products for float32 operands (as torch does by default); the default otherwise."""
    return "ieee" if dtype == torch.float32 else None


def matmul(x: Tensor, y: Tensor | None, out: Tensor, *, scale: float = 1.0, accumulate: bool = False,
           y_mode: int = Y_TENSOR, fold_r: int = 1, y_mod: tuple[int, int] | None = None,
           drop_x: tuple[int, int] | None = None, drop_c: tuple[int, int] | None = None,
           p: float = 0.0, seed: int = 0, splits: int = 1) -> Tensor:
    """out (+)= drop_c(scale · drop_x(x) @ y), the reduction cut into `splits` float32 partial sums.

    drop_x / drop_c give the (row, col) strides of the element index the dropout draw is keyed on,
    so the same mask applies to x, to xᵀ and to a gradient shaped like x.
    """
    M, K = x.shape
    N = out.shape[-1]
    if M == 0 or N == 0:
        return out
    k_per_split = triton.cdiv(triton.cdiv(K, splits), 64) * 64
    n_splits = triton.cdiv(K, k_per_split)
    target = out if n_splits == 1 else out.new_empty((n_splits, M, N), dtype=torch.float32)
    cs = target.stride() if n_splits > 1 else (0, *out.stride())
    ys = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    BM, BN = 64, _pow2(N)
    BK = _pow2(K, hi=64 if BN <= 64 else 32)
    _mm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN), n_splits)](
        x, y if y is not None else x, target, M, N, K, k_per_split,
        x.stride(0), x.stride(1), *ys, *(y_mod or (K, N)), *cs,
        *(drop_x or (0, 0)), *(drop_c or (0, 0)), seed, p, 1.0 / (1.0 - p), scale, fold_r,
        Y_MODE=y_mode, DROP_X=drop_x is not None and p > 0, DROP_C=drop_c is not None and p > 0,
        ACC=accumulate and n_splits == 1, PRECISION=dot_precision(x.dtype), BM=BM, BN=BN, BK=BK)
    if n_splits > 1:
        total = target.sum(0)
        if accumulate:
            out.add_(total)
        else:
            out.copy_(total)
    return out


def split_count(rows: int, cols: int, depth: int) -> int:
    """How many slices to cut a long reduction into so that a skinny output still fills the GPU."""
    tiles = triton.cdiv(rows, 64) * triton.cdiv(cols, _pow2(cols))
    return max(1, min(triton.cdiv(depth, 1024), triton.cdiv(256, tiles)))
