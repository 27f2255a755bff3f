"""Fused Triton kernels for adapter layers, with torch references and a dispatch (LRS_KERNELS=auto|triton|torch).

Weights come in nn.Linear layout (out, in), any strides; base weight and bias are treated as frozen.
Everything is computed in x's dtype (autocast's when autocast is on) and returned in it.

What each kernel saves against PEFT, per layer, at Llama-7B shapes (bf16, T = 16384 tokens, in = out = 4096,
r = 16; one T×4096 bf16 activation is 128 MiB, and at ~4 TB/s a pass over it (a read or a write) costs ~32 µs;
the frozen base GEMMs x·Wᵀ and g·W, 2·T·in·out = 550 GFLOP each, ~0.7 ms each at ~790 TFLOP/s, are cuBLAS
on both sides and set a floor of ~1.4 ms per layer, forward + backward):

- lowrank (LoRA, CoRA, PiSSA, CoLA): PEFT's forward writes drop(x) and a mask, lora_B's output, its scaled
  copy and the sum with the base output (~8 activation passes, 3 launches beyond the GEMMs); ours draws the
  dropout inside the shrink kernel (x read once, no mask kept: Philox redraws it in backward) and adds
  s·h·Bᵀ into the base output in place (2 passes). Backward: PEFT masks and adds two T×in gradients (~6
  passes); ours accumulates s·(g·B)·A, mask redrawn, into cuBLAS's g·W in place (2 passes). Expected:
  ~0.35 ms of ~1.9 ms saved at p > 0 (1.2x), ~0.15 ms at p = 0 (1.1x), and no copy of x or mask kept.
- fold (FOSSIL/MiSS balance, mini): PEFT pads x to a multiple of r (a T×in copy), sums the groups and adds
  fold(x)·D as a new T×out tensor; ours folds while reading x once and accumulates in place (~4 passes saved
  forward, 3 backward: ~1.15x).
- bat (FOSSIL/MiSS bat): the backward needs W' = W(I + D) + D whole (dD needs gᵀ·x, a full out×in GEMM,
  on both sides), and the forward kernel rebuilds W' tiles per row block with r×r products too narrow for
  tensor cores to run near peak, where the torch path builds W' once (a 32 MiB write) and calls cuBLAS.

Measured on an H200 (benchmarks/gpu_check.sh, bench_kernels rows at in/out 4096/4096, 4096/11008,
11008/4096, r 8/16/64): the savings above are eaten by the kernels' own costs. Forward+backward against PEFT,
geometric mean (range): lowrank p = 0: 1.02x (0.96-1.07) at 16384 tokens, 0.86x at 4096; p = 0.1: 0.84x and
0.65x (redrawing Philox numbers for x three times costs more than PEFT's stored mask); fold p = 0: 1.00x
(0.91-1.06) at 16384, 0.67x at 4096; p = 0.1: 0.89x and 0.58x. At 4096 tokens the rank-r shrink has too few
row tiles to fill the GPU (64 programs for 132 SMs; split-K is the next step). Peak activation memory is
0.39-0.68x PEFT's throughout. The bat kernel: 0.25x; the torch path: 1.48x (1.02-3.02x) PEFT's speed.
So `auto` runs lowrank and fold through Triton only where that run measured parity or better, without
dropout and from AUTO_MIN_ROWS tokens per call (there: same speed, half the memory), and torch elsewhere;
LRS_KERNELS=triton runs every call through the kernels (about half the activation memory, up to 2x slower).

The matmul behind lowrank and fold autotunes its block sizes on the first call per shape class (see
matmul.py); a kernel that fails to build or launch falls back to torch (fallback.py).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from lowrank_surgery.errors import LrsError

from . import fallback
from .reference import (bat_linear_reference, fold_linear_reference, lowrank_linear_reference,
                        torch_dropout_mask)

__all__ = ["backend", "lowrank_linear", "fold_linear", "bat_linear", "lowrank_linear_reference",
           "fold_linear_reference", "bat_linear_reference", "torch_dropout_mask", "triton_dropout_mask"]

_CHOICES = ("auto", "triton", "torch")
AUTO_TRITON = ("lowrank", "fold")  # what `auto` may run through Triton on CUDA (the module docstring says when)
AUTO_MIN_ROWS = 16384


@functools.cache
def _triton_importable() -> bool:
    """Whether triton imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend(device: torch.device, kernel: str = "lowrank", rows: int = 0, dropout: float = 0.0) -> str:
    """'triton' or 'torch' for a `kernel` call on `device` over `rows` tokens, as LRS_KERNELS asks.

    auto: Triton for AUTO_TRITON on CUDA without dropout from AUTO_MIN_ROWS tokens (see the module docstring).
    """
    choice = os.environ.get("LRS_KERNELS", "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise LrsError(f"LRS_KERNELS={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice == "torch":
        return "torch"
    if choice == "auto":
        wanted = (device.type == "cuda" and kernel in AUTO_TRITON and dropout == 0 and rows >= AUTO_MIN_ROWS
                  and (kernel, device.type) not in _BROKEN)
        return "triton" if wanted and _triton_importable() else "torch"
    if not _triton_importable():
        raise LrsError("LRS_KERNELS=triton but triton cannot be imported; install triton or use LRS_KERNELS=torch")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise LrsError(f"LRS_KERNELS=triton on a {device.type} tensor needs TRITON_INTERPRET=1 "
                       "(set before the kernels are first used); or use LRS_KERNELS=auto|torch")
    return "triton"


def triton_dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> Tensor:
    """The float32 multiplier (0 or 1/(1-p)) the Triton kernels apply to an x of `shape` for (p, seed)."""
    from .matmul import triton_dropout_mask as materialise

    return materialise(shape, p, seed, device)


def _seed(dropout: float, seed: int | None) -> int:
    """The dropout seed: checks p, draws one from torch's global RNG when none is given."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout == 0.0:
        return 0
    return int(torch.randint(2**31 - 1, ())) if seed is None else seed


def _prepare(x: Tensor, weight: Tensor, bias: Tensor | None, *params: Tensor) -> tuple[Tensor, ...]:
    """x, W, b and the adapter tensors in one compute dtype (autocast's if on, else x's); W and b frozen."""
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("the adapter kernels treat the base weight and bias as frozen; set requires_grad=False")
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return tuple(None if t is None else t.to(dtype) for t in (x, weight, bias, *params))


_BROKEN: set[tuple[str, str]] = set()  # (kernel, device type) whose Triton path failed: torch from now on


def _apply(kernel: str, function: type[torch.autograd.Function], x: Tensor, *args) -> Tensor | None:
    """Run a kernel Function with autocast off (its inputs are already in the compute dtype); None if it failed."""
    try:
        with torch.autocast(x.device.type, enabled=False):
            return function.apply(x, *args)
    except Exception as error:  # noqa: BLE001: any failure to build or launch falls back, unless strict
        fallback.failed(kernel, error)
        _BROKEN.add((kernel, x.device.type))
        return None


def _mask(x: Tensor, dropout: float, seed: int) -> Tensor | None:
    """The torch path's dropout multiplier for x, None without dropout."""
    return torch_dropout_mask(x.shape, dropout, seed, x.device) if dropout > 0 else None


def lowrank_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                   dropout: float = 0.0, seed: int | None = None) -> Tensor:
    """y = x Wᵀ + b + scale·(drop(x) Aᵀ) Bᵀ with A (R, in), B (out, R); dropout only on the adapter branch."""
    seed = _seed(dropout, seed)
    x, weight, bias, A, B = _prepare(x, weight, bias, A, B)
    if backend(x.device, "lowrank", x.numel() // max(x.shape[-1], 1), dropout) == "triton":
        from .lowrank import LowRankLinear

        y = _apply("lowrank", LowRankLinear, x, weight, bias, A, B, float(scale), float(dropout), seed)
        if y is not None:
            return y
    return lowrank_linear_reference(x, weight, bias, A, B, scale, _mask(x, dropout, seed))


def _check_fold(weight: Tensor, D: Tensor, r: int, mini_r: int | None) -> None:
    """Raise ValueError unless D has the balance (r, out) or mini (r, mini_r) shape."""
    out = weight.shape[0]
    want = (r, out) if mini_r is None else (r, mini_r)
    if tuple(D.shape) != want or (mini_r is not None and out % mini_r):
        raise ValueError(f"fold D of shape {tuple(D.shape)} does not fit r={r}, mini_r={mini_r}, out={out}")


def fold_linear(x: Tensor, weight: Tensor, bias: Tensor | None, D: Tensor, r: int, mini_r: int | None = None,
                dropout: float = 0.0, seed: int | None = None) -> Tensor:
    """y = x Wᵀ + b + fold_r(drop(x)) D (balance: D (r, out); mini: D (r, mini_r) tiled along out)."""
    _check_fold(weight, D, r, mini_r)
    seed = _seed(dropout, seed)
    x, weight, bias, D = _prepare(x, weight, bias, D)
    if backend(x.device, "fold", x.numel() // max(x.shape[-1], 1), dropout) == "triton":
        from .fold import FoldLinear

        y = _apply("fold", FoldLinear, x, weight, bias, D, r, mini_r, float(dropout), seed)
        if y is not None:
            return y
    return fold_linear_reference(x, weight, bias, D, r, mini_r, _mask(x, dropout, seed))


def bat_linear(x: Tensor, weight: Tensor, bias: Tensor | None, D: Tensor) -> Tensor:
    """y = x W'ᵀ + b, W'_{b,c} = W_{b,c}(I + D_b) + D_b, D (out/r, r, r); no dropout, as in PEFT's MiSS bat."""
    out, inp = weight.shape
    r = D.shape[-1]
    if tuple(D.shape) != (out // r, r, r) or out % r or inp % r:
        raise ValueError(f"bat D of shape {tuple(D.shape)} does not tile a weight of shape {(out, inp)}")
    x, weight, bias, D = _prepare(x, weight, bias, D)
    if backend(x.device, "bat") == "triton":
        from .bat import MAX_R, BatLinear

        y = _apply("bat", BatLinear, x, weight, bias, D) if r <= MAX_R else None
        if y is not None:
            return y
    return bat_linear_reference(x, weight, bias, D)
