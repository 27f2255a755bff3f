"""`lrs merge` and `lrs unmerge`."""

from __future__ import annotations

from pathlib import Path

import typer

from lowrank_surgery.merge import DTYPE_CHOICES, MergeReport, merge as merge_adapter, unmerge as unmerge_adapter

from .base import (ALLOW_PICKLE, COLA_STRATEGY, DEVICE, FORCE, JSON, REVISION, ColaStrategy, app, choice, print_json,
                   say, strategy_value)

Dtype = choice("Dtype", DTYPE_CHOICES)
DTYPE = typer.Option(Dtype("auto"), "--dtype", help="Output dtype of floating-point tensors; auto keeps the base's.")
SHARD = typer.Option(None, "--max-shard-size", help="Reshard the output (e.g. 5GB); default keeps the base's shards.")


@app.command(epilog="Example: lrs merge ./lora-adapter ./SmolLM2-135M ./smollm2-merged --dtype bfloat16")
def merge(
    adapter: Path = typer.Argument(..., help="Adapter directory (lrs or PEFT)."),
    base: str = typer.Argument(..., help="Base model: local directory, .safetensors file or Hub id."),
    out: Path = typer.Argument(..., help="Directory for the merged checkpoint."),
    dtype: Dtype = DTYPE, max_shard_size: str = SHARD, device: str = DEVICE, force: bool = FORCE,
    revision: str = REVISION, allow_pickle: bool = ALLOW_PICKLE, cola_strategy: ColaStrategy = COLA_STRATEGY,
    as_json: bool = JSON,
) -> None:
    """Fold an adapter into its base: a full checkpoint with W + ΔW, streamed shard by shard."""
    report = merge_adapter(adapter, base, out, dtype=dtype.value, max_shard_size=max_shard_size, device=device,
                           force=force, revision=revision, allow_pickle=allow_pickle,
                           cola_strategy=strategy_value(cola_strategy))
    _print(report, as_json)


@app.command(epilog="Example: lrs unmerge ./lora-adapter ./smollm2-merged ./smollm2-base")
def unmerge(
    adapter: Path = typer.Argument(..., help="The adapter that was merged."),
    merged: str = typer.Argument(..., help="Merged checkpoint: local directory, .safetensors file or Hub id."),
    out: Path = typer.Argument(..., help="Directory for the recovered base checkpoint."),
    dtype: Dtype = DTYPE, max_shard_size: str = SHARD, device: str = DEVICE, force: bool = FORCE,
    revision: str = REVISION, allow_pickle: bool = ALLOW_PICKLE, cola_strategy: ColaStrategy = COLA_STRATEGY,
    as_json: bool = JSON,
) -> None:
    """Take a merged adapter back out: W = W' − ΔW (the method's exact inverse), with its rounding bound."""
    report = unmerge_adapter(adapter, merged, out, dtype=dtype.value, max_shard_size=max_shard_size,
                             device=device, force=force, revision=revision, allow_pickle=allow_pickle,
                             cola_strategy=strategy_value(cola_strategy))
    _print(report, as_json)


def _print(report: MergeReport, as_json: bool) -> None:
    if as_json:
        return print_json(report.to_dict())
    verb = "merged" if report.operation == "merge" else "unmerged"
    say(f"{verb} {report.method} adapter ({report.modules} modules) {'into' if verb == 'merged' else 'from'} "
        f"{report.base} -> {report.out}: {len(report.shards)} shard(s), {report.tensors} tensors, "
        f"{report.bytes / 1e6:.1f} MB, {report.dtype}, {report.seconds:.1f} s")
    if report.untied:
        say(f"untied {', '.join(report.untied)} from the input embedding (tie_word_embeddings: false)")
    bound = report.error_bound
    if bound and bound["tensor"]:
        say(f"distance from the original base: at most {bound['absolute']:.3g} per entry (in {bound['tensor']}; "
            f"at most {bound['relative']:.3g} of a tensor's largest entry): "
            f"the {bound['merged_dtype']} merged weights were rounded")
