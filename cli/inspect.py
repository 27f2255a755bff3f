"""`lrs inspect`."""

from __future__ import annotations

from pathlib import Path

import typer

from lowrank_surgery.inspect import format_summary, inspect_path

from .base import ALLOW_PICKLE, COLA_STRATEGY, JSON, ColaStrategy, app, print_json, strategy_value


@app.command(epilog="Example: lrs inspect ./SmolLM2-135M --json")
def inspect(
    path: Path = typer.Argument(..., help="A checkpoint (directory or .safetensors), adapter or subspace directory."),
    cola_strategy: ColaStrategy = COLA_STRATEGY,
    allow_pickle: bool = ALLOW_PICKLE,
    as_json: bool = JSON,
) -> None:
    """Summarise a checkpoint, an adapter or a subspace: tensors, dtypes, shards, method, targets, rank."""
    info = inspect_path(path, cola_strategy=strategy_value(cola_strategy), allow_pickle=allow_pickle)
    print_json(info) if as_json else typer.echo(format_summary(info))
