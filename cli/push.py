"""`lrs push`."""

from __future__ import annotations

from pathlib import Path

import typer

from lowrank_surgery.hub import push as push_to_hub

from .base import JSON, app, print_json, say, table


@app.command(epilog="Example: lrs push ./cora-adapter my-name/smollm2-cora --private --dry-run")
def push(
    path: Path = typer.Argument(..., help="An adapter, merged checkpoint or subspace directory."),
    repo_id: str = typer.Argument(..., help="Hub repository, namespace/name (created if needed)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead of committing directly."),
    revision: str = typer.Option(None, "--revision", help="Branch to commit to (created if needed)."),
    message: str = typer.Option(None, "--message", "-m", help="Commit message."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the files, sizes and model card; send nothing."),
    as_json: bool = JSON,
) -> None:
    """Upload a directory to the Hugging Face Hub in one commit with a model card (token: HF_TOKEN or hf auth login)."""
    report = push_to_hub(path, repo_id, private=private, create_pr=create_pr, revision=revision, message=message,
                         dry_run=dry_run)
    if as_json:
        return print_json(report.to_dict())
    rows = [{"file": f["path"], "size": _size(f["size"])} for f in report.files]
    say(table(rows, ["file", "size"]))
    say(f"{len(report.files)} files, {_size(report.total_bytes)}, {report.kind} -> {report.repo_id}")
    if dry_run:
        typer.echo(f"\n--- README.md (model card) ---\n{report.card}")
        say("dry run: nothing was sent")
    else:
        say(f"pushed: {report.pr_url or report.commit_url or report.repo_url}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
