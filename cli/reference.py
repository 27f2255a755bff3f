"""The README's CLI reference, generated from the commands themselves so the two cannot drift.

    python -m lowrank_surgery.cli.reference --write README.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

BEGIN, END = "<!-- cli:begin -->", "<!-- cli:end -->"


def commands() -> dict:
    from .app import app

    group = typer.main.get_group(app)
    return dict(sorted(group.commands.items()))


def render() -> str:
    """Markdown for every command: summary, usage, options, example."""
    parts = []
    for name, command in commands().items():
        arguments = [_argument(p) for p in command.params if p.param_type_name == "argument"]
        rows = [_row(p) for p in command.params if p.param_type_name == "option" and "--help" not in p.opts]
        usage = " ".join([f"lrs {name}", *arguments, "[OPTIONS]"])
        parts.append(f"### `lrs {name}`\n\n{(command.help or '').strip()}\n\n```\n{usage}\n```\n")
        if rows:
            parts.append("| option | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n")
        if command.epilog:
            parts.append(f"{command.epilog.replace('Example: ', 'Example: `', 1)}`\n")
    return "\n".join(parts)


def _argument(argument) -> str:
    name = argument.name.upper()
    return f"{name}..." if argument.nargs == -1 else name


def _row(option) -> str:
    flags = ", ".join(f"`{o}`" for o in option.opts + option.secondary_opts)
    if option.required:
        default = "required"
    elif option.default is None or option.default is False:
        default = ""
    else:
        default = f"`{getattr(option.default, 'value', option.default)}`"
    choices = getattr(option.type_descriptor, "choices", None)
    if choices:
        flags += " " + "\\|".join(getattr(c, "value", str(c)) for c in choices)
    return f"| {flags} | {default} | {(option.help or '').replace('|', '/')} |"


def splice(readme: str) -> str:
    """README text with the reference block replaced by a fresh one."""
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        path = Path(sys.argv[2])
        path.write_text(splice(path.read_text()))
    else:
        print(render())
