"""Forward+backward time and peak memory of the lrs kernels against PEFT's LoRA and MiSS layers. Needs a CUDA GPU.

Usage: python benchmarks/bench_kernels.py [--tokens 2048 4096 8192 16384] [--ranks 8 16 64] [--dropout 0.0]
Without CUDA it prints that nothing was measured and exits 0.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch
from torch import nn

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out): Llama-7B projections, both ways
Forward = Callable[[torch.Tensor], torch.Tensor]


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--methods", nargs="+", default=["lora", "miss", "bat"], choices=["lora", "miss", "bat"])
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (not applied by PEFT's bat)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    return parser.parse_args()


def measure(forward: Forward, x: torch.Tensor, params: list[nn.Parameter], reps: int) -> tuple[float, float]:
    """(median ms, peak MiB above what was allocated before) of a forward+backward step, after warmup."""
    gy = torch.randn_like(forward(x).detach())

    def step() -> None:
        forward(x).backward(gy)
        for t in (x, *params):
            t.grad = None

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start_mem = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[reps // 2], (torch.cuda.max_memory_allocated() - start_mem) / 2**20


def frozen_linear(inp: int, out: int, dtype: torch.dtype) -> nn.Linear:
    """A frozen base layer on the GPU."""
    return nn.Linear(inp, out, device="cuda", dtype=dtype).requires_grad_(False)


def lora_layers(inp: int, out: int, r: int, dropout: float, dtype: torch.dtype):
    """PEFT's LoRA layer and the lrs kernel on the same weights, with the trainable parameters."""
    from peft.tuners.lora import Linear, LoraConfig

    from lowrank_surgery import kernels

    base = frozen_linear(inp, out, dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout)
    peft = Linear(base, "default", config, r=r, lora_alpha=2 * r).to("cuda", dtype).train()
    A, B = peft.lora_A["default"].weight, peft.lora_B["default"].weight
    nn.init.normal_(B, std=0.02)

    def ours(x: torch.Tensor) -> torch.Tensor:
        return kernels.lowrank_linear(x, base.weight, base.bias, A, B, 2.0, dropout)

    return peft, ours, [A, B]


def miss_layers(inp: int, out: int, r: int, dropout: float, dtype: torch.dtype, variant: str):
    """PEFT's MiSS layer (balance or bat) and the lrs kernel on the same weights."""
    from peft.tuners.miss import MissConfig, MissLinear

    from lowrank_surgery import kernels

    base = frozen_linear(inp, out, dtype)
    config = MissConfig(r=r, miss_dropout=dropout, init_weights="bat" if variant == "bat" else True)
    peft = MissLinear(base, "default", config, r=r).to("cuda", dtype).train()
    D = peft.miss_block["default"]
    nn.init.normal_(D, std=0.02)

    def ours(x: torch.Tensor) -> torch.Tensor:
        if variant == "bat":
            return kernels.bat_linear(x, base.weight, base.bias, D)
        return kernels.fold_linear(x, base.weight, base.bias, D, r, None, dropout)

    return peft, ours, [D]


def layers(method: str, inp: int, out: int, r: int, dropout: float, dtype: torch.dtype):
    """(PEFT layer, lrs forward, trainable parameters) for one benchmark row."""
    if method == "lora":
        return lora_layers(inp, out, r, dropout, dtype)
    return miss_layers(inp, out, r, dropout, dtype, method)


def main() -> int:
    """Print one row per (method, shape, r, tokens) and the geometric-mean speedup per method."""
    args = parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (Triton kernels vs PEFT layers in bf16); nothing measured", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}, dropout {args.dropout}, fwd+bwd, median of {args.reps}")
    print(f"{'method':6} {'in':>6} {'out':>6} {'r':>3} {'tokens':>6} | {'peft ms':>8} {'lrs ms':>8} {'speedup':>7} | "
          f"{'peft MiB':>9} {'lrs MiB':>9} {'mem ratio':>9}")
    speedups: dict[str, list[float]] = {m: [] for m in args.methods}
    for method in args.methods:
        for inp, out in SHAPES:
            for r in args.ranks:
                peft, ours, params = layers(method, inp, out, r, args.dropout, dtype)
                for tokens in args.tokens:
                    x = torch.randn(tokens, inp, device="cuda", dtype=dtype, requires_grad=True)
                    t_peft, m_peft = measure(peft, x, params, args.reps)
                    t_ours, m_ours = measure(ours, x, params, args.reps)
                    speedups[method].append(t_peft / t_ours)
                    print(f"{method:6} {inp:6} {out:6} {r:3} {tokens:6} | {t_peft:8.3f} {t_ours:8.3f} "
                          f"{t_peft / t_ours:6.2f}x | {m_peft:9.0f} {m_ours:9.0f} {m_ours / m_peft:9.2f}")
                del peft, ours, params
                torch.cuda.empty_cache()
    for method, values in speedups.items():
        print(f"# {method}: geometric-mean speedup over PEFT {math.exp(sum(map(math.log, values)) / len(values)):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
