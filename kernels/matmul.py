"""One Triton matmul with the options the adapter kernels need: in-kernel dropout, fold matrices, in-place add.

Block sizes are autotuned on the user's GPU, once per shape class (see `shape_class`), among `CONFIGS`;
`tests/test_kernels_aot.py` compiles every config the launch code can pick for sm_80 and sm_90.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import fallback

# Y operand modes: a tensor in memory, or the 0/1 fold matrix P (P[k, n] = k mod r == n) or its transpose.
Y_TENSOR, Y_FOLD, Y_UNFOLD = 0, 1, 2
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # triton reads it when the kernels are decorated


def _config(BM: int, BN: int | None, BK: int | None, warps: int, stages: int) -> triton.Config:
    """A block-size config; BN or BK None: taken from the shape (see `fitting_configs`)."""
    return triton.Config({"BM": BM, "BN": BN, "BK": BK}, num_warps=warps, num_stages=stages)


# Narrow outputs (N <= 64: the rank-r side of shrink, fold and dA) take BN from N and tune the tile along M;
# wide outputs (expand, dx: K = r is short) take BK from K and tune the tile along M and N. float32 runs on
# the FMA units (full-precision products, as torch): one small tile, as larger ones only add registers.
NARROW = [_config(64, None, 64, 4, 3), _config(128, None, 64, 8, 3)]
WIDE = [_config(64, 128, None, 4, 3), _config(128, 128, None, 8, 3)]
FLOAT32 = _config(64, None, 32, 4, 2)
CONFIGS = NARROW + WIDE


def block(n: int, hi: int) -> int:
    """Block size covering a dimension of n: a power of two in [16, hi]."""
    return max(16, min(hi, triton.next_power_of_2(n)))


def shape_class(M: int, N: int, K: int) -> tuple[int, int, int]:
    """What the best config depends on: the output's height and width and the reduction depth, as capped powers of two."""
    return block(M, 1 << 16), block(N, 256), block(K, 1 << 12)


def fitting_configs(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """The configs for this call's shape class and dtype, the block sizes they leave open filled in from N and K."""
    N, K = named_args["N"], named_args["K"]
    if named_args["x_ptr"].dtype == torch.float32:
        configs = [FLOAT32]
    narrow = block(N, 128) <= 64
    chosen = []
    for c in configs:
        kw = c.kwargs
        if c is not FLOAT32 and (kw["BN"] is None) != narrow:
            continue
        BN = kw["BN"] or block(N, 64)
        BK = min(kw["BK"] or block(K, 64 if BN <= 64 else 32), block(K, 128))
        config = triton.Config({**kw, "BN": BN, "BK": BK}, num_warps=c.num_warps, num_stages=c.num_stages)
        if all(config.__dict__ != other.__dict__ for other in chosen):
            chosen.append(config)
    return chosen[:1] if INTERPRETED else chosen  # the interpreter runs one config: no benchmarking there


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
def _mm_body(x_ptr, y_ptr, c_ptr, M, N, K, k_per_split,
             sxm, sxk, syk, syn, ymod_k, ymod_n, scs, scm, scn,
             dxm, dxk, dcm, dcn, seed, p, inv_keep, scale, fold_r, m_class, n_class, k_class,
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


# restore_value: tuning runs the kernel once per config, and an accumulating one must not add up.
_mm_kernel = triton.autotune(CONFIGS, key=["m_class", "n_class", "k_class", "Y_MODE", "DROP_X", "DROP_C", "ACC"],
                             prune_configs_by={"early_config_prune": fitting_configs},
                             restore_value=["c_ptr"])(_mm_body)


@triton.jit
def _mask_kernel(out_ptr, n, seed, p, inv_keep, BLOCK: tl.constexpr):
    """out[i] = the dropout multiplier of flat element i, exactly as _drop draws it."""
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ones = tl.full((BLOCK,), 1.0, tl.float32)
    tl.store(out_ptr + offs, _drop(ones, seed, offs, p, inv_keep), mask=offs < n)


_recorder: Callable[..., None] | None = None  # set by aot.recording(): launches are recorded, not run


def launch(kernel, grid, *args, **meta) -> None:
    """Launch a Triton kernel; every launch of the package passes here, so aot.py can enumerate them."""
    if _recorder is not None:
        _recorder(kernel, args, meta)
        return
    kernel[grid](*args, **meta)


def triton_dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """Materialise the multiplier the kernels apply to a row-major tensor of `shape` for (p, seed)."""
    out = torch.empty(shape, dtype=torch.float32, device=device)
    n = out.numel()
    if n:
        launch(_mask_kernel, (triton.cdiv(n, 1024),), out, n, seed, p, 1.0 / (1.0 - p), BLOCK=1024)
    return out


def dot_precision(dtype: torch.dtype) -> str | None:
    """Full float32 products for float32 operands (as torch does by default); the default otherwise."""
    return "ieee" if dtype == torch.float32 else None


def matmul(x: Tensor, y: Tensor | None, out: Tensor, *, scale: float = 1.0, accumulate: bool = False,
           y_mode: int = Y_TENSOR, fold_r: int = 1, y_mod: tuple[int, int] | None = None,
           drop_x: tuple[int, int] | None = None, drop_c: tuple[int, int] | None = None,
           p: float = 0.0, seed: int = 0, splits: int = 1) -> Tensor:
    """out (+)= drop_c(scale · drop_x(x) @ y), the reduction cut into `splits` float32 partial sums.

    drop_x / drop_c give the (row, col) strides of the element index the dropout draw is keyed on,
    so the same mask applies to x, to xᵀ and to a gradient shaped like x. Should the kernel fail to
    build or launch, the same product is computed with torch (see `fallback`).
    """
    M, K = x.shape
    N = out.shape[-1]
    if M == 0 or N == 0:
        return out
    drop_x, drop_c = (drop_x, drop_c) if p > 0 else (None, None)
    meta = dict(Y_MODE=y_mode, DROP_X=drop_x is not None, DROP_C=drop_c is not None, ACC=accumulate,
                PRECISION=dot_precision(x.dtype))
    failed = (x.device, x.dtype, *meta.values())
    if failed not in _FAILED:
        try:
            return _matmul_triton(x, y, out, scale, y_mod, drop_x, drop_c, p, seed, splits, fold_r, meta)
        except Exception as error:  # noqa: BLE001: any failure to build or launch falls back, unless strict
            fallback.failed("matmul", error)
            _FAILED.add(failed)
    return _matmul_torch(x, y, out, scale, y_mode, fold_r, y_mod, drop_x, drop_c, p, seed, accumulate)


_FAILED: set[tuple] = set()  # (device, dtype, constexprs) whose kernel failed: straight to torch next time


def _matmul_triton(x: Tensor, y: Tensor | None, out: Tensor, scale: float, y_mod: tuple[int, int] | None,
                   drop_x: tuple[int, int] | None, drop_c: tuple[int, int] | None, p: float, seed: int,
                   splits: int, fold_r: int, meta: dict) -> Tensor:
    """The Triton launch of `matmul`."""
    M, K = x.shape
    N = out.shape[-1]
    k_per_split = triton.cdiv(triton.cdiv(K, splits), 64) * 64
    n_splits = triton.cdiv(K, k_per_split)
    target = out if n_splits == 1 else out.new_empty((n_splits, M, N), dtype=torch.float32)
    cs = target.stride() if n_splits > 1 else (0, *out.stride())
    ys = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    grid = lambda c: (triton.cdiv(M, c["BM"]), triton.cdiv(N, c["BN"]), n_splits)  # noqa: E731
    launch(_mm_kernel, grid, x, y if y is not None else x, target, M, N, K, k_per_split,
           x.stride(0), x.stride(1), *ys, *(y_mod or (K, N)), *cs,
           *(drop_x or (0, 0)), *(drop_c or (0, 0)), seed, p, 1.0 / (1.0 - p), scale, fold_r,
           *shape_class(M, N, K), **{**meta, "ACC": meta["ACC"] and n_splits == 1})
    if n_splits > 1:
        total = target.sum(0)
        if meta["ACC"]:
            out.add_(total)
        else:
            out.copy_(total)
    return out


def _matmul_torch(x: Tensor, y: Tensor | None, out: Tensor, scale: float, y_mode: int, fold_r: int,
                  y_mod: tuple[int, int] | None, drop_x: tuple[int, int] | None, drop_c: tuple[int, int] | None,
                  p: float, seed: int, accumulate: bool) -> Tensor:
    """`matmul` in torch (float32 products), with the very dropout draws of the kernel."""
    M, K = x.shape
    N = out.shape[-1]
    rows, cols = torch.arange(K, device=x.device), torch.arange(N, device=x.device)
    if y_mode == Y_FOLD:
        right = (rows[:, None] % fold_r == cols[None, :]).float()
    elif y_mode == Y_UNFOLD:
        right = (cols[None, :] % fold_r == rows[:, None]).float()
    else:
        mod_k, mod_n = y_mod or (K, N)
        right = y.float()[rows[:, None] % mod_k, cols[None, :] % mod_n]
    left = x.float() if drop_x is None else x.float() * _mask_at(M, K, drop_x, p, seed, x.device)
    c = (left @ right).mul_(scale)
    if drop_c is not None:
        c.mul_(_mask_at(M, N, drop_c, p, seed, x.device))
    return out.add_(c.to(out.dtype)) if accumulate else out.copy_(c)


def _mask_at(rows: int, cols: int, strides: tuple[int, int], p: float, seed: int, device: torch.device) -> Tensor:
    """The (rows, cols) dropout multiplier the kernel draws for element index row·strides[0] + col·strides[1]."""
    index = (torch.arange(rows, device=device)[:, None] * strides[0]
             + torch.arange(cols, device=device)[None, :] * strides[1])
    return triton_dropout_mask((int(index.max()) + 1,), p, seed, device)[index]


def split_count(rows: int, cols: int, depth: int) -> int:
    """How many slices to cut a long reduction into so that a skinny output still fills the GPU."""
    tiles = triton.cdiv(rows, 64) * triton.cdiv(cols, block(cols, 64))
    return max(1, min(triton.cdiv(depth, 1024), triton.cdiv(256, tiles)))
