"""The Typer app and the few helpers every command shares."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from enum import Enum
from typing import Any

import typer

from lowrank_surgery.methods.cola import STRATEGIES
from lowrank_surgery.svd import ALGORITHMS

app = typer.Typer(
    name="lrs",
    help="lowrank-surgery: low-rank adapter surgery for LLMs (CoRA, PiSSA, CoLA, FOSSIL, LoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

STATE = {"quiet": False, "debug": False}


def choice(name: str, values: Iterable[str]) -> type[Enum]:
    """A str Enum of the library's own list of `values`: how Typer offers and checks choices."""
    return Enum(name, {value: value for value in values}, type=str)


ColaStrategy = choice("ColaStrategy", STRATEGIES)
SvdAlgorithm = choice("SvdAlgorithm", ALGORITHMS)

# Options that several commands share, declared once.
ALLOW_PICKLE = typer.Option(False, "--allow-pickle",
                            help="Read a pickled .bin/.pt checkpoint (torch.load weights_only=True).")
COLA_STRATEGY = typer.Option(None, "--cola-strategy", help="The strategy an original-code CoLA adapter was trained "
                                                            "with (its config does not say; default fully, with a warning).")
DEVICE = typer.Option("auto", "--device", help="Where the computation runs: auto (CUDA when present), cpu or cuda.")
FORCE = typer.Option(False, "--force", help="Overwrite the output if it exists.")
JSON = typer.Option(False, "--json", help="Print the result as JSON for scripts.")
REVISION = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) of the checkpoints read.")


def targets_option(default: str | None) -> Any:
    """--targets, with the default of the command that takes it."""
    return typer.Option(default, "--targets", help="Comma list of module names or regexes, or all-linear.")


def strategy_value(strategy: ColaStrategy | None) -> str | None:
    return None if strategy is None else strategy.value


def say(message: str) -> None:
    """A line for the user on stdout, unless --quiet."""
    if not STATE["quiet"]:
        typer.echo(message)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])


def is_terminal() -> bool:
    return sys.stdout.isatty()
