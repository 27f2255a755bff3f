"""Forward+backward time and peak memory of the lrs kernels against PEFT's LoRA and MiSS layers. Needs a CUDA GPU.

Usage: python benchmarks/bench_kernels.py [--tokens 2048 4096 8192 16384] [--ranks 8 16 64] [--dropout 0.0 0.1]
        [--json rows.json]
Each lrs row runs what LRS_KERNELS=auto runs on CUDA (bat: torch, see kernels/__init__.py); `--kernels triton`
forces the Triton kernels everywhere. Without CUDA it says so on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1],
                        help="adapter dropout (not applied by PEFT's bat)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--kernels", choices=["auto", "triton"], default="auto", help="LRS_KERNELS for the lrs rows")
    parser.add_argument("--json", default=None, help="also write the rows here")
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
    """Print one row per (method, dropout, shape, r, tokens) and the geometric-mean speedup per method."""
    args = parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (Triton kernels vs PEFT layers in bf16); nothing measured", file=sys.stderr)
        return 1
    os.environ["LRS_KERNELS"] = args.kernels
    dtype = getattr(torch, args.dtype)
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}, LRS_KERNELS={args.kernels}, fwd+bwd, median of {args.reps}")
    print(f"{'method':6} {'p':>4} {'in':>6} {'out':>6} {'r':>3} {'tokens':>6} | {'peft ms':>8} {'lrs ms':>8} "
          f"{'speedup':>7} | {'peft MiB':>9} {'lrs MiB':>9} {'mem ratio':>9}")
    rows = []
    for method in args.methods:
        for p in args.dropout:
            for inp, out in SHAPES:
                for r in args.ranks:
                    rows += measure_layer(method, p, inp, out, r, dtype, args)
    speedups: dict[str, list[float]] = {}
    for row in rows:
        speedups.setdefault(f"{row['method']} p={row['dropout']}", []).append(row["peft_ms"] / row["lrs_ms"])
    for name, values in speedups.items():
        print(f"# {name}: geometric-mean speedup over PEFT {math.exp(sum(map(math.log, values)) / len(values)):.2f}x "
              f"(min {min(values):.2f}x, max {max(values):.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "kernels": args.kernels,
                       "reps": args.reps, "rows": rows}, f, indent=1)
    return 0


def measure_layer(method: str, p: float, inp: int, out: int, r: int, dtype: torch.dtype,
                  args: argparse.Namespace) -> list[dict]:
    """PEFT and lrs side by side on one layer, for each token count."""
    peft, ours, params = layers(method, inp, out, r, p, dtype)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, inp, device="cuda", dtype=dtype, requires_grad=True)
        with torch.no_grad():  # the same numbers as PEFT where no dropout makes them random
            want = peft.eval()(x).float() if p == 0 or method == "bat" else None
            err = None if want is None else ((ours(x).float() - want).abs().max() / want.abs().max()).item()
            peft.train()
        t_peft, m_peft = measure(peft, x, params, args.reps)
        t_ours, m_ours = measure(ours, x, params, args.reps)
        rows.append({"method": method, "dropout": p, "in": inp, "out": out, "r": r, "tokens": tokens,
                     "peft_ms": t_peft, "lrs_ms": t_ours, "peft_mib": m_peft, "lrs_mib": m_ours, "max_rel_err": err})
        print(f"{method:6} {p:4} {inp:6} {out:6} {r:3} {tokens:6} | {t_peft:8.3f} {t_ours:8.3f} "
              f"{t_peft / t_ours:6.2f}x | {m_peft:9.0f} {m_ours:9.0f} {m_ours / max(m_peft, 1e-9):9.2f}"
              + ("" if err is None else f"  err {err:.1e}"), flush=True)
    del peft, ours, params
    torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    sys.exit(main())
