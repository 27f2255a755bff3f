"""The first run on a CUDA machine: tests, kernel benchmark and CUDA-vs-CPU checks, in one JSON report.

    python benchmarks/gpu_check.py [--work runs/gpu-check] [--report gpu-check.json] [--quick]

1. bench_kernels.py: lrs vs PEFT LoRA and MiSS layers, forward+backward, bf16, Llama-7B shapes, r 8/16/64,
   dropout 0 and 0.1 (and bat with the Triton kernel forced, to check that `auto` is right to use torch);
2. on the generated 1B Llama-shaped checkpoint, each with `--device cuda` against `--device cpu`:
   extract-subspace (q/k/v, r 64, gram and randomized), init pissa (attention, r 16), merge (LoRA r 16,
   all-linear) and extract-lora (attention, r 16): results equal within the stated tolerances, and the time ratio;
3. the kernel and training tests on the GPU (kernel tests then run the compiled Triton kernels, half precision
   included; training tests run their steps through them; `--tests` picks others).
Without CUDA it says so on stderr and exits 1. Each part is recorded even when another fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ATTENTION = "q_proj,k_proj,v_proj,o_proj"


def timed(run: Callable[[], object]) -> tuple[object, float]:
    """(result, wall seconds)."""
    start = time.perf_counter()
    result = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run_tests(report: dict, tests: list[str]) -> None:
    """pytest on the GPU: the given files whole, their slow multi-process tests included (the ahead-of-time
    compile test, for machines without a GPU, lives in a file of its own)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # the installed package, not the source folder it is mapped from
    proc, seconds = timed(lambda: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env))
    lines = proc.stdout.strip().splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    report["tests"] = {"returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-2000:],
                       "failures": failures[:50], "output_tail": proc.stdout[-20000:], "seconds": round(seconds, 1)}


def run_bench(report: dict, work: Path, quick: bool) -> None:
    """bench_kernels.py as auto runs it, then bat with the Triton kernel forced."""
    extra = ["--tokens", "4096", "--ranks", "16", "--reps", "5"] if quick else ["--tokens", "4096", "16384"]
    for name, args in (("auto", []), ("bat_triton", ["--methods", "bat", "--kernels", "triton"])):
        out = work / f"bench_{name}.json"
        proc = subprocess.run([sys.executable, str(HERE / "bench_kernels.py"), "--json", str(out), *args, *extra],
                              cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout, proc.stderr[-3000:], flush=True)
        report[f"kernels_{name}"] = json.loads(out.read_text()) if out.exists() else {"error": proc.stderr[-3000:]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def both_devices(name: str, run: Callable[[str], object], compare: Callable[[object, object], dict],
                 tolerance: dict) -> dict:
    """Run on cpu then cuda, compare, and check every compared number is within its tolerance."""
    cpu, t_cpu = timed(lambda: run("cpu"))
    gpu, t_gpu = timed(lambda: run("cuda"))
    errors = compare(gpu, cpu)
    passed = all(errors[k] <= tol for k, tol in tolerance.items())
    print(f"{name}: cpu {t_cpu:.1f} s, cuda {t_gpu:.1f} s ({t_cpu / t_gpu:.1f}x); {errors}; "
          f"{'ok' if passed else 'NOT within ' + str(tolerance)}", flush=True)
    return {"check": name, "cpu_s": round(t_cpu, 2), "cuda_s": round(t_gpu, 2), "speedup": round(t_cpu / t_gpu, 2),
            "errors": errors, "tolerance": tolerance, "passed": passed}


def check_subspace(ckpt: Path, work: Path, algorithm: str) -> dict:
    from safetensors.torch import load_file

    import lowrank_surgery as lrs

    def run(device: str) -> dict:
        out = work / f"subspace-{algorithm}-{device}"
        lrs.extract_subspace([str(ckpt)], out, rank=64, algorithm=algorithm, device=device, force=True)
        return load_file(out / "subspace.safetensors")

    def compare(gpu: dict, cpu: dict) -> dict:
        names = [k for k in cpu if k.endswith(".basis")]
        # Projectors U Uᵀ do not depend on signs or on rotations inside the subspace.
        proj = max(rel(gpu[k] @ gpu[k].T, cpu[k] @ cpu[k].T) for k in names)
        sv = max(rel(gpu[k.replace("basis", "singular_values")], cpu[k.replace("basis", "singular_values")])
                 for k in names)
        return {"projector_rel": proj, "singular_values_rel": sv}

    tol = {"projector_rel": 1e-2 if algorithm == "randomized" else 1e-3, "singular_values_rel": 1e-4}
    return both_devices(f"extract-subspace {algorithm}", run, compare, tol)


def check_pissa(ckpt: Path) -> dict:
    import lowrank_surgery as lrs

    def run(device: str) -> dict:
        adapter = lrs.init_adapter("pissa", str(ckpt), r=16, targets=ATTENTION, device=device)
        return {p: w["pissa_B0.weight"] @ w["pissa_A0.weight"] for p, w in adapter.weights.items()}

    compare = lambda gpu, cpu: {"B0A0_rel": max(rel(gpu[p], cpu[p]) for p in cpu)}  # noqa: E731
    return both_devices("init pissa", run, compare, {"B0A0_rel": 1e-3})


def check_merge(ckpt: Path, work: Path) -> dict:
    from safetensors import safe_open

    import lowrank_surgery as lrs

    adapter = work / "lora-r16"
    adapter_obj = lrs.init_adapter("lora", str(ckpt), r=16, targets="all-linear", seed=1)
    for params in adapter_obj.weights.values():  # B = 0 at init: give the update a size
        params["lora_B.weight"].normal_(std=0.02)
    lrs.save_adapter(adapter_obj, adapter, force=True)

    def run(device: str) -> Path:
        out = work / f"merged-{device}"
        lrs.merge_adapter(adapter, str(ckpt), out, device=device, force=True)
        return out

    def compare(gpu: Path, cpu: Path) -> dict:
        worst, differing, total = 0.0, 0, 0
        for shard in sorted(cpu.glob("*.safetensors")):
            with safe_open(shard, "pt") as a, safe_open(gpu / shard.name, "pt") as b:
                for key in a.keys():
                    x, y = a.get_tensor(key).float(), b.get_tensor(key).float()
                    worst = max(worst, rel(y, x))
                    differing += int((x != y).sum())
                    total += x.numel()
        return {"max_rel": worst, "fraction_differing": differing / total}

    # bf16 output: cpu and cuda float32 sums may round to neighbouring bf16 values (2^-8 relative) in rare elements.
    return both_devices("merge lora", run, compare, {"max_rel": 2 ** -7, "fraction_differing": 1e-3})


def check_extract_lora(ckpt: Path, work: Path) -> dict:
    from safetensors.torch import load_file

    import lowrank_surgery as lrs

    merged = work / "merged-cpu"

    def run(device: str) -> dict:
        out = work / f"extracted-{device}"
        lrs.extract_lora(str(merged), str(ckpt), out, rank=16, targets=ATTENTION, device=device, force=True)
        w = load_file(out / "adapter_model.safetensors")
        return {k[: -len(".lora_A.weight")]: w[k.replace("lora_A", "lora_B")] @ w[k] for k in w if "lora_A" in k}

    compare = lambda gpu, cpu: {"BA_rel": max(rel(gpu[p], cpu[p]) for p in cpu)}  # noqa: E731
    return both_devices("extract-lora", run, compare, {"BA_rel": 1e-3})


def run_devices(report: dict, work: Path, layers: int) -> None:
    """CUDA against CPU on the generated checkpoint; each check recorded even when one fails."""
    sys.path.insert(0, str(HERE))
    from make_llama import generate

    ckpt, seconds = timed(lambda: generate(work / f"llama-{layers}l", layers=layers))
    report["checkpoint"] = {"path": str(ckpt), "layers": layers, "generate_s": round(seconds, 1)}
    checks = [lambda: check_subspace(ckpt, work, "gram"), lambda: check_subspace(ckpt, work, "randomized"),
              lambda: check_pissa(ckpt), lambda: check_merge(ckpt, work), lambda: check_extract_lora(ckpt, work)]
    report["devices"] = []
    for check in checks:
        try:
            report["devices"].append(check())
        except Exception as error:  # noqa: BLE001: record and go on to the next check
            report["devices"].append({"error": f"{type(error).__name__}: {error}"[:2000]})
            print(report["devices"][-1], flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/gpu-check"))
    parser.add_argument("--report", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--quick", action="store_true", help="fewer benchmark rows and a 4-layer checkpoint")
    parser.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "devices"])
    parser.add_argument("--tests", nargs="*", default=["tests/test_kernels.py", "tests/test_train.py"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing was checked", file=sys.stderr)
        return 1
    import triton

    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "cuda": torch.version.cuda, "lrs_kernels": os.environ.get("LRS_KERNELS", "auto")}
    parts = {"bench": lambda: run_bench(report, args.work, args.quick),
             "devices": lambda: run_devices(report, args.work, 4 if args.quick else 16),
             "tests": lambda: run_tests(report, args.tests)}
    for name, part in parts.items():
        if name in args.skip:
            continue
        _, seconds = timed(part)
        report[f"{name}_s"] = round(seconds, 1)
        args.report.write_text(json.dumps(report, indent=1, default=str))
        print(f"== {name} done in {seconds:.0f} s", flush=True)
    failed = [c for c in report.get("devices", []) if not c.get("passed")]
    ok = report.get("tests", {}).get("returncode", 0) == 0 and not failed
    print(f"gpu_check: {'all checks passed' if ok else 'some checks failed'}; report in {args.report}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
