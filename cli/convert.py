"""`lrs convert` and `lrs extract-lora`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from ..convert import convert as convert_adapter
from ..extract import extract_lora as extract
from .base import ALLOW_PICKLE, COLA_STRATEGY, ColaStrategy, app, print_json, say, strategy_value, table, warn


class Format(str, Enum):
    peft_lora = "peft-lora"
    peft_miss = "peft-miss"
    kohya = "kohya"
    mlx = "mlx"
    cola = "cola"
    gguf = "gguf"


class Algorithm(str, Enum):
    exact = "exact"
    randomized = "randomized"


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
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    cola_strategy: ColaStrategy = COLA_STRATEGY,
    allow_pickle: bool = ALLOW_PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Convert an adapter to PEFT LoRA, PEFT MiSS, CoLA, kohya, mlx-lm or llama.cpp's GGUF LoRA, exactly where ΔW
    is low-rank."""
    report = convert_adapter(adapter, out, to.value, base=base, rank=rank, allow_lossy=allow_lossy, force=force,
                             cola_strategy=strategy_value(cola_strategy), allow_pickle=allow_pickle)
    for message in report["warnings"]:
        warn(message)
    if as_json:
        print_json(report)
        return
    lossy = [row | {"error": f"{row['error']:.3e}"} for row in report["per_module"] if not row["exact"]]
    if lossy:
        say(table(lossy, ["module", "rank", "error"]))
    kind = "lossy (truncated SVD)" if report["lossy"] else "exact"
    say(f"wrote {report['to']} adapter to {out}: {report['modules']} modules from {report['from']} "
        f"{report['method']}, {kind}, max relative error {report['max_error']:.2e}")


@app.command("extract-lora", epilog="Example: lrs extract-lora ./my-finetune ./SmolLM2-135M lora-out --rank 16")
def extract_lora(
    finetuned: str = typer.Argument(..., help="Fine-tuned checkpoint (directory, .safetensors or Hub id)."),
    base: str = typer.Argument(..., help="The base checkpoint it was fine-tuned from."),
    out: Path = typer.Argument(..., help="Adapter directory to write (PEFT LoRA)."),
    rank: int = typer.Option(..., "--rank", "-r", help="Rank of the extracted LoRA."),
    targets: str = typer.Option("all-linear", "--targets", help="Comma list of module names or regexes, or all-linear."),
    algorithm: Algorithm = typer.Option(Algorithm.exact, "--algorithm", help="Truncated SVD algorithm."),
    niter: int = typer.Option(4, "--niter", help="Power iterations of the randomized SVD."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    save_module: list[str] = typer.Option([], "--save-module", help="Keep this module's changed tensors whole (PEFT "
                                                                    "modules_to_save); repeatable."),
    save_changed: bool = typer.Option(False, "--save-changed", help="Keep every changed tensor a LoRA cannot hold "
                                                                    "(norms, embeddings, ...) whole."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    allow_pickle: bool = ALLOW_PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Extract a LoRA from the difference of two checkpoints, with the energy it retains per module."""
    report = extract(finetuned, base, out, rank, targets=targets, algorithm=algorithm.value, niter=niter,
                     device=device, force=force, save_modules=save_module, save_changed=save_changed,
                     allow_pickle=allow_pickle)
    if as_json:
        print_json(report)
        return
    rows = [row | {"energy": f"{row['energy']:.4f}", "error": f"{row['error']:.3e}"} for row in report["per_module"]]
    say(table(rows, ["module", "shape", "energy", "error"]))
    say(f"wrote rank-{rank} LoRA to {out}: {report['modules']} modules ({report['unchanged']} unchanged left out), "
        f"retained energy min {report['min_energy']:.4f}, mean {report['mean_energy']:.4f}; "
        f"{report['total_energy']:.4f} of the whole change")
    if report["modules_to_save"]:
        say(f"kept whole (modules_to_save): {', '.join(report['modules_to_save'])}")
