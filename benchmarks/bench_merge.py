"""Benchmark `lrs merge` against PEFT's merge_and_unload and against a plain copy of the checkpoint.

    python benchmarks/bench_merge.py                        # /tmp/smol and /tmp/llama-1b when present
    python benchmarks/bench_merge.py --model smol=/tmp/smol --method lora --json merge.json

Every contender runs as its own subprocess, under `/usr/bin/time -v` when it exists (else a small
wrapper reads the child's ru_maxrss), so wall time and peak RSS are measured the same way for all:
- interpreter: `python -c "import torch, lowrank_surgery"` (the floor the RSS ratios are taken above);
- copy: `cp -r BASE OUT` (the I/O floor);
- lrs: `lrs merge ADAPTER BASE OUT`;
- peft: transformers `from_pretrained` + `PeftModel.from_pretrained` + `merge_and_unload` + `save_pretrained`.
Adapters: LoRA r=16 on all linear layers with random non-zero B, and FOSSIL (balance, r=16, random blocks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import lowrank_surgery as lrs

TIME = Path("/usr/bin/time")
PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""
RUSAGE_SCRIPT = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"BENCH {wall} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime} {code}", file=sys.stderr)
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        found = re.search(r"model name\s*:\s*(.+)", info.read_text())
        cpu = found.group(1).strip() if found else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.system()} {platform.release()}")


def measure(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one command run as a fresh subprocess."""
    if TIME.exists():
        res = subprocess.run([str(TIME), "-v", *command], capture_output=True, text=True)
        _check(res, command)
        field = lambda label: re.search(rf"{label}: ([\d:.]+)", res.stderr).group(1)  # noqa: E731
        clock = field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)")
        wall = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
        cpu = float(field(r"User time \(seconds\)")) + float(field(r"System time \(seconds\)"))
        return {"seconds": wall, "cpu_seconds": cpu, "rss_mb": int(field(r"Maximum resident set size \(kbytes\)")) / 1024}
    res = subprocess.run([sys.executable, "-c", RUSAGE_SCRIPT, *command], capture_output=True, text=True)
    _check(res, command)
    wall, rss, cpu, _ = re.search(r"BENCH (\S+) (\d+) (\S+) (\d+)", res.stderr).groups()
    return {"seconds": float(wall), "cpu_seconds": float(cpu), "rss_mb": int(rss) / 1024}


def _check(res: subprocess.CompletedProcess, command: list[str]) -> None:
    if res.returncode != 0:
        own = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("\t")]  # not time -v's
        tail = "\n".join(own[-5:])
        raise SystemExit(f"benchmark command failed ({res.returncode}): {' '.join(command)}\n{tail}")


def make_adapters(base: Path, methods: list[str], directory: Path) -> dict[str, Path]:
    """LoRA r=16 all-linear (random B) and FOSSIL balance r=16 (random blocks), saved once per model."""
    recipes = {"lora": ("lora_B.weight", 0.01), "fossil": ("miss_block", 0.001)}
    paths = {}
    for method in methods:
        if method not in lrs.METHODS:
            print(f"skipping {method}: not available in this build", file=sys.stderr)
            continue
        path = directory / f"adapter-{method}"
        if not path.exists():
            adapter = lrs.init_adapter(method, base, r=16, alpha=16, targets="all-linear", seed=0)
            name, scale = recipes[method]
            gen = torch.Generator().manual_seed(1)
            for params in adapter.weights.values():
                params[name] = torch.randn(params[name].shape, generator=gen) * scale
            lrs.save_adapter(adapter, path)
        paths[method] = path
    return paths


def contenders(base: Path, adapter: Path, out: Path, peft: bool) -> dict[str, list[str]]:
    lrs_cli = shutil.which("lrs", path=str(Path(sys.executable).parent)) or shutil.which("lrs")
    merge = [lrs_cli] if lrs_cli else [sys.executable, "-c", "from lowrank_surgery.cli.app import main; main()"]
    runs = {"copy": ["cp", "-r", str(base.resolve()), str(out)],
            "lrs merge": [*merge, "merge", str(adapter), str(base), str(out), "--quiet"]}
    if peft:
        runs["peft"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(out)]
    return runs


def bench_model(name: str, base: Path, methods: list[str], work: Path, peft: bool, repeat: int) -> list[dict]:
    floor = min((measure([sys.executable, "-c", "import torch, lowrank_surgery"]) for _ in range(repeat)),
                key=lambda m: m["seconds"])
    shard_mb = max(p.stat().st_size for p in base.glob("*.safetensors")) / 2**20
    rows = []
    for method, adapter in make_adapters(base, methods, work / name).items():
        out = work / name / "out"
        results = {}
        for contender, command in contenders(base, adapter, out, peft).items():
            best = None
            for _ in range(repeat):
                shutil.rmtree(out, ignore_errors=True)
                m = measure(command)
                best = m if best is None or m["seconds"] < best["seconds"] else best
            shutil.rmtree(out, ignore_errors=True)
            results[contender] = best
        results["interpreter"] = floor
        rows += [{"model": name, "method": method, "contender": c, **m, "interpreter_rss_mb": floor["rss_mb"],
                  "largest_shard_mb": shard_mb} for c, m in results.items()]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | contender | wall s | CPU s | peak RSS MB | RSS above interpreter / largest shard "
             "| speedup vs PEFT | time vs copy |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        peers = {r["contender"]: r for r in rows if r["model"] == row["model"] and r["method"] == row["method"]}
        python = row["contender"] != "copy"
        above = f"{(row['rss_mb'] - row['interpreter_rss_mb']) / row['largest_shard_mb']:.2f}" if python else "n/a"
        speedup = f"{peers['peft']['seconds'] / row['seconds']:.1f}x" if "peft" in peers else "n/a"
        vs_copy = f"{row['seconds'] / peers['copy']['seconds']:.1f}x"
        lines.append(f"| {row['model']} | {row['method']} | {row['contender']} | {row['seconds']:.1f} | "
                     f"{row['cpu_seconds']:.1f} | {row['rss_mb']:.0f} | {above} | {speedup} | {vs_copy} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", metavar="NAME=DIR",
                        help="checkpoint to merge into (repeatable); default smol=/tmp/smol, llama-1b=/tmp/llama-1b")
    parser.add_argument("--method", action="append", choices=["lora", "fossil"], help="default: lora and fossil")
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (the fastest is kept)")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT (it holds the whole model in memory)")
    parser.add_argument("--workdir", type=Path, help="where adapters and outputs go (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    specs = args.model or [f"{n}={p}" for n, p in (("smol", "/tmp/smol"), ("llama-1b", "/tmp/llama-1b"))
                           if Path(p, "config.json").is_file()]
    if not specs:
        raise SystemExit("no checkpoint: pass --model NAME=DIR (python examples/smollm2.py /tmp/smol makes one)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    rows = []
    for spec in specs:
        name, _, path = spec.partition("=")
        (work / name).mkdir(parents=True, exist_ok=True)
        rows += bench_model(name, Path(path), args.method or ["lora", "fossil"], work, not args.no_peft, args.repeat)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"Machine: {machine()}\nTimer: {'/usr/bin/time -v' if TIME.exists() else 'getrusage(RUSAGE_CHILDREN)'}, "
          f"best of {args.repeat}\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
