"""`lrs train`: fine-tune an adapter on a JSON Lines file (single process or under torchrun)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from lowrank_surgery import progress
from lowrank_surgery.train import TrainConfig, train as train_adapter

from .base import (ALLOW_PICKLE, COLA_STRATEGY, DEVICE, FORCE, JSON, STATE, ColaStrategy, app, print_json, say,
                   strategy_value)


@app.command(epilog="Example: lrs train lora-adapter --base ./SmolLM2-135M --data train.jsonl --out trained "
                    "--steps 200 --eval-data eval.jsonl   (on 4 processes: torchrun --nproc_per_node 4 --no-python "
                    "lrs train ..., with --shard for a base too large for one device)")
def train(
    adapter: Path = typer.Argument(..., help="Adapter directory to start from (from `lrs init`)."),
    base: str = typer.Option(..., "--base", help="Base model: local directory or Hub id, with a tokenizer."),
    data: Path = typer.Option(..., "--data", help="JSON Lines: text, prompt/completion or messages per line."),
    out: Path = typer.Option(..., "--out", help="Output directory: trained adapter, metrics, checkpoint."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default: one epoch)."),
    epochs: float = typer.Option(None, "--epochs", help="Epochs instead of --steps."),
    lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples per micro-batch, over all processes."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per example; longer ones are truncated."),
    eval_data: Path = typer.Option(None, "--eval-data", help="JSON Lines evaluated every --eval-every steps."),
    eval_every: int = typer.Option(100, "--eval-every", help="Evaluate every N steps (and at the end)."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps (and at the end)."),
    warmup: int = typer.Option(None, "--warmup", help="Warmup steps (default 5% of the steps)."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping norm."),
    packing: bool = typer.Option(False, "--packing", help="Concatenate examples into full --seq-len rows."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Trade compute for memory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out exactly."),
    shard: bool = typer.Option(False, "--shard", help="Under torchrun: shard the base and the adapter over the "
                               "processes (FSDP2), each reading only its part of the checkpoint."),
    force: bool = FORCE,
    seed: int = typer.Option(0, "--seed", help="Seed for data order and dropout."),
    device: str = DEVICE,
    cola_strategy: ColaStrategy = COLA_STRATEGY,
    allow_pickle: bool = ALLOW_PICKLE,
    as_json: bool = JSON,
) -> None:
    """Train an adapter (any method) with AdamW, warmup + cosine, accumulation, clipping and checkpoints."""
    config = TrainConfig(steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                         seq_len=seq_len, eval_data=eval_data, eval_every=eval_every, save_every=save_every,
                         warmup=warmup, weight_decay=weight_decay, max_grad_norm=max_grad_norm, packing=packing,
                         grad_checkpointing=grad_checkpointing, resume=resume, force=force, seed=seed, device=device,
                         cola_strategy=strategy_value(cola_strategy), allow_pickle=allow_pickle, shard=shard)
    log = None if as_json or progress.enabled() or STATE["quiet"] else _log_line
    summary = train_adapter(adapter, base, data, out, config, on_log=log)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        _report(summary, as_json)


def _report(summary: dict, as_json: bool) -> None:
    """The summary: as JSON, or one line."""
    if as_json:
        print_json(summary)
        return
    eval_part = f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else ""
    say(f"trained {summary['steps']} steps on {summary['examples']} examples ({summary['truncated']} truncated "
        f"to --seq-len): loss {summary['loss']:.4f}{eval_part}, {summary['tokens_per_s']} tokens/s; "
        f"wrote {summary['out']}")


def _log_line(record: dict) -> None:
    """Evaluation results as lines when there is no progress bar (logs, CI)."""
    if "eval_loss" in record:
        loss = f"loss {record['loss']:.4f}, " if "loss" in record else ""
        say(f"step {record['step']}: {loss}eval loss {record['eval_loss']:.4f}")
