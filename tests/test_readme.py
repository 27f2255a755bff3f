"""The README's CLI reference is generated from the commands; this keeps the two in sync."""

from pathlib import Path

from lowrank_surgery.cli.reference import BEGIN, END, render, splice

README = Path(__file__).resolve().parents[1] / "README.md"


def test_cli_reference_matches_help():
    text = README.read_text()
    assert BEGIN in text and END in text
    assert splice(text) == text, "README CLI reference is stale: python -m lowrank_surgery.cli.reference --write README.md"


def test_reference_covers_every_command_and_option():
    from lowrank_surgery.cli.reference import commands

    block = render()
    for name, command in commands().items():
        assert f"### `lrs {name}`" in block
        for param in command.params:
            if param.param_type_name == "option" and "--help" not in param.opts:
                assert f"`{param.opts[0]}`" in block
