"""Init speed: `lrs init --method pissa|cola` against PEFT's PiSSA init, on every linear of a model.

    python benchmarks/bench_init.py /tmp/smol [--rank 8] [--repeat 1] [--json out.json]

lrs is timed end to end (read the checkpoint, SVD, build the adapter; no file written). PEFT is
timed on `get_peft_model` only, the model already loaded in float32. Every run's rank-r part s·B0·A0
(sign and scaling conventions cancel) is compared with PEFT's and with the truncation computed by a
float64 SVD (the truth both approximate): the largest entrywise error relative to the module's largest entry.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def lrs_init(base: str, method: str, rank: int, algorithm: str, niter: int):
    import lowrank_surgery as lrs

    options = {"init_svd": algorithm, **({"niter": niter} if algorithm == "randomized" else {})}
    return _timed(lambda: lrs.init_adapter(method, base, r=rank, targets="all-linear", options=options))


def peft_init(base: str, rank: int, init: str):
    """(seconds for get_peft_model, {module path: s·B·A of PEFT's factors})."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear", init_lora_weights=init)
    seconds, peft_model = _timed(lambda: get_peft_model(model, config))
    parts = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            path = name.removeprefix("base_model.model.")
            b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
            parts[path] = (module.scaling["default"] * b @ a).detach()
    return seconds, parts


def rank_r_parts(adapter) -> dict[str, torch.Tensor]:
    """{module path: s·B0·A0} of an lrs PiSSA/CoLA adapter."""
    return {path: adapter.config.scale(path) * params["pissa_B0.weight"] @ params["pissa_A0.weight"]
            for path, params in adapter.weights.items()}


def float64_parts(base: str, paths, rank: int) -> dict[str, torch.Tensor]:
    """{module path: rank-r truncation of W by a float64 SVD}."""
    from lowrank_surgery.checkpoint import Checkpoint

    ckpt = Checkpoint(base)
    parts = {}
    for path in paths:
        u, s, vh = torch.linalg.svd(ckpt.get(f"{path}.weight").double(), full_matrices=False)
        parts[path] = ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()
    return parts


def max_relative_difference(parts, reference) -> float:
    """Largest |part − reference| / max |reference| over all modules."""
    return max(((parts[p] - ref).abs().max() / ref.abs().max()).item() for p, ref in reference.items())


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, "
            f"torch {torch.__version__}, torch threads {torch.get_num_threads()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="model directory (e.g. /tmp/smol)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--niter", type=int, default=4, help="power iterations, as pissa_niter_4")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the best is kept")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def best(fn):
        runs = [fn() for _ in range(args.repeat)]
        return min(r[0] for r in runs), runs[0][1]

    peft_exact, exact_parts = best(lambda: peft_init(args.base, args.rank, "pissa"))
    peft_fast, fast_parts = best(lambda: peft_init(args.base, args.rank, f"pissa_niter_{args.niter}"))
    truth = float64_parts(args.base, exact_parts, args.rank)
    rows = [("PEFT get_peft_model", "pissa", peft_exact, None, max_relative_difference(exact_parts, truth)),
            ("PEFT get_peft_model", f"pissa_niter_{args.niter}", peft_fast, None,
             max_relative_difference(fast_parts, truth))]
    peers = {"gram": (peft_exact, exact_parts), "exact": (peft_exact, exact_parts), "randomized": (peft_fast, fast_parts)}
    for method in ("pissa", "cola"):
        for algorithm, (reference, parts) in peers.items():
            seconds, adapter = best(lambda: lrs_init(args.base, method, args.rank, algorithm, args.niter))
            ours = rank_r_parts(adapter)
            rows.append((f"lrs init --method {method}", algorithm, seconds,
                         (reference / seconds, max_relative_difference(ours, parts)), max_relative_difference(ours, truth)))

    print(f"Init of all linear modules of {args.base}, r={args.rank} ({machine()})\n")
    print("| run | SVD | seconds | PEFT / lrs | rel. diff of s·B0·A0 vs PEFT | rel. error vs float64 SVD |")
    print("|---|---|---:|---:|---:|---:|")
    for name, svd, seconds, extra, error in rows:
        ratio, diff = (f"{extra[0]:.2f}x", f"{extra[1]:.1e}") if extra else ("", "")
        print(f"| {name} | {svd} | {seconds:.2f} | {ratio} | {diff} | {error:.1e} |")
    print("\nRatios compare gram and exact with PEFT `pissa`, randomized with "
          f"`pissa_niter_{args.niter}`; randomized factors differ from PEFT's by design (other random draws).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "base": args.base, "rank": args.rank,
                       "rows": [{"run": n, "svd": s, "seconds": t, "speedup": e[0] if e else None,
                                 "max_rel_diff_vs_peft": e[1] if e else None, "max_rel_error": err}
                                for n, s, t, e, err in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
