"""Which method? Every lrs method and variant fine-tuned on one task at one trainable-parameter budget.

    python examples/smollm2.py /tmp/smol                                     # once: the model
    python benchmarks/bench_methods.py /tmp/smol [--quick] [--out runs/methods] [--png PATH]

SmolLM2-135M-Instruct learns three-digit addition ("482+919=" -> "1401", examples/data/make_addition.py:
4000 train, 128 val, 300 test sums, disjoint). Every adapter targets q_proj, k_proj and v_proj. The budget is
LoRA's trainable parameters at rank 8; every other variant takes the rank whose count is nearest to it
(CoRA frozen trains A only, CoLA trains 2 A's and 3 B's, FOSSIL one block per module; FOSSIL mini's block is 64
wide), and one extra row keeps CoRA frozen at LoRA's rank (half the budget: the CoRA paper's claim). CoRA's basis
is the model's own subspace (`extract-subspace`, one basis per layer). Alpha = rank, dropout 0, AdamW with
warmup + cosine, batch 8, the same steps for all.

Learning rate: a sweep of LEARNING_RATES (4x apart) on each method's first variant (seed 0, the full run); the
lowest final val loss wins and the method's other variants use it. When an edge of the grid wins, the sweep tries
one more 4x step past it (at most twice). Then every variant runs 3 seeds (seed: the adapter's
random init and the data order). Reported per variant: the final val loss and the test accuracy (exact match of
the first number greedily generated, which gives the base model every chance) as mean ± std over seeds, the
median tokens/s and the peak RSS of a run (init + training). Runs go two at a time, one thread each (2 cores), so
tokens/s compare methods with each other, not with a whole machine. The base model's score is the floor.

Writes OUT/results.jsonl (every run), OUT/table.md, OUT/eval_loss.png (mean val loss curves) and each run's
adapter and metrics.jsonl under OUT/runs/. A run whose result.json matches its settings is not rerun, so an
interrupted study continues where it stopped. --quick: 30 steps, 1 seed, no sweep (~5 min) for smoke runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples" / "data"))
import make_addition  # noqa: E402  (examples/data is not a package)

TARGETS = "q_proj,k_proj,v_proj"
BUDGET_RANK = 8  # the budget: LoRA's trainable parameters at this rank
LEARNING_RATES = (5e-4, 2e-3, 8e-3)
GRID_STEP = 4  # the sweep's spacing, and how far past an edge it looks when the edge wins
MAX_EXTENSIONS = 2
QUICK_LR = 2e-3


@dataclass(frozen=True)
class Variant:
    method: str
    name: str  # shown in the table ("" for a method without variants)
    options: dict = field(default_factory=dict)
    rank: int | None = None  # None: the rank that meets the budget

    @property
    def key(self) -> str:
        return f"{self.method}-{self.name}".rstrip("-").replace(" ", "_").replace("'", "")


VARIANTS = (  # each method's first variant is the one its learning rate is swept on
    Variant("lora", ""),
    Variant("pissa", ""),
    Variant("cora", "frozen", {"cora_mode": "frozen"}),
    Variant("cora", "init", {"cora_mode": "init"}),
    Variant("cora", "frozen at LoRA's rank", {"cora_mode": "frozen"}, rank=BUDGET_RANK),
    Variant("cola", "heuristic", {"strategy": "heuristic", "num_a": 2, "num_b": 3}),
    Variant("cola", "fully", {"strategy": "fully", "num_a": 2, "num_b": 3}),
    Variant("cola", "random", {"strategy": "random", "num_a": 2, "num_b": 3}),
    Variant("fossil", "balance", {"variant": "balance"}),
    Variant("fossil", "bat", {"variant": "bat"}),
    Variant("fossil", "mini", {"variant": "mini", "mini_r": 64}),
)


@dataclass(frozen=True)
class Study:
    steps: int
    seeds: int
    sweep: bool
    val: int
    test: int
    eval_every: int
    batch_size: int = 8
    seq_len: int = 16  # every example is 12-13 tokens


FULL = Study(steps=200, seeds=3, sweep=True, val=128, test=300, eval_every=40)
QUICK = Study(steps=30, seeds=1, sweep=False, val=64, test=100, eval_every=10)


# ---------------------------------------------------------------------------- one run (its own process)
def run_job(job: dict) -> dict:
    """Init, train and score one adapter; the result record."""
    import lowrank_surgery as lrs
    from lowrank_surgery.train import train

    torch.set_num_threads(job["threads"])
    run = Path(job["dir"])
    began = time.perf_counter()
    adapter = lrs.init_adapter(job["method"], job["base"], r=job["rank"], targets=TARGETS, seed=job["seed"],
                               options=job["options"], device="cpu")
    summary = train(adapter, job["base"], job["data"]["train"], run, steps=job["steps"], lr=job["lr"],
                    batch_size=job["batch_size"], seq_len=job["seq_len"], eval_data=job["data"]["val"],
                    eval_every=job["eval_every"], save_every=job["steps"], seed=job["seed"], device="cpu", force=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first step warms up
    return {"trainable": summary["trainable_parameters"], "eval_loss": summary["eval_loss"],
            "curve": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
            "accuracy": accuracy(job["base"], run, job["data"]["test"]), "tokens_per_s": statistics.median(speeds),
            "peak_rss_mb": peak_mb, "seconds": time.perf_counter() - began}


def accuracy(base: str, adapter_dir: Path | None, test: str) -> float:
    """Exact-match accuracy on the test sums: the first number the model generates greedily after the prompt."""
    import lowrank_surgery as lrs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter_dir is not None:
        model = lrs.attach(model, lrs.load_adapter(adapter_dir))
    model.eval()
    rows = [json.loads(line) for line in Path(test).read_text().splitlines()]
    by_length: dict[int, list[tuple[list[int], str]]] = {}
    for row in rows:  # prompts of one length batch without padding (there is nothing to get wrong)
        ids = tokenizer(row["prompt"])["input_ids"]  # as lrs train tokenises the prompt
        by_length.setdefault(len(ids), []).append((ids, row["completion"]))
    right = 0
    for group in by_length.values():
        for i in range(0, len(group), 100):
            chunk = group[i:i + 100]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids for ids, _ in chunk]), max_new_tokens=6, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
            for (ids, answer), generated in zip(chunk, out[:, len(chunk[0][0]):]):
                number = re.match(r"\s*(\d+)", tokenizer.decode(generated, skip_special_tokens=True))
                right += bool(number) and number.group(1) == answer
    return right / len(rows)


def base_job(job: dict) -> dict:
    """The floor: the base model's val loss and test accuracy."""
    from lowrank_surgery.data import load_dataset
    from lowrank_surgery.train import Context, evaluate_loss, load_tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    base = Path(job["base"])
    tokenizer = load_tokenizer(base)
    val = load_dataset(job["data"]["val"], tokenizer, job["seq_len"])
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pad_id = tokenizer.eos_token_id  # padding is masked out of the loss: any id serves
    loss = evaluate_loss(model, val, job["batch_size"], pad_id, Context(0, 1, torch.device("cpu")))
    return {"trainable": 0, "eval_loss": loss, "accuracy": accuracy(job["base"], None, job["data"]["test"])}


# ---------------------------------------------------------------------------- the study
def run_all(jobs: list[dict], workers: int) -> list[dict]:
    """Each job in its own process (`--job`), `workers` at a time; a job whose result.json has its settings is
    read back, not rerun."""
    def one(job: dict) -> dict:
        run = Path(job["dir"])
        done = run / "result.json"
        if done.is_file() and json.loads(done.read_text())["job"] == job:
            return json.loads(done.read_text())
        run.mkdir(parents=True, exist_ok=True)
        (run / "job.json").write_text(json.dumps(job))
        with open(run / "log.txt", "w") as log:
            env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "HF_HUB_OFFLINE": "1",
                   "TRANSFORMERS_VERBOSITY": "error"}
            subprocess.run([sys.executable, __file__, "--job", str(run / "job.json")], stdout=log, stderr=log,
                           env=env, check=True)
        result = json.loads(done.read_text())
        print(f"  {run.name}: eval loss {result['eval_loss']:.3f}, accuracy {result['accuracy']:.1%}", flush=True)
        return result

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, jobs))


def solve_ranks(base: str, subspace: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """The budget (LoRA's trainable parameters at BUDGET_RANK) and, per variant, (rank, trainable parameters):
    the rank nearest the budget among those the variant accepts (counts grow linearly with the rank)."""
    import lowrank_surgery as lrs

    def count(variant: Variant, rank: int) -> int:
        adapter = lrs.init_adapter(variant.method, base, r=rank, targets=TARGETS, options=options(variant, subspace),
                                   device="cpu")
        return adapter.num_parameters(trainable_only=True)

    budget = count(VARIANTS[0], BUDGET_RANK)
    ranks = {}
    for variant in VARIANTS:
        if variant.rank is not None:
            ranks[variant.key] = (variant.rank, count(variant, variant.rank))
            continue
        per_rank = count(variant, 1)
        for rank in sorted(range(1, 4 * budget // per_rank + 2), key=lambda r: abs(r * per_rank - budget)):
            try:
                ranks[variant.key] = (rank, count(variant, rank))
                break
            except lrs.LrsError:  # e.g. FOSSIL bat: the rank must divide both dimensions
                continue
        if variant.key not in ranks:
            raise SystemExit(f"{variant.key}: no rank near the budget of {budget:,} parameters fits this model")
    return budget, ranks


def options(variant: Variant, subspace: Path) -> dict:
    return {**variant.options, "subspace": str(subspace)} if variant.method == "cora" else dict(variant.options)


def study_jobs(args: argparse.Namespace, study: Study, data: dict, ranks: dict, lrs_of: dict[str, float],
               seeds: range, variants: tuple[Variant, ...]) -> list[dict]:
    jobs = []
    for variant in variants:
        for seed in seeds:
            lr = lrs_of[variant.method]
            jobs.append({"method": variant.method, "variant": variant.name, "key": variant.key,
                         "options": options(variant, args.out / "subspace"), "rank": ranks[variant.key][0],
                         "lr": lr, "seed": seed, "steps": study.steps, "batch_size": study.batch_size,
                         "seq_len": study.seq_len, "eval_every": study.eval_every, "base": str(args.base),
                         "data": data, "threads": args.threads,
                         "dir": str(args.out / "runs" / f"{variant.key}-lr{lr:g}-s{seed}")})
    return jobs


def sweep_learning_rates(args: argparse.Namespace, study: Study, data: dict, ranks: dict
                         ) -> tuple[dict[str, float], list[dict]]:
    """Each method's learning rate: the lowest final val loss of its first variant (seed 0) over LEARNING_RATES,
    the grid extended by GRID_STEP past an edge that wins, up to MAX_EXTENSIONS times; and the sweep's runs."""
    grids = {variant.method: list(LEARNING_RATES) for variant in first_variants()}
    while True:
        sweep = run_all([job for variant in first_variants() for lr in grids[variant.method]
                         for job in study_jobs(args, study, data, ranks, {variant.method: lr}, range(1), (variant,))],
                        args.workers)
        best = {method: min((r for r in sweep if r["job"]["method"] == method),
                            key=lambda r: r["eval_loss"])["job"]["lr"] for method in grids}
        beyond = {method: best[method] / GRID_STEP if best[method] == min(grid) else best[method] * GRID_STEP
                  for method, grid in grids.items()
                  if best[method] in (min(grid), max(grid)) and len(grid) < len(LEARNING_RATES) + MAX_EXTENSIONS}
        print("learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in best.items()) +
              "".join(f"; {m} won at the grid's edge, trying {lr:g}" for m, lr in beyond.items()), flush=True)
        if not beyond:
            return best, sweep
        for method, lr in beyond.items():
            grids[method].append(lr)


def first_variants() -> tuple[Variant, ...]:
    seen: dict[str, Variant] = {}
    for variant in VARIANTS:
        seen.setdefault(variant.method, variant)
    return tuple(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", type=Path, default=Path("/tmp/smol"))
    parser.add_argument("--out", type=Path, help="default: runs/methods (runs/methods-quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="30 steps, 1 seed, no sweep: a smoke run")
    parser.add_argument("--png", type=Path, help="also write the eval-loss plot here")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        job = json.loads(args.job.read_text())
        result = base_job(job) if job["method"] == "base" else run_job(job)
        (args.job.parent / "result.json").write_text(json.dumps({"job": job, **result}))
        return
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"{args.base} is not a model directory: run `python examples/smollm2.py {args.base}` first")
    study = QUICK if args.quick else FULL
    args.out = args.out or Path("runs/methods-quick" if args.quick else "runs/methods")
    began = time.perf_counter()
    data = {name: str(path) for name, path in make_addition.write(
        args.out / "data", {"train": 4000, "val": study.val, "test": study.test}).items()}
    import lowrank_surgery as lrs

    lrs.extract_subspace([args.base], args.out / "subspace", rank=32, targets=TARGETS, force=True, device="cpu")
    budget, ranks = solve_ranks(str(args.base), args.out / "subspace")
    print(f"budget: {budget:,} trainable parameters; ranks: " + ", ".join(f"{k} {r}" for k, (r, _) in ranks.items()))
    floor = run_all([{"method": "base", "key": "base", "base": str(args.base), "data": data, "threads": 2,
                      "seq_len": study.seq_len, "batch_size": study.batch_size,
                      "dir": str(args.out / "runs" / "base")}], 1)[0]

    lrs_of, sweep = sweep_learning_rates(args, study, data, ranks) if study.sweep else \
        ({variant.method: QUICK_LR for variant in VARIANTS}, [])
    results = run_all(study_jobs(args, study, data, ranks, lrs_of, range(study.seeds), VARIANTS), args.workers)

    with open(args.out / "results.jsonl", "w") as f:
        for r in [floor, *sweep, *results]:
            f.write(json.dumps(r) + "\n")
    table = render(floor, results, budget, sweep, study, time.perf_counter() - began)
    (args.out / "table.md").write_text(table)
    print(table)
    plot(floor, results, [args.out / "eval_loss.png", *([args.png] if args.png else [])])


# ---------------------------------------------------------------------------- report
def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def grouped(results: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["job"]["key"], []).append(r)
    return groups


def render(floor: dict, results: list[dict], budget: int, sweep: list[dict], study: Study, seconds: float) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout
    lines = [f"Budget {budget:,} trainable parameters (LoRA r={BUDGET_RANK} on {TARGETS}); {study.steps} steps of "
             f"{study.batch_size}; {study.seeds} seed(s); commit {commit.strip() or 'unknown'}; this invocation took "
             f"{seconds / 60:.0f} min (runs read back from an earlier one not counted).", "",
             "| method | variant | rank | trainable | lr | val loss | test accuracy | tokens/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| base model | | | 0 | | {floor['eval_loss']:.3f} | {floor['accuracy']:.1%} | | |"]
    for runs in grouped(results).values():
        job = runs[0]["job"]
        lines.append(f"| {job['method']} | {job['variant']} | {job['rank']} | {runs[0]['trainable']:,} | "
                     f"{job['lr']:g} | {mean_std([r['eval_loss'] for r in runs], '.3f')} | "
                     f"{mean_std([100 * r['accuracy'] for r in runs], '.1f')} % | "
                     f"{statistics.median(r['tokens_per_s'] for r in runs):.0f} | "
                     f"{max(r['peak_rss_mb'] for r in runs):.0f} |")
    if sweep:
        tried = sorted({r["job"]["lr"] for r in sweep})
        lines += ["", "Learning-rate sweep (seed 0, final val loss / test accuracy):", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in tried) + " |", "|---|" + "---|" * len(tried)]
        for runs in grouped(sweep).values():
            by_lr = {r["job"]["lr"]: r for r in runs}
            lines.append(f"| {runs[0]['job']['method']} {runs[0]['job']['variant']}".strip() + " | " + " | ".join(
                f"{by_lr[lr]['eval_loss']:.3f} / {by_lr[lr]['accuracy']:.1%}" if lr in by_lr else ""
                for lr in tried) + " |")
    return "\n".join(lines) + "\n"


def plot(floor: dict, results: list[dict], paths: list[Path]) -> None:
    """Mean val loss over seeds against steps, one line per variant, the base model's loss as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lora": "black", "pissa": "tab:purple", "cora": "tab:blue", "cola": "tab:orange", "fossil": "tab:green"}
    styles = ["-", "--", ":"]
    fig, ax = plt.subplots(figsize=(8, 5))
    shade: dict[str, int] = {}
    for runs in grouped(results).values():
        job = runs[0]["job"]
        steps = [s for s, _ in runs[0]["curve"]]
        mean = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
        style = styles[shade.setdefault(job["method"], 0) % len(styles)]
        shade[job["method"]] += 1
        ax.plot(steps, mean, style, color=colors[job["method"]], label=f"{job['method']} {job['variant']}".strip())
    ax.axhline(floor["eval_loss"], color="grey", linestyle=(0, (1, 3)), label="base model")
    ax.set(xlabel="step", ylabel="val loss (mean over seeds)", yscale="log", title="SmolLM2-135M, three-digit addition")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
