"""Micro-benchmark of the SVD engine: wall time and accuracy of each algorithm on model-shaped matrices.

    python benchmarks/bench_svd_engine.py [--smol /tmp/smol] [--rank 64] [--large] [--device auto]

On a shared machine pin every BLAS to one thread for stable timings (torch's MKL and scipy's OpenBLAS
otherwise oversubscribe the cores and slow down 10x): OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python ...

With --smol, the SmolLM2-135M cases use its real weights (see examples/smollm2.py); without, Gaussian ones.
--large adds Llama-3.2-1B shapes (2048×2048, 8192×2048, scope-model bases), minutes on a small CPU.
Accuracy is against `exact`: relative difference of the captured energy ‖U_rᵀA‖²_F and the largest
principal angle between the bases (first matrix of each case).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from lowrank_surgery.device import resolve_device
from lowrank_surgery.svd import ALGORITHMS, common_basis, truncated_svd

Case = tuple[str, list[torch.Tensor]]


def smol_weights(root: Path | None, module: str, shape: tuple[int, int], count: int = 30) -> list[torch.Tensor]:
    """The module's weight in every layer of the SmolLM2 checkpoint, or Gaussian stand-ins."""
    if root is None:
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(*shape, generator=gen) * 0.02 for _ in range(count)]
    from safetensors import safe_open

    found: dict[int, torch.Tensor] = {}
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                parts = key.split(".")
                if key.endswith(f".{module}.weight") and parts[1] == "layers":
                    found[int(parts[2])] = f.get_tensor(key).float()
    return [found[i] for i in sorted(found)][:count]


def gaussian(count: int, m: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(m, n, generator=gen) * 0.02 for _ in range(count)]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def max_angle(u: torch.Tensor, ref: torch.Tensor) -> float:
    return float(np.max(scipy.linalg.subspace_angles(u.double().numpy(), ref.double().numpy())))


def captured(u: torch.Tensor, mats: list[torch.Tensor]) -> float:
    return sum(float((u.double().T @ a.double()).square().sum()) for a in mats)


def bench_truncated(cases: list[Case], rank: int, device: str) -> list[tuple[str, ...]]:
    """truncated_svd per algorithm, plus torch.svd_lowrank on the stacked batch."""
    rows = []
    for name, mats in cases:
        results: dict[str, tuple[float, torch.Tensor]] = {}
        for algorithm in ALGORITHMS:
            seconds, out = timed(lambda: truncated_svd(mats, rank, algorithm=algorithm, device=device))
            results[algorithm] = seconds, out[0][0]  # type: ignore[index]
        dev = resolve_device(device)
        seconds, out = timed(lambda: torch.svd_lowrank(torch.stack(mats).to(dev), q=rank + 8, niter=4))
        results["torch.svd_lowrank"] = seconds, out[0][0, :, :rank].cpu()  # type: ignore[index]
        ref = captured(results["exact"][1], mats[:1])
        for label, (seconds, u) in results.items():
            rows.append((name, label, f"{seconds:.2f}", f"{abs(captured(u, mats[:1]) - ref) / ref:.1e}",
                         f"{max_angle(u, results['exact'][1]):.1e}"))
    return rows


def bench_common(cases: list[Case], rank: int, device: str) -> list[tuple[str, ...]]:
    """common_basis of the concatenation per algorithm."""
    rows = []
    for name, blocks in cases:
        results = {a: timed(lambda: common_basis(blocks, rank, algorithm=a, device=device)) for a in ALGORITHMS}
        ref_u, _, ref_energy = results["exact"][1]  # type: ignore[misc]
        for label, (seconds, (u, _, energy)) in results.items():  # type: ignore[misc]
            rows.append((name, label, f"{seconds:.2f}", f"{abs(energy - ref_energy) / ref_energy:.1e}",
                         f"{max_angle(u, ref_u):.1e}"))
    return rows


def table(title: str, rows: list[tuple[str, ...]]) -> str:
    head = ("case", "algorithm", "seconds", "energy rel. diff", "max angle (rad)")
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smol", type=Path, help="SmolLM2-135M safetensors directory (real weights)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--large", action="store_true", help="add Llama-3.2-1B shapes")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    kind = "real" if args.smol else "gaussian"
    q, k, up, down = (smol_weights(args.smol, m, s) for m, s in
                      [("q_proj", (576, 576)), ("k_proj", (192, 576)), ("up_proj", (1536, 576)),
                       ("down_proj", (576, 1536))])
    truncated = [(f"30 × 576×576 q_proj ({kind})", q), (f"30 × 192×576 k_proj ({kind})", k),
                 (f"30 × 1536×576 up_proj ({kind})", up), (f"30 × 576×1536 down_proj ({kind})", down)]
    common = [(f"q_proj, one layer: 576×576 ({kind})", q[:1]), (f"q_proj, 30 layers: 576×17280 ({kind})", q),
              (f"k_proj, 30 layers: 192×17280 ({kind})", k)]
    if args.large:
        truncated += [("4 × 2048×2048 (gaussian)", gaussian(4, 2048, 2048)),
                      ("2 × 8192×2048 (gaussian)", gaussian(2, 8192, 2048))]
        common += [("k_proj, 16 layers: 512×32768 (gaussian)", gaussian(16, 512, 2048)),
                   ("q_proj, 8 layers: 2048×16384 (gaussian)", gaussian(8, 2048, 2048))]
    truncated_svd([torch.randn(64, 64)], 4, device=args.device)  # warm-up: LAPACK and thread pools
    print(f"rank {args.rank}, device {resolve_device(args.device)}, {torch.get_num_threads()} threads\n")
    print(table("truncated_svd", bench_truncated(truncated, args.rank, args.device)), "\n")
    print(table("common_basis", bench_common(common, args.rank, args.device)))


if __name__ == "__main__":
    main()
