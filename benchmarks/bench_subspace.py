"""Benchmark `lrs extract-subspace` against the straightforward route, each run in a fresh subprocess.

    python benchmarks/bench_subspace.py [--model smol=/tmp/smol] [--model llama-1b=/tmp/llama-1b]
        [--algorithms exact gram randomized] [--rank 64] [--niter 8] [--threads N] [--json out.json]

Straightforward route: `AutoModelForCausalLM.from_pretrained` (checkpoint dtype), then `torch.linalg.svd` of each
q/k/v weight (float32) in a loop. Reported per run: wall time of the work (after imports, including reading
the weights), peak RSS of the process, and against the straightforward bases: the largest principal angle
(`scipy.linalg.subspace_angles`) and the largest relative difference of the captured energy, over all modules.
`--threads` sets OMP/MKL threads of every child alike (on a crowded small machine, 1 avoids oversubscription).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lowrank_surgery.subspace import DEFAULT_NITER

TARGETS = ("q_proj", "k_proj", "v_proj")
DEFAULT_MODELS = {"smol": "/tmp/smol", "llama-1b": "/tmp/llama-1b"}


# ------------------------------------------------------------------------------------------------ children


def child_lrs(model: str, out: Path, algorithm: str, rank: int, niter: int) -> dict:
    from transformers import AutoModelForCausalLM  # noqa: F401  (imported before the clock, as in the baseline)

    from lowrank_surgery.subspace import extract_subspace

    start = time.perf_counter()
    info = extract_subspace([model], out, rank=rank, targets=",".join(TARGETS), algorithm=algorithm, niter=niter)
    return {"wall_s": time.perf_counter() - start, "energy": info["energy"], "bases": str(out / "subspace.safetensors")}


def child_baseline(model: str, out: Path, rank: int) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    net = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    bases, energy = {}, {}
    for name, module in net.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            u, s, _ = torch.linalg.svd(module.weight.detach().float(), full_matrices=False)
            bases[f"{name}.basis"] = u[:, :rank].contiguous()
            energy[name] = float(s[:rank].double().square().sum() / s.double().square().sum())
    wall = time.perf_counter() - start
    save_file(bases, out / "bases.safetensors")
    return {"wall_s": wall, "energy": energy, "bases": str(out / "bases.safetensors")}


def run_child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child == "baseline":
        result = child_baseline(args.child_model, out, args.rank)
    else:
        result = child_lrs(args.child_model, out / "sub", args.child, args.rank, args.niter)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent


def spawn(kind: str, model: str, work: Path, args: argparse.Namespace) -> dict:
    """Run one contender in a fresh interpreter; its RESULT line, or an error entry."""
    env = dict(os.environ)
    if args.threads:
        env.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    cmd = [sys.executable, __file__, "--child", kind, "--child-model", model, "--out", str(work / kind),
           "--rank", str(args.rank), "--niter", str(args.niter)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("RESULT "):])


def compare(result: dict, reference: dict) -> dict:
    """Largest principal angle and energy relative difference against the reference bases, over all modules."""
    import scipy.linalg
    from safetensors.numpy import load_file

    mine, ref = load_file(result["bases"]), load_file(reference["bases"])
    angles = [float(np.max(scipy.linalg.subspace_angles(mine[k].astype(np.float64), ref[k].astype(np.float64))))
              for k in ref]
    energy = [abs(result["energy"][name] - e) / e for name, e in reference["energy"].items()]
    return {"max_angle": max(angles), "median_angle": float(np.median(angles)), "energy_rel_diff": max(energy)}


def bench(name: str, model: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-subspace-") as tmp:
        base = spawn("baseline", model, Path(tmp), args)
        rows.append({"model": name, "route": "transformers + torch.linalg.svd loop", **_public(base)})
        for algorithm in args.algorithms:
            res = spawn(algorithm, model, Path(tmp), args)
            row = {"model": name, "route": f"lrs extract-subspace --algorithm {algorithm}", **_public(res)}
            if "error" not in res and "error" not in base:
                row.update(compare(res, base), speedup=base["wall_s"] / res["wall_s"])
            rows.append(row)
            print(f"  {row['route']}: {row.get('wall_s', row.get('error'))}", file=sys.stderr)
    return rows


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("bases", "energy")}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.system()} {cpu}, {os.cpu_count()} CPUs{gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else ("error: " + row["error"] if key == "wall_s" else "")

    lines = [f"Machine: {machine()}; rank {args.rank}, targets {', '.join(TARGETS)}, scope layer, "
             f"niter {args.niter}, threads {args.threads or 'default'}", "",
             "| model | route | wall (s) | speed-up | peak RSS (MB) | max angle (rad) | energy rel. diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['route']} | {cell(r, 'wall_s', '.2f')} | {cell(r, 'speedup', '.1f')} | "
                     f"{cell(r, 'peak_rss_mb', '.0f')} | {cell(r, 'max_angle', '.1e')} | "
                     f"{cell(r, 'energy_rel_diff', '.1e')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="NAME=PATH (repeatable)")
    parser.add_argument("--algorithms", nargs="+", default=["exact", "gram", "randomized"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--niter", type=int, default=DEFAULT_NITER)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    models = dict(m.split("=", 1) for m in args.model) if args.model else \
        {k: v for k, v in DEFAULT_MODELS.items() if Path(v).exists()}
    rows = []
    for name, path in models.items():
        print(f"{name} ({path})", file=sys.stderr)
        rows += bench(name, path, args)
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rank": args.rank, "niter": args.niter,
                                         "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
