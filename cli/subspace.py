"""`lrs extract-subspace`."""

from __future__ import annotations

from pathlib import Path

import typer

from lowrank_surgery.subspace import (DEFAULT_NITER, DEFAULT_TARGETS, SCOPES, default_subspace_out,
                                      extract_subspace as extract, summary_rows)

from .base import (ALLOW_PICKLE, DEVICE, FORCE, JSON, REVISION, SvdAlgorithm, app, choice, print_json, say, table,
                   targets_option)

Scope = choice("Scope", SCOPES)


@app.command("extract-subspace",
             epilog="Example: lrs extract-subspace ./SmolLM2-135M ./SmolLM2-135M-base --out smol-subspace --rank 64")
def extract_subspace(
    models: list[str] = typer.Argument(..., help="One or more checkpoints of the same architecture (directories, "
                                                 ".safetensors files or Hub ids)."),
    out: Path = typer.Option(None, "--out", help="Subspace directory to write (default: ./<model>-subspace-r<rank>, "
                                                 "several models joined by +)."),
    rank: int = typer.Option(64, "--rank", "-r", help="Columns of each basis."),
    targets: str = targets_option(DEFAULT_TARGETS),
    scope: Scope = typer.Option(Scope("layer"), "--scope", help="layer: one basis per module path; "
                                                                "model: one per module type, over all layers."),
    algorithm: SvdAlgorithm = typer.Option(SvdAlgorithm("gram"), "--algorithm",
                                           help="gram: exact, eigh of the Gram Σ W Wᵀ refined in float64 (fastest exact route); "
                                                "exact: torch.linalg.svd of [W_1|W_2|…]; randomized: Halko et al."),
    niter: int = typer.Option(DEFAULT_NITER, "--niter", help="Power iterations of the randomized algorithm."),
    device: str = DEVICE,
    revision: str = REVISION,
    force: bool = FORCE,
    allow_pickle: bool = ALLOW_PICKLE,
    as_json: bool = JSON,
) -> None:
    """Compute CoRA common subspaces (top-r left singular vectors of the concatenated weights)."""
    out = out or default_subspace_out(models, rank)
    info = extract(models, out, rank=rank, targets=targets, scope=scope.value, algorithm=algorithm.value,
                   niter=niter, device=device, revision=revision, force=force, allow_pickle=allow_pickle)
    if as_json:
        print_json({"out": str(out), **info})
        return
    say(table(summary_rows(info), ["name", "shape", "rank", "energy"]))
    say(f"wrote {len(info['energy'])} bases to {out} ({info['algorithm']}, scope {info['scope']}, "
        f"{info['wall_time_s']:.1f} s)")
