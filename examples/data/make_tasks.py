"""Write the example's small instruction data set: train.jsonl and eval.jsonl (chat `messages`).

    python examples/data/make_tasks.py   # rewrites examples/data/{train,eval}.jsonl (fixed seed)

Three templated tasks with exact answers, in a terse answer style a base chat model does not
follow by itself: reverse a word, add two numbers, and convert a length in km to m.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud tiger mango pencil garden rocket silver violin orange planet candle "
         "forest bridge winter dragon lemon castle falcon marble copper meadow").split()
SYSTEM = {"role": "system", "content": "Answer with the result only."}


def reverse(rng: random.Random, words: list[str]) -> tuple[str, str]:
    word = rng.choice(words)
    return f"Reverse the word: {word}", word[::-1]


def add(rng: random.Random, words: list[str]) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def kilometres(rng: random.Random, words: list[str]) -> tuple[str, str]:
    km = rng.randint(2, 40)
    return f"Convert {km} km to metres.", f"{km * 1000} m"


def example(rng: random.Random, words: list[str]) -> dict:
    question, answer = rng.choice((reverse, add, kilometres))(rng, words)
    return {"messages": [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(0)
    here = Path(__file__).parent
    splits = (("train", 400, WORDS[:18]), ("eval", 40, WORDS[18:]))  # eval reverses words never seen in training
    for name, count, words in splits:
        (here / f"{name}.jsonl").write_text("".join(json.dumps(example(rng, words)) + "\n" for _ in range(count)))


if __name__ == "__main__":
    main()
