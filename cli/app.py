"""Entry point of the `lrs` console script: global flags, command registration, error reporting."""

from __future__ import annotations

import sys
import warnings

import typer
from typer.core import TyperGroup

from lowrank_surgery import progress
from lowrank_surgery.checkpoint import interrupts_raised
from lowrank_surgery.device import return_freed_memory
from lowrank_surgery.errors import LrsError, LrsWarning

from . import adapters, convert, inspect, merge, push, subspace, train  # noqa: F401  (commands register themselves on import)
from .base import STATE, app, warn

GLOBAL_FLAGS = ("--debug", "--quiet")


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or chatter."),
) -> None:
    """lowrank-surgery: low-rank adapter surgery for LLMs (CoRA, PiSSA, CoLA, FOSSIL, LoRA)."""


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: user errors print one line on stderr and exit 1 (tracebacks only with --debug)."""
    return_freed_memory()  # before any tensor: the CLI's peak memory follows the largest tensor
    lrs = typer.main.get_group(app)
    args, flags = split_global_flags(lrs, list(sys.argv[1:] if argv is None else argv))
    for flag in GLOBAL_FLAGS:
        STATE[flag[2:]] = flag in flags
    progress.QUIET = STATE["quiet"]
    try:
        # catch_warnings restores showwarning afterwards; interrupts_raised turns hang-up, quit, terminate...
        # into KeyboardInterrupt: the one-line message below, and outputs cleaned up
        with warnings.catch_warnings(), interrupts_raised():
            warnings.simplefilter("always", LrsWarning)
            warnings.showwarning = _show_warning
            lrs(args=args, prog_name="lrs")
    except LrsError as exc:
        _fail(exc, str(exc))
    except OSError as exc:
        _fail(exc, f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except (KeyboardInterrupt, SystemExit) as exc:
        interrupt = _interrupt_behind(exc)
        if interrupt is None:
            raise
        _fail(interrupt, str(interrupt) or "interrupted; nothing was written", code=130)  # train names its checkpoint


def _interrupt_behind(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The interrupt that ended the run, if one did (Typer turns it into a silent exit 130 chained to it)."""
    if isinstance(exc, SystemExit) and exc.code != 130:
        return None
    while exc is not None and not isinstance(exc, KeyboardInterrupt):
        exc = exc.__cause__ or exc.__context__
    return exc


_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """lrs's own warnings as one `warning:` line; anyone else's as Python shows them."""
    if issubclass(category, LrsWarning):
        warn(str(message))
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def split_global_flags(lrs: TyperGroup, args: list[str]) -> tuple[list[str], set[str]]:
    """(args without the global flags, the global flags given): accepted anywhere on the line, but not where they
    are an option's value (`--message --debug`) or follow `--`."""
    value_options = _value_options(lrs, args)
    rest: list[str] = []
    flags: set[str] = set()
    takes_value = False
    for i, arg in enumerate(args):
        if arg == "--" and not takes_value:
            return rest + args[i:], flags
        if arg in GLOBAL_FLAGS and not takes_value:
            flags.add(arg)
        else:
            rest.append(arg)
        takes_value = not takes_value and arg in value_options
    return rest, flags


def _value_options(lrs: TyperGroup, args: list[str]) -> set[str]:
    """The option names that take a value, of the command `args` name (their first word but a global flag)."""
    name = next((a for a in args if a not in GLOBAL_FLAGS), "")
    command = lrs.commands.get(name)
    params = command.params if command is not None else []
    return {option for p in params if getattr(p, "is_flag", True) is False  # options with a value; arguments have no is_flag
            for option in p.opts + p.secondary_opts}


def _fail(exc: BaseException, message: str, code: int = 1) -> None:
    if STATE["debug"]:
        raise exc
    typer.echo(f"error: {message}", err=True)
    sys.exit(code)
