"""The README's CLI reference is generated from the commands; this keeps the two in sync."""

import re
from pathlib import Path

from lowrank_surgery.cli.reference import BEGIN, END, splice

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = ["convert", "extract-lora", "extract-subspace", "init", "inspect", "merge", "push", "train", "unmerge"]


def test_cli_reference_matches_help():
    text = README.read_text()
    assert BEGIN in text and END in text
    assert splice(text) == text, "README CLI reference is stale: python -m lowrank_surgery.cli.reference --write README.md"


def _readme_sections() -> dict[str, str]:
    """The committed README's reference block, cut at its "### `lrs NAME`" headings."""
    block = README.read_text().partition(BEGIN)[2].partition(END)[0]
    parts = re.split(r"^### `lrs ([\w-]+)`$", block, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) - {"--help"}


def test_readme_sections_match_what_help_prints(lrs, monkeypatch):
    """Each README section against `lrs NAME --help` as a user sees it (not against the renderer): the same
    commands, every flag the help shows documented, and no documented option the command lacks."""
    monkeypatch.setenv("COLUMNS", "400")  # no wrapping inside a flag
    sections = _readme_sections()
    listing = lrs("--help").stdout
    assert sorted(sections) == sorted(COMMANDS) and all(f" {name} " in listing for name in COMMANDS)
    for name, section in sections.items():
        shown = lrs(name, "--help").stdout
        documented = {flag for row in re.findall(r"^\| (`--.*?) \|", section, flags=re.M) for flag in _flags(row)}
        assert _flags(shown) <= _flags(section), name
        assert documented <= _flags(shown), name


def test_every_command_has_a_python_function():
    """Everything the CLI can do, the Python API can do: each command has a top-level function."""
    import lowrank_surgery as lrs
    from lowrank_surgery.cli.reference import commands

    api = {"init": "init_adapter", "inspect": "inspect_path", "merge": "merge_adapter", "unmerge": "unmerge_adapter",
           "convert": "convert_adapter", "extract-lora": "extract_lora", "extract-subspace": "extract_subspace",
           "train": "train_adapter", "push": "push_to_hub"}
    assert set(commands()) == set(api)
    assert all(callable(getattr(lrs, api[name])) and api[name] in lrs.__all__ for name in api)
