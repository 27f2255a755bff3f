"""`lrs convert` and `lrs extract-lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lowrank_surgery.convert import FORMATS, convert as convert_adapter
from lowrank_surgery.extract import extract_lora as extract

from .base import (ALLOW_PICKLE, COLA_STRATEGY, DEVICE, FORCE, JSON, ColaStrategy, SvdAlgorithm, app, choice,
                   print_json, say, strategy_value, table, targets_option)

Format = choice("Format", FORMATS)


@app.command(epilog="Example: lrs convert fossil-adapter lora-adapter --to peft-lora --base ./SmolLM2-135M")
def convert(
    adapter: Path = typer.Argument(..., help="Adapter: lrs/PEFT directory, kohya .safetensors (or its directory), "
                                             "or mlx-lm adapter directory."),
    out: Path = typer.Argument(..., help="Directory to write (for --to gguf: the .gguf file)."),
    to: Format = typer.Option(..., "--to", help="Output format."),
    base: str = typer.Option(None, "--base", help="Base model: resolves kohya names, FOSSIL shapes, W-dependent ΔW; "
                                                  "--to gguf needs it (architecture, heads)."),
    rank: int = typer.Option(None, "--rank", "-r", help="Rank of the truncated SVD for ΔW that is not low-rank "
                                                        "(default: the adapter's r); lower ranks truncate."),
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Accept a truncated SVD where ΔW is not exact."),
    force: bool = FORCE,
    cola_strategy: ColaStrategy = COLA_STRATEGY,
    allow_pickle: bool = ALLOW_PICKLE,
    as_json: bool = JSON,
) -> None:
    """Convert an adapter to PEFT LoRA, PEFT MiSS, CoLA, kohya, mlx-lm or llama.cpp's GGUF LoRA, exactly where ΔW
    is low-rank."""
    report = convert_adapter(adapter, out, to.value, base=base, rank=rank, allow_lossy=allow_lossy, force=force,
                             cola_strategy=strategy_value(cola_strategy), allow_pickle=allow_pickle)
    if as_json:
        print_json(report)
        return
    lossy = [row | {"error": f"{row['error']:.3e}"} for row in report["per_module"] if not row["exact"]]
    if lossy:
        say(table(lossy, ["module", "rank", "error"]))
    kind = "lossy (truncated SVD)" if report["lossy"] else "exact"
    say(f"wrote {report['to']} adapter to {out}: {report['modules']} modules from {report['from']} "
        f"{report['method']}, {kind}, max relative error {report['max_error']:.2e}")


@app.command("extract-lora",
             epilog="Example: lrs extract-lora ./my-finetune ./SmolLM2-135M lora-out --energy 0.9 --rank 64")
def extract_lora(
    finetuned: str = typer.Argument(..., help="Fine-tuned checkpoint (directory, .safetensors or Hub id)."),
    base: str = typer.Argument(..., help="The base checkpoint it was fine-tuned from."),
    out: Path = typer.Argument(..., help="Adapter directory to write (PEFT LoRA)."),
    rank: int = typer.Option(None, "--rank", "-r", help="Rank of every module; with --energy or --threshold, the most "
                                                        "a module keeps. Give --rank, --energy or --threshold."),
    energy: float = typer.Option(None, "--energy", help="Per-module rank: the fewest singular values whose energy "
                                                        "Σ_{i≤r}σ_i² reaches this fraction (0 < F ≤ 1) of "
                                                        "‖ΔW‖_F² = Σσ_i²."),
    threshold: float = typer.Option(None, "--threshold", help="Per-module rank: keep the singular values "
                                                              "σ_i > T·σ_max, relative to the module's largest "
                                                              "(0 ≤ T < 1; kohya's sv_ratio R is T = 1/R)."),
    distribute_scale: bool = typer.Option(False, "--distribute-scale", help="Factors B = U·√S, A = √S·Vᵀ (equal "
                                                                            "norms) instead of B = U·S, A = Vᵀ "
                                                                            "(mergekit's split)."),
    targets: str = targets_option("all-linear"),
    algorithm: SvdAlgorithm = typer.Option(SvdAlgorithm("exact"), "--algorithm",
                                           help="Truncated SVD: exact (torch.linalg.svd), gram (eigh of the Gram refined "
                                                "in float64, the same factors) or randomized (needs --rank)."),
    niter: int = typer.Option(4, "--niter", help="Power iterations of the randomized SVD."),
    device: str = DEVICE,
    save_module: list[str] = typer.Option([], "--save-module", help="Keep this module's changed tensors whole (PEFT "
                                                                    "modules_to_save); repeatable."),
    save_changed: bool = typer.Option(False, "--save-changed", help="Keep every changed tensor a LoRA cannot hold "
                                                                    "(norms, embeddings, ...) whole."),
    force: bool = FORCE,
    allow_pickle: bool = ALLOW_PICKLE,
    as_json: bool = JSON,
) -> None:
    """Extract a LoRA from the difference of two checkpoints, with the rank and energy it keeps per module."""
    report = extract(finetuned, base, out, rank, targets=targets, algorithm=algorithm.value, niter=niter,
                     device=device, force=force, save_modules=save_module, save_changed=save_changed,
                     allow_pickle=allow_pickle, energy=energy, threshold=threshold, distribute_scale=distribute_scale)
    if as_json:
        print_json(report)
        return
    per_module = energy is not None or threshold is not None
    rows = [row | {"energy": f"{row['energy']:.4f}", "error": f"{row['error']:.3e}"} for row in report["per_module"]]
    say(table(rows, ["module", "shape", *(["rank"] if per_module else []), "energy", "error"]))
    say(f"wrote {_rank_summary(report) if per_module else f'rank-{rank}'} LoRA to {out}: {report['modules']} modules "
        f"({report['unchanged']} unchanged left out), retained energy min {report['min_energy']:.4f}, "
        f"mean {report['mean_energy']:.4f}; {report['total_energy']:.4f} of the whole change")
    capped = [row for row in report["per_module"] if row["capped"]]
    if capped:
        say(f"--rank {rank} kept fewer singular values than the rule asks in {len(capped)} module(s); lowest retained "
            f"energy {min(row['energy'] for row in capped):.4f}")
    if report["modules_to_save"]:
        say(f"kept whole (modules_to_save): {', '.join(report['modules_to_save'])}")


def _rank_summary(report: dict[str, Any]) -> str:
    """'rank-4' or 'rank 2-7', and the rule that chose them."""
    ranks = [row["rank"] for row in report["per_module"]]
    span = f"rank-{ranks[0]}" if min(ranks) == max(ranks) else f"rank {min(ranks)}-{max(ranks)}"
    rule = (f"energy >= {report['energy_target']}" if report["energy_target"] is not None
            else f"sigma > {report['threshold']}*sigma_max")
    cap = "" if report["rank"] is None else f", at most {report['rank']}"
    return f"{span} ({rule}{cap})"
