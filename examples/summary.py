"""Summarise a quickstart run: method, trainable parameters, loss before/after, merge time.

    python examples/summary.py runs/quickstart
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lowrank_surgery as lrs


def row(run: Path) -> dict:
    metrics = [json.loads(line) for line in (run / "trained" / "metrics.jsonl").read_text().splitlines() if line]
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    adapter = lrs.load_adapter(run / "trained")
    return {
        "method": run.name,
        "trainable": f"{adapter.num_parameters(trainable_only=True):,}",
        "loss first→last": f"{losses[0]:.3f} → {losses[-1]:.3f}",
        "eval loss first→last": f"{evals[0]:.3f} → {evals[-1]:.3f}" if evals else "",
        "merge s": f"{float((run / 'merge_seconds').read_text()):.1f}",
    }


def main(root: Path) -> None:
    rows = [row(run) for run in sorted(root.iterdir()) if (run / "trained" / "metrics.jsonl").is_file()]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(r[c] for c in columns) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))
