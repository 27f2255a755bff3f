"""`lrs init`: create an adapter for a base model."""

from __future__ import annotations

from pathlib import Path

import typer

from lowrank_surgery.adapter import default_adapter_out, save_adapter
from lowrank_surgery.checkpoint import check_output
from lowrank_surgery.initialize import init_adapter
from lowrank_surgery.methods import METHODS
from lowrank_surgery.methods.cola import STRATEGIES, CoLAOptions
from lowrank_surgery.methods.cora import A_INITS, MODES
from lowrank_surgery.methods.fossil import VARIANTS
from lowrank_surgery.methods.pissa import SVD_ALGORITHMS

from .base import ALLOW_PICKLE, DEVICE, FORCE, REVISION, app, choice, say, targets_option

METHOD_HELP = "Method-specific options (an error if given for another method)."


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}"


MethodName = choice("MethodName", METHODS)


@app.command(epilog="Example: lrs init --method cola --base ./SmolLM2-135M --out cola-adapter --rank 8 --targets all-linear")
def init(
    method: MethodName = typer.Option(..., "--method", help="Adapter method."),
    base: str = typer.Option(..., "--base", help="Base model: local directory, .safetensors file or Hub id."),
    out: Path = typer.Option(None, "--out", help="Adapter directory to write (default: ./<model>-<method>-r<rank>, "
                                                 "named after --base)."),
    rank: int = typer.Option(8, "--rank", "-r", help="Rank r."),
    alpha: float = typer.Option(None, "--alpha", help="Scaling numerator α (s = α/r); default r."),
    targets: str = targets_option(None),
    dropout: float = typer.Option(0.0, "--dropout", help="Dropout on the adapter input during training."),
    rslora: bool = typer.Option(False, "--rslora", help="Scale by α/√r instead of α/r."),
    seed: int = typer.Option(0, "--seed", help="Seed for random initialisation."),
    device: str = DEVICE,
    revision: str = REVISION,
    force: bool = FORCE,
    allow_pickle: bool = ALLOW_PICKLE,
    subspace: Path = typer.Option(None, "--subspace", help="cora: subspace directory from extract-subspace.", rich_help_panel=METHOD_HELP),
    cora_mode: str = typer.Option(None, "--cora-mode", help=f"cora: {_one_of(MODES)} (frozen: B fixed; init: B trains).", rich_help_panel=METHOD_HELP),
    a_init: str = typer.Option(None, "--a-init", help=f"cora: {_one_of(A_INITS)}.", rich_help_panel=METHOD_HELP),
    init_svd: str = typer.Option(None, "--init-svd", help=f"pissa, cola: {_one_of(SVD_ALGORITHMS)} (exact: float32 SVD, as PEFT, the default; gram: Gram + eigh refined in float64, faster and more accurate).", rich_help_panel=METHOD_HELP),
    niter: int = typer.Option(None, "--niter", help="pissa, cola: power iterations of the randomized SVD.", rich_help_panel=METHOD_HELP),
    num_a: int = typer.Option(None, "--num-a", help=f"cola: number of A matrices (default {CoLAOptions.num_a}).", rich_help_panel=METHOD_HELP),
    num_b: int = typer.Option(None, "--num-b", help=f"cola: number of B matrices (default {CoLAOptions.num_b}).", rich_help_panel=METHOD_HELP),
    strategy: str = typer.Option(None, "--strategy", help=f"cola: {_one_of(STRATEGIES)}.", rich_help_panel=METHOD_HELP),
    variant: str = typer.Option(None, "--variant", help=f"fossil: {_one_of(VARIANTS)}.", rich_help_panel=METHOD_HELP),
    mini_r: int = typer.Option(None, "--mini-r", help="fossil mini: block width along the output.", rich_help_panel=METHOD_HELP),
) -> None:
    """Initialise an adapter of any registered method (--method) for a base checkpoint."""
    out = out or default_adapter_out(base, method.value, rank)
    check_output(out, force, inputs=(base, subspace))
    given = {"subspace": str(subspace) if subspace else None, "cora_mode": cora_mode, "a_init": a_init,
             "init_svd": init_svd, "niter": niter, "num_a": num_a, "num_b": num_b, "strategy": strategy,
             "variant": variant, "mini_r": mini_r}
    adapter = init_adapter(method.value, base, r=rank, alpha=alpha, targets=targets, dropout=dropout, rslora=rslora,
                           seed=seed, revision=revision, allow_pickle=allow_pickle,
                           options={k: v for k, v in given.items() if v is not None}, device=device)
    save_adapter(adapter, out, force=force)
    say(f"wrote {method.value} adapter to {out}: {len(adapter.weights)} modules, "
        f"{adapter.num_parameters(trainable_only=True):,} trainable parameters")
