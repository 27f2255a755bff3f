"""Write the method comparison's task: three-digit addition, `{"prompt": "482+919=", "completion": "1401"}`.

    python examples/data/make_addition.py OUT_DIR [--train 4000] [--val 200] [--test 300] [--seed 0]

Writes OUT_DIR/{train,val,test}.jsonl. Every question appears in one split only, so val (where the learning
rate is chosen) and test (the reported accuracy) hold sums the model never trained on. Prompt and completion
keep an example at 13 tokens, so a CPU trains hundreds of steps in minutes. SmolLM2-135M-Instruct cannot do it
(0 of 100 right, in this form or asked in chat); 200 LoRA steps (rank 8, q/k/v) get about a third right.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPLITS = ("train", "val", "test")


def questions(count: int, seed: int) -> list[tuple[int, int]]:
    """`count` distinct ordered pairs of three-digit numbers, in a seeded random order."""
    rng, seen = random.Random(seed), set()
    while len(seen) < count:
        seen.add((rng.randint(100, 999), rng.randint(100, 999)))
    pairs = sorted(seen)
    rng.shuffle(pairs)
    return pairs


def record(a: int, b: int) -> dict:
    return {"prompt": f"{a}+{b}=", "completion": str(a + b)}


def write(out: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Write the splits (disjoint questions) to OUT; returns each split's path."""
    pairs = questions(sum(sizes.values()), seed)
    out.mkdir(parents=True, exist_ok=True)
    paths, start = {}, 0
    for name in SPLITS:
        chunk, start = pairs[start:start + sizes[name]], start + sizes[name]
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(record(a, b)) + "\n" for a, b in chunk))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    for name, default in zip(SPLITS, (4000, 200, 300)):
        parser.add_argument(f"--{name}", type=int, default=default, help=f"examples in {name}.jsonl")
    args = parser.parse_args()
    write(args.out, {name: getattr(args, name) for name in SPLITS}, args.seed)


if __name__ == "__main__":
    main()
