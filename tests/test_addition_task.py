"""The method comparison's task (examples/data/make_addition.py): right answers, disjoint splits, reproducible."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "data" / "make_addition.py"
SIZES = {"train": 500, "val": 40, "test": 60}


def _make_addition():
    spec = importlib.util.spec_from_file_location("make_addition", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_answer_is_the_sum_and_no_question_is_in_two_splits(tmp_path):
    paths = _make_addition().write(tmp_path, SIZES, seed=3)
    prompts: dict[str, set[str]] = {}
    for name, path in paths.items():
        rows = _read(path)
        assert len(rows) == SIZES[name]
        for row in rows:
            a, b = row["prompt"].removesuffix("=").split("+")
            assert len(a) == len(b) == 3 and row["completion"] == str(int(a) + int(b))
        prompts[name] = {row["prompt"] for row in rows}
        assert len(prompts[name]) == len(rows)  # no repeats within a split either
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"] or prompts["val"] & prompts["test"])


def test_the_same_seed_writes_the_same_files_and_another_seed_others(tmp_path):
    write = _make_addition().write
    first, again, other = (write(tmp_path / name, SIZES, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert all(first[s].read_bytes() == again[s].read_bytes() for s in SIZES)
    assert first["test"].read_bytes() != other["test"].read_bytes()
