"""Every command on a Llama-3-8B-shaped checkpoint: wall time and peak RSS, each against its peer or floor.

    python benchmarks/make_llama.py /work/big/llama-8b --preset llama3-8b
    python benchmarks/bench_8b.py /work/big/llama-8b --work /work/big/run [--previous-lrs OLD/bin/lrs]
        [--steps merge,subspace,straightforward,accuracy,init,convert,peft] [--init-default-layers 2]

Each command is a fresh process under `/usr/bin/time -v` (bench_merge.measure). Outputs are deleted as soon
as the next step no longer needs them (the disk holds the base and at most two 16 GB outputs). Rows are
appended to WORK/rows.jsonl as they finish, so an interrupted run keeps what it measured; the tables are
printed at the end from that file.
- merge: `cp -r` of the checkpoint (before and after), `lrs merge`/`unmerge` of LoRA r=16 all-linear (random B)
  and FOSSIL balance r=16, `lrs extract-lora` r=16 (randomized and gram) between the LoRA-merged and the base.
- subspace: `extract-subspace` q/k/v r=64, gram (default) and randomized, alternated with the previous
  install's gram (`--previous-lrs`) A B A B. straightforward: transformers in bf16 + `torch.linalg.svd` per
  matrix (bench_subspace.py's baseline). accuracy: against a float64 SVD of the q/k/v weights of a few layers.
- init: `init --method pissa|cola` all-linear r=16 with `--init-svd randomized` (and gram for PiSSA: CoLA's
  init is the same SVD) on the whole model;
  the default (exact, float32 `torch.linalg.svd` of every matrix) on a `--init-default-layers` copy of the
  8B shapes, since 32 layers of it take over an hour here; its per-layer time is reported.
- convert: the CoLA adapter from init to peft-lora (`--base`). peft: PEFT's merge_and_unload at 8B.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_merge import PEFT_SCRIPT, machine, make_adapters, measure  # noqa: E402
from make_llama import generate  # noqa: E402

HERE = Path(__file__).parent
STEPS = ("subspace", "accuracy", "merge", "init", "convert", "straightforward", "peft")
QKV = "q_proj,k_proj,v_proj"


class Bench:
    """The checkpoint, the work directory and the rows measured so far."""

    def __init__(self, base: Path, work: Path, lrs: str, previous: str | None) -> None:
        self.base, self.work, self.lrs, self.previous = base, work, lrs, previous
        self.rows = work / "rows.jsonl"

    def run(self, step: str, label: str, command: list[str], out: Path | None = None, keep: bool = False,
            may_fail: bool = False) -> dict:
        """Measure one command; record its row; delete `out` afterwards unless `keep`."""
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        try:
            row = {"step": step, "label": label, **measure(command)}
        except SystemExit as failure:  # measure() exits when the command fails
            if not may_fail:
                raise
            row = {"step": step, "label": label, "error": str(failure).splitlines()[0]}
        if out is not None and not keep:
            shutil.rmtree(out, ignore_errors=True)
        with self.rows.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row


def merge_steps(b: Bench) -> None:
    adapters = make_adapters(b.base, ["lora", "fossil"], b.work)
    copy, merged, unmerged = b.work / "copy", b.work / "merged", b.work / "unmerged"
    b.run("merge", "cp -r (before)", ["cp", "-r", str(b.base), str(copy)], copy)
    for method, adapter in adapters.items():
        b.run("merge", f"lrs merge ({method})", [b.lrs, "merge", str(adapter), str(b.base), str(merged), "--quiet"],
              merged, keep=True)
        b.run("merge", f"lrs unmerge ({method})",
              [b.lrs, "unmerge", str(adapter), str(merged), str(unmerged), "--quiet"], unmerged)
        if method == "lora":
            out = b.work / "extracted"
            b.run("merge", "lrs extract-lora r=16 (randomized)",
                  [b.lrs, "extract-lora", str(merged), str(b.base), str(out), "--rank", "16", "--algorithm",
                   "randomized", "--quiet"], out)
        shutil.rmtree(merged, ignore_errors=True)
    b.run("merge", "cp -r (after)", ["cp", "-r", str(b.base), str(copy)], copy)


def subspace_command(lrs: str, base: Path, out: Path, algorithm: str) -> list[str]:
    return [lrs, "extract-subspace", str(base), "--out", str(out), "--rank", "64", "--targets", QKV,
            "--algorithm", algorithm, "--quiet"]


def subspace_steps(b: Bench) -> None:
    """This install's gram against the previous install's, alternated; randomized once."""
    contenders = [("gram", b.lrs)] + ([("gram (previous)", b.previous)] if b.previous else [])
    for _ in range(2):
        for label, lrs in contenders:
            out = b.work / f"subspace-{label.split()[-1].strip('()')}"
            b.run("subspace", f"extract-subspace {label}", subspace_command(lrs, b.base, out, "gram"), out, keep=True)
    out = b.work / "subspace-randomized"
    b.run("subspace", "extract-subspace randomized", subspace_command(b.lrs, b.base, out, "randomized"), out, keep=True)


def straightforward_step(b: Bench) -> None:
    out = b.work / "straightforward"
    b.run("subspace", "transformers bf16 + torch.linalg.svd loop",
          [sys.executable, str(HERE / "bench_subspace.py"), "--child", "baseline", "--child-model", str(b.base),
           "--out", str(out), "--rank", "64"], out, may_fail=True)


def accuracy_step(b: Bench, layers: list[int]) -> None:
    """Captured energy and principal angles of each saved basis against a float64 SVD (a few layers)."""
    import scipy.linalg
    from safetensors.torch import load_file

    from lowrank_surgery.checkpoint import Checkpoint

    ckpt = Checkpoint(b.base)
    saved = {p.name.removeprefix("subspace-"): load_file(p / "subspace.safetensors")
             for p in sorted(b.work.glob("subspace-*"))}
    for layer in layers:
        for kind in QKV.split(","):
            name = f"model.layers.{layer}.self_attn.{kind}"
            w = ckpt.get(f"{name}.weight").double().numpy()
            u, s, _ = np.linalg.svd(w, full_matrices=False)
            truth = float((s[:64] ** 2).sum() / (s ** 2).sum())
            for route, bases in saved.items():
                basis = bases[f"{name}.basis"].double().numpy()
                energy = float(np.square(basis.T @ w).sum() / np.square(w).sum())
                angle = float(np.max(scipy.linalg.subspace_angles(basis, u[:, :64])))
                row = {"step": "accuracy", "label": f"{route} {name}", "energy_diff": abs(energy - truth),
                       "max_angle": angle}
                with b.rows.open("a") as f:
                    f.write(json.dumps(row) + "\n")


def init_steps(b: Bench, default_layers: int) -> None:
    for method, svd in (("pissa", "randomized"), ("pissa", "gram"), ("cola", "randomized")):
        out = b.work / f"init-{method}-{svd}"
        b.run("init", f"init {method} --init-svd {svd} (32 layers)",
              [b.lrs, "init", "--method", method, "--base", str(b.base), "--rank", "16", "--targets", "all-linear",
               "--init-svd", svd, "--out", str(out), "--quiet"], out, keep=method == "cola")
    small = generate(b.work / f"llama-8b-{default_layers}l", "llama3-8b", layers=default_layers)
    for method in ("pissa", "cola"):
        out = b.work / f"init-{method}-exact"
        b.run("init", f"init {method} (default: exact) ({default_layers} layers)",
              [b.lrs, "init", "--method", method, "--base", str(small), "--rank", "16", "--targets", "all-linear",
               "--out", str(out), "--quiet"], out)


def convert_step(b: Bench) -> None:
    out = b.work / "cola-as-peft-lora"
    b.run("convert", "convert CoLA (randomized init, 32 layers) --to peft-lora",
          [b.lrs, "convert", str(b.work / "init-cola-randomized"), str(out), "--to", "peft-lora", "--base",
           str(b.base), "--quiet"], out)


def peft_step(b: Bench) -> None:
    adapter = make_adapters(b.base, ["lora"], b.work)["lora"]
    out = b.work / "peft-merged"
    b.run("peft", "PEFT merge_and_unload (lora)", [sys.executable, "-c", PEFT_SCRIPT, str(b.base), str(adapter),
                                                   str(out)], out, may_fail=True)


def tables(rows_path: Path) -> str:
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    timed = [r for r in rows if r["step"] != "accuracy"]
    lines = ["| step | command | wall s | CPU s | peak RSS MB |", "|---|---|---:|---:|---:|"]
    for r in timed:
        if "error" in r:
            lines.append(f"| {r['step']} | {r['label']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['step']} | {r['label']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                         f"{r['rss_mb']:.0f} |")
    accuracy = [r for r in rows if r["step"] == "accuracy"]
    if accuracy:
        lines += ["", "| basis | max energy diff vs float64 SVD | max principal angle |", "|---|---:|---:|"]
        for route in sorted({r["label"].split()[0] for r in accuracy}):
            mine = [r for r in accuracy if r["label"].split()[0] == route]
            lines.append(f"| {route} | {max(r['energy_diff'] for r in mine):.1e} | "
                         f"{max(r['max_angle'] for r in mine):.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    parser.add_argument("--previous-lrs", help="the `lrs` of an earlier install, to time its gram route alongside")
    parser.add_argument("--init-default-layers", type=int, default=1)
    parser.add_argument("--accuracy-layers", default="0,31", help="layers whose q/k/v get a float64 SVD")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    lrs = shutil.which("lrs", path=str(Path(sys.executable).parent)) or "lrs"
    b = Bench(args.base.resolve(), args.work.resolve(), lrs, args.previous_lrs)
    steps = args.steps.split(",")
    start = time.time()
    for step, run in (("subspace", subspace_steps),
                      ("accuracy", lambda b: accuracy_step(b, [int(x) for x in args.accuracy_layers.split(",")])),
                      ("merge", merge_steps), ("init", lambda b: init_steps(b, args.init_default_layers)),
                      ("convert", convert_step), ("straightforward", straightforward_step), ("peft", peft_step)):
        if step in steps:
            run(b)
    print(f"Machine: {machine()}; {time.time() - start:.0f} s\n")
    print(tables(b.rows))


if __name__ == "__main__":
    main()
