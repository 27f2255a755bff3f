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


def test_every_command_has_a_python_function():
    """Everything the CLI can do, the Python API can do: each command has a top-level function."""
    import lowrank_surgery as lrs
    from lowrank_surgery.cli.reference import commands

    api = {"init": "init_adapter", "inspect": "inspect_path", "merge": "merge_adapter", "unmerge": "unmerge_adapter",
           "convert": "convert_adapter", "extract-lora": "extract_lora", "extract-subspace": "extract_subspace",
           "train": "train_adapter", "push": "push_to_hub"}
    assert set(commands()) == set(api)
    assert all(callable(getattr(lrs, api[name])) and api[name] in lrs.__all__ for name in api)
