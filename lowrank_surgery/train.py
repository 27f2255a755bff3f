"""`lrs train`: a small, resumable training loop for any lrs adapter, single process or under torchrun (DDP, or
FSDP2 with `shard`: see sharding.py).

Read top to bottom: the settings of a run (TrainConfig), then `train`: set up the process group, load data,
base and adapter; then for each optimizer step, run `grad_accum` micro-batches (each rank takes its slice of
every micro-batch, so the global batch does not depend on the number of processes), clip, step AdamW at the
warmup+cosine learning rate, log, evaluate and checkpoint. OUT is the adapter directory (the format `lrs init`
writes) plus metrics.jsonl, loss_curve.png (when matplotlib is installed) and the hidden `.trainer/` state;
every checkpoint replaces these atomically (what else OUT holds is kept), so OUT always holds one consistent,
resumable step. The run holds an exclusive claim on OUT from start to end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import progress
from .adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter, load_adapter, write_adapter_files
from .attach import attach, trained_weights
from .cards import adapter_card, read_metrics
from .checkpoint import (Checkpoint, atomic_output, check_output, claim_output, load_tensors, read_json_object,
                         save_tensors)
from .config import Field, check_fields
from .data import IGNORE, Dataset, collate, load_dataset, read_jsonl, step_indices
from .device import local_part, resolve_device, whole
from .errors import LrsError, warn
from .initialize import check_seed
from .sharding import load_sharded, shard_optimizer_state

STATE_DIR = ".trainer"  # hidden: `lrs push OUT` uploads the adapter, metrics and plot, not optimizer state
METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"
OUTPUTS = (CONFIG_NAME, WEIGHTS_NAME, "README.md", METRICS, PLOT, STATE_DIR)  # what a checkpoint replaces in OUT
NO_PLOT = f"no {PLOT}: matplotlib is not installed (pip install matplotlib to plot the losses)"
FLOAT32_MAX = torch.finfo(torch.float32).max  # the optimizer's float32 steps overflow past it: "finite" means below


# ---------------------------------------------------------------------------- settings
POSITIVE: Field = (lambda value: 0 < value <= FLOAT32_MAX, "positive and finite")  # also refuses nan
AT_LEAST_0: Field = (lambda value: 0 <= value <= FLOAT32_MAX, "at least 0 and finite")
MUST_MATCH = "must match"  # the mark of a setting that --resume requires unchanged


def _setting(default: Any, check: Field | None = None, *, must_match: bool = False) -> Any:
    """A TrainConfig field: its default, its check (test, what the value must be; None: none) and whether --resume
    requires the checkpoint's value (settings that shape the data stream or the updates)."""
    return field(default=default, metadata={"check": check, "resume": MUST_MATCH if must_match else None})


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run, checked when built (LrsError naming the `lrs train` flag) and saved with
    each checkpoint in `.trainer/state.json`."""

    steps: int | None = _setting(None, POSITIVE, must_match=True)  # optimizer steps; None: `epochs` decides
    epochs: float | None = _setting(None, POSITIVE)  # passes over the data instead of `steps` (None and None: 1)
    lr: float = _setting(2e-4, POSITIVE, must_match=True)  # peak learning rate
    batch_size: int = _setting(8, POSITIVE, must_match=True)  # examples per micro-batch, over all processes
    grad_accum: int = _setting(1, POSITIVE, must_match=True)  # micro-batches per optimizer step
    seq_len: int = _setting(512, must_match=True)  # tokens per example; longer ones are truncated
    eval_data: str | os.PathLike | None = None  # JSON Lines evaluated every `eval_every` steps
    eval_every: int = _setting(100, POSITIVE)  # evaluate every N steps (and at the end)
    save_every: int = _setting(100, POSITIVE)  # checkpoint every N steps (and at the end)
    warmup: int | None = _setting(None, AT_LEAST_0, must_match=True)  # warmup steps; None: 5% of the steps
    weight_decay: float = _setting(0.0, AT_LEAST_0, must_match=True)  # AdamW's
    max_grad_norm: float = _setting(1.0, POSITIVE, must_match=True)  # gradient clipping
    packing: bool = _setting(False, must_match=True)  # concatenate examples into full `seq_len` rows
    grad_checkpointing: bool = False  # trade compute for memory
    resume: bool = False  # continue the checkpoint in OUT exactly
    force: bool = False  # replace OUT if it exists
    seed: int = _setting(0, must_match=True)  # data order and dropout
    device: str = "auto"  # auto, cpu or cuda
    cola_strategy: str | None = None  # the strategy of an original-code CoLA adapter (see load_adapter)
    allow_pickle: bool = False  # read a pickled base checkpoint (torch.load weights_only=True)
    shard: bool = False  # FSDP2 under torchrun: each process holds, and reads, 1/world of the base and adapter

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise LrsError("give --steps or --epochs, not both")
        for setting in fields(self):
            value, check = getattr(self, setting.name), setting.metadata.get("check")
            if value is not None and check is not None and not check[0](value):
                raise LrsError(f"--{setting.name.replace('_', '-')} must be {check[1]}, got {value}")
        check_seed(self.seed)

    @classmethod
    def must_match(cls) -> tuple[str, ...]:
        """The settings --resume requires unchanged: the fields marked so."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("resume") == MUST_MATCH)

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step, over all processes."""
        return self.batch_size * self.grad_accum

    def for_data(self, examples: int) -> TrainConfig:
        """This config with its length settled for `examples` training examples: `steps` (from `epochs`, one
        epoch by default; `epochs` is then None) and `warmup` (5% of the steps by default)."""
        steps = self.steps if self.steps is not None else math.ceil((self.epochs or 1.0) * examples / self.global_batch)
        warmup = round(0.05 * steps) if self.warmup is None else self.warmup
        return replace(self, steps=steps, epochs=None, warmup=warmup)

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (the evaluation file's path as a string)."""
        return {**asdict(self), "eval_data": None if self.eval_data is None else os.fspath(self.eval_data)}


# ---------------------------------------------------------------------------- the run
def train(adapter: str | os.PathLike | Adapter, base: str | os.PathLike, data: str | os.PathLike,
          out: str | os.PathLike, config: TrainConfig = TrainConfig(), *,
          on_log: Callable[[dict[str, Any]], None] | None = None, **settings: Any) -> dict[str, Any]:
    """Train the adapter's parameters on `data` and write the result to `out`; returns a summary.

    config holds the run's settings; any TrainConfig field given by name (steps=100, lr=1e-3, ...) replaces
    the config's. steps (optimizer steps) or epochs (default 1) set the length; the global batch is
    batch_size x grad_accum examples whatever the number of processes. on_log receives every metrics record
    (rank 0 only).
    """
    config = replace(config, **settings)
    out = Path(out)
    _check_out(out, config, inputs=(adapter, base, data, config.eval_data))
    ctx = _setup_distributed(config.device, config.shard)
    try:
        with claim_output(out, config.force or config.resume) if ctx.main else nullcontext():
            return _loop(_prepare(ctx, adapter, base, data, out, config), on_log)
    except KeyboardInterrupt as exc:
        raise exc if exc.args else _interrupted(out) from None
    finally:
        if ctx.owns_group:
            torch.distributed.destroy_process_group()


def _check_out(out: Path, config: TrainConfig, inputs: Sequence[object]) -> None:
    """Refuse, before any work: --resume without a checkpoint in OUT, an OUT that may not be written, an input
    that writing OUT would delete."""
    if not config.resume:
        check_output(out, config.force, inputs)
        return
    if not (out / STATE_DIR / "state.json").is_file():
        raise LrsError(f"--resume: {out} holds no training checkpoint ({STATE_DIR}/state.json)")
    check_output(out, True, inputs[1:], replaces=OUTPUTS)  # only lrs's own files; ADAPTER is not read (OUT holds it)


@dataclass
class Context:
    """Where this process runs: its rank among `world` processes and its device."""

    rank: int
    world: int
    device: torch.device
    shard: bool = False  # the model is sharded over the processes (FSDP2), not replicated (DDP)
    owns_group: bool = False  # this run set up the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over all processes."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


@dataclass
class Run:
    """What the loop works with, set up by `_prepare`."""

    ctx: Context
    config: TrainConfig  # its steps and warmup settled for the data
    out: Path
    adapter: Adapter  # the adapter trained from: checkpoints write its config with the trained weights
    model: nn.Module  # the base with the adapter attached (sharded with --shard)
    engine: nn.Module  # the model, or DistributedDataParallel around it under torchrun without --shard
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    train_set: Dataset
    eval_set: Dataset | None
    pad_id: int
    plt: Any  # matplotlib.pyplot, or None when matplotlib is not installed
    start: int  # the step the loop starts from: 0, or the checkpoint's when resuming
    records: list[dict[str, Any]]  # the metrics so far, the checkpoint's included
    saved: int  # the last step checkpointed in OUT (0: none yet)


def _loop(run: Run, on_log: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """Optimizer steps from run.start to the end, with evaluation, logging and checkpoints as the config asks."""
    config = run.config
    if run.eval_set is not None and run.start == 0:
        _log(run, {"step": 0, "eval_loss": _evaluate(run)}, on_log)
    bar, began = _bar(config.steps, run.start, run.ctx), time.perf_counter()
    for step in range(run.start, config.steps):  # 0-based here; records and checkpoints count steps done
        done = step + 1
        record = _optimizer_step(run, step)
        if run.eval_set is not None and _due(done, config.eval_every, config.steps):
            record["eval_loss"] = _evaluate(run)
        _log(run, record, on_log)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if _due(done, config.save_every, config.steps):
            _checkpoint(run, done)
    if bar is not None:
        bar.close()
    if run.plt is None and run.ctx.rank == 0:  # under torchrun, rank 0 speaks for all
        warn(NO_PLOT)
    return summarize(run, time.perf_counter() - began)


def _optimizer_step(run: Run, step: int) -> dict[str, Any]:
    """Step `step` (0-based): the global batch forward and backward, clipping, AdamW at the scheduled learning
    rate; returns the step's metrics record."""
    config = run.config
    rate = lr_at(step, config.steps, config.lr, config.warmup)
    for group in run.optimizer.param_groups:
        group["lr"] = rate
    began = time.perf_counter()
    indices = step_indices(len(run.train_set), step, config.global_batch, config.seed)
    loss, tokens = train_step(run.engine, [run.train_set.examples[i] for i in indices], config.batch_size, run.pad_id,
                              run.ctx)
    grad_norm = float(whole(nn.utils.clip_grad_norm_(run.trainable, config.max_grad_norm)))
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise LrsError(f"loss is {loss} (gradient norm {grad_norm}) at step {step + 1}; stopped, {_kept(run)}")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "epoch": round((step + 1) * config.global_batch / len(run.train_set), 4), "loss": loss,
            "lr": rate, "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - began)}


def _due(done: int, every: int, last: int) -> bool:
    """Whether a periodic task is due after `done` steps: every `every` steps, and after the last."""
    return done % every == 0 or done == last


def _evaluate(run: Run) -> float:
    """The evaluation loss of the model as it is now."""
    return evaluate_loss(run.model, run.eval_set, run.config.batch_size, run.pad_id, run.ctx)


def _log(run: Run, record: dict[str, Any], on_log: Callable[[dict[str, Any]], None] | None) -> None:
    """Keep the record for metrics.jsonl and hand it to on_log (on rank 0)."""
    run.records.append(record)
    if run.ctx.main and on_log:
        on_log(record)


def _checkpoint(run: Run, step: int) -> None:
    """Save step `step` in OUT, unless the adapter's parameters stopped being finite."""
    nonfinite = sum(not bool(torch.isfinite(local_part(p)).all()) for p in run.trainable)
    if run.ctx.all_sum(nonfinite)[0]:  # a finite loss can precede them; every process must stop alike
        raise LrsError(f"adapter parameters hold NaN or Inf after step {step} (learning rate or weight "
                       f"decay too large?); stopped, {_kept(run)}")
    save_checkpoint(run, step, keep_others=run.config.resume or run.saved > 0)
    run.saved = step


def _interrupted(out: Path) -> KeyboardInterrupt:
    """The interrupt to report: saying which checkpoint OUT keeps, when it has one."""
    try:
        step = json.loads((out / STATE_DIR / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return KeyboardInterrupt()
    return KeyboardInterrupt(f"interrupted; {out} keeps its checkpoint of step {step}")


def _kept(run: Run) -> str:
    """What a stopped run leaves in OUT."""
    return f"{run.out} keeps the last good checkpoint (step {run.saved})" if run.saved else "no checkpoint was written"


# ---------------------------------------------------------------------------- setup
SHARD_ALONE = ("--shard without torchrun: one process holds the whole model (start it with torchrun --nproc_per_node N "
               "--no-python lrs train ... --shard to shard it over N processes)")


def _setup_distributed(device: str, shard: bool = False) -> Context:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA), unless the caller has
    set one up; `shard` without torchrun runs in a process group of one (`_prepare` says so)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):  # the GPU is the process's own (LOCAL_RANK), not a cuda:N
        raise LrsError(f"--device must be auto, cpu or cuda, got {device!r}")
    cuda = resolve_device(device).type == "cuda"
    if cuda and local >= torch.cuda.device_count():
        raise LrsError(f"process {local} on this node needs its own GPU but {torch.cuda.device_count()} are visible: "
                       "start at most that many processes per node (torchrun --nproc_per_node), or use --device cpu")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    owns_group = (world > 1 or shard) and not torch.distributed.is_initialized()
    if owns_group:
        if cuda:
            torch.cuda.set_device(dev)
        backend = "nccl" if cuda else "gloo"
        if world > 1 or _under_torchrun():
            torch.distributed.init_process_group(backend)
        else:  # --shard alone: a group of one, in this process's memory
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
    return Context(rank, world, dev, shard, owns_group)


def _under_torchrun() -> bool:
    return "MASTER_ADDR" in os.environ  # set by torchrun's rendezvous


def _prepare(ctx: Context, adapter: str | os.PathLike | Adapter, base: str | os.PathLike, data: str | os.PathLike,
             out: Path, config: TrainConfig) -> Run:
    """Load the data, the base with the adapter attached, the optimizer and, resuming, the checkpoint's state."""
    if config.batch_size % ctx.world:
        raise LrsError(f"--batch-size {config.batch_size} must be a multiple of the number of processes ({ctx.world})")
    # the one resolver (pickles only when allowed); quantized refused: transformers would load it so, or not at all
    ckpt = Checkpoint(base, allow_pickle=config.allow_pickle, quantized="refuse")
    tokenizer = load_tokenizer(ckpt.path)
    train_set = load_dataset(data, tokenizer, config.seq_len, config.packing)
    eval_set = load_dataset(config.eval_data, tokenizer, config.seq_len, config.packing) if config.eval_data else None
    config = config.for_data(len(train_set))
    resumed = read_resume_state(out) if config.resume else None  # checked before the (slow) model load
    start_adapter = _start_adapter(adapter, out, config)
    if config.grad_checkpointing and start_adapter.method.draws_in_forward:
        raise LrsError(f"this {start_adapter.config.method} adapter draws at random in every training forward, which "
                       f"--grad-checkpointing would recompute differently; train it without --grad-checkpointing")
    if ctx.shard:
        model = engine = load_sharded(ckpt, start_adapter, ctx.device, config.grad_checkpointing)
        if not _under_torchrun():  # once the input is known good: a refusal stays one line
            warn(SHARD_ALONE)
    else:
        model = load_model(ckpt.path, start_adapter, ctx, config.grad_checkpointing)
        engine = _wrap(model, ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LrsError("the adapter has no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    if resumed is not None:
        if ctx.shard:  # checkpoints hold the whole state, whatever the run that wrote them: keep this process's rows
            resumed.optimizer = shard_optimizer_state(resumed.optimizer, trainable)
        _note_world_change(resumed, ctx, start_adapter)
        start, records = restore(resumed, out, optimizer, checkpoint_settings(config, train_set), ctx)
    else:
        start, records = 0, []
        torch.manual_seed(config.seed + ctx.rank)  # dropout streams; a resumed run restores them instead
    return Run(ctx, config, out, start_adapter, model, engine, trainable, optimizer, train_set, eval_set,
               _pad_id(tokenizer), pyplot(), start, records, saved=start)


def _note_world_change(resumed: ResumeState, ctx: Context, adapter: Adapter) -> None:
    """Warn when a checkpoint resumes on another number of processes and dropout draws: each process's dropout
    stream is its own, so the continuation is a valid run but not the one the checkpoint's run would have made."""
    if resumed.world_size not in (None, ctx.world) and adapter.config.dropout > 0 and ctx.main:
        warn(f"resuming a checkpoint of {resumed.world_size} process(es) on {ctx.world}: training continues, but with "
             "other dropout draws than the checkpoint's run would have made")


def _start_adapter(adapter: str | os.PathLike | Adapter, out: Path, config: TrainConfig) -> Adapter:
    """The adapter to train from: ADAPTER, or the checkpoint's in OUT when resuming."""
    if isinstance(adapter, Adapter) and not config.resume:
        return adapter
    return load_adapter(out if config.resume else adapter, config.cola_strategy)


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError) as exc:
        raise LrsError(f"{base}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if not tokenizer("Hello world")["input_ids"]:  # transformers 5 builds an empty tokenizer when files are missing
        raise LrsError(f"{base}: no usable tokenizer (it encodes text to no tokens; are its tokenizer files missing?)")
    return tokenizer


def _pad_id(tokenizer: Any) -> int:
    """The id collate pads with: the tokenizer's padding token, else its end of sequence, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def load_model(base: Path, adapter: Adapter, ctx: Context, grad_checkpointing: bool) -> nn.Module:
    """The base causal LM (float32 on CPU, bfloat16 on CUDA) with the adapter attached and in train mode."""
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    bars = hf_logging.is_progress_bar_enabled()
    if not progress.enabled():  # transformers' own loading bar follows lrs's terminal/--quiet rule
        hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, weights_only=True,
                                                           output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise LrsError(f"{base}: cannot load it as a causal language model ({str(exc).splitlines()[0]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info["missing_keys"])
    if missing:  # transformers initialised them at random: training would fit the adapter to a random head
        raise LrsError(f"{base}: not a causal language model with its head: {type(model).__name__} needs "
                       f"{len(missing)} tensor(s) it lacks (e.g. {missing[0]}), which would start random")
    model.config.use_cache = False
    attach(model, adapter)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(ctx.device).train()


def _wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """DistributedDataParallel under torchrun (unused parameters allowed: some methods draw pairs per step)."""
    if ctx.world == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def _bar(total: int, start: int, ctx: Context):
    if not (ctx.main and progress.enabled()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------------------- one step
def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay towards zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], ctx: Context) -> torch.Tensor:
    """Summed next-token cross-entropy over the target tokens of a batch."""
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    with ctx.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE,
                           reduction="sum")


def train_step(engine: nn.Module, examples: list, batch_size: int, pad_id: int, ctx: Context) -> tuple[float, float]:
    """Forward and backward over one global batch; returns (mean loss per target token, tokens processed).

    Every micro-batch loss is divided by the target-token count of the whole global batch, so the gradient
    is the same however the batch is split into micro-batches and processes (DDP averages over ranks,
    hence the factor `world`).
    """
    n_targets = sum(e.targets() for e in examples)
    micro = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
    loss_sum = tokens = 0.0
    for i, chunk in enumerate(micro):
        mine = chunk[ctx.rank::ctx.world]
        batch = collate(mine, pad_id)
        sync = i == len(micro) - 1 or ctx.world == 1
        with nullcontext() if sync else _accumulating(engine):
            loss = token_loss_sum(engine, batch, ctx)
            (loss * (ctx.world / n_targets)).backward()
        loss_sum += loss.item()
        tokens += batch["attention_mask"].sum().item()
    loss_sum, tokens = ctx.all_sum(loss_sum, tokens)
    return loss_sum / n_targets, tokens


@contextmanager
def _accumulating(engine: nn.Module) -> Iterator[None]:
    """Gradients of a micro-batch that is not the step's last stay in this process: one reduction per step."""
    if hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        with engine.no_sync():
            yield


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: Dataset, batch_size: int, pad_id: int, ctx: Context) -> float:
    """Mean loss per target token over the evaluation set (sharded over processes)."""
    model.eval()
    mine = data.examples[ctx.rank::ctx.world]
    # a sharded model's forward is collective: every process runs as many, those out of examples on a stand-in
    batches = math.ceil(math.ceil(len(data.examples) / ctx.world) / batch_size) if ctx.shard else \
        math.ceil(len(mine) / batch_size)
    loss = targets = 0.0
    for i in range(0, batches * batch_size, batch_size):
        chunk = mine[i:i + batch_size]
        batch_loss = token_loss_sum(model, collate(chunk or data.examples[:1], pad_id), ctx).item()
        if chunk:
            loss += batch_loss
            targets += sum(e.targets() for e in chunk)
    model.train()
    loss, targets = ctx.all_sum(loss, targets)
    return loss / targets


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_settings(config: TrainConfig, train_set: Dataset) -> dict[str, Any]:
    """The settings a checkpoint stores: the config's, and the training data's fingerprint as "data"."""
    return {**config.to_json(), "data": train_set.fingerprint}


def save_checkpoint(run: Run, step: int, keep_others: bool) -> None:
    """Rewrite OUT atomically: adapter files, metrics, plot, card and the state needed to resume.
    keep_others: keep what else OUT holds (else OUT is replaced whole, as --force asks of a new run)."""
    rng = _gather_rng(run.ctx)  # every process takes part, also in gathering a sharded adapter and optimizer state
    weights, optimizer = trained_weights(run.model), _optimizer_tensors(run.optimizer)
    if run.ctx.main:
        trained = Adapter(run.adapter.config, weights)
        with atomic_output(run.out, force=True, replaces=OUTPUTS if keep_others else None) as tmp:
            _write_adapter_and_metrics(tmp, trained, run.records, run.plt)
            _write_trainer_state(tmp / STATE_DIR, optimizer, rng, step, checkpoint_settings(run.config, run.train_set),
                                 run.ctx.world)
    if run.ctx.world > 1:  # no process runs on before the checkpoint is in place: one that dies after cannot undo it
        torch.distributed.barrier()


def _write_adapter_and_metrics(directory: Path, trained: Adapter, records: list[dict], plt: Any) -> None:
    """metrics.jsonl, the loss plot (with pyplot `plt`, unless None), the adapter and its card."""
    (directory / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    images = []
    if plt is not None:
        plot_losses(records, directory / PLOT, plt)
        images = [PLOT]
    write_adapter_files(trained, directory, adapter_card(trained, metrics=read_metrics(directory), images=images))


def _write_trainer_state(state: Path, optimizer: tuple[dict[str, torch.Tensor], list[dict]],
                         rng: dict[str, torch.Tensor], step: int, settings: dict[str, Any], world: int) -> None:
    """The `.trainer/` directory: the optimizer's tensors and groups (`_optimizer_tensors`), every process's RNG
    state, and state.json."""
    tensors, groups = optimizer
    state.mkdir()
    save_tensors({k: t.reshape(t.shape or (1,)) for k, t in tensors.items()}, state / "optimizer.safetensors")
    save_tensors(rng, state / "rng.safetensors")
    scalars = sorted(k for k, t in tensors.items() if t.dim() == 0)  # stored with shape [1]
    (state / "state.json").write_text(json.dumps({"step": step, "settings": settings, "param_groups": groups,
                                                  "scalars": scalars, "world_size": world}, indent=2) + "\n")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer state as flat `<param index>.<name>` tensors plus its JSON-able parameter groups; sharded
    tensors gathered whole, so that any number of processes, sharded or not, can resume from them (collective)."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{name}": whole(torch.as_tensor(v).detach()).cpu() for i, s in sd["state"].items()
               for name, v in s.items()}
    return tensors, sd["param_groups"]


def _gather_rng(ctx: Context) -> dict[str, torch.Tensor]:
    """Every process's torch RNG state (CPU, and CUDA when used), keyed by rank."""
    mine = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device)
    states = [mine]
    if ctx.world > 1:
        states = [None] * ctx.world
        torch.distributed.all_gather_object(states, mine)
    return {f"{kind}.{rank}": t for rank, s in enumerate(states) for kind, t in s.items()}


@dataclass
class ResumeState:
    """A training checkpoint read back from OUT, every part checked."""

    step: int
    settings: dict[str, Any]
    optimizer: dict[str, Any]  # torch's Optimizer.state_dict() layout
    rng: dict[str, torch.Tensor]
    records: list[dict[str, Any]]
    world_size: int | None  # the processes that wrote it (None: not recorded)


STATE_FIELDS: dict[str, Field] = {  # state.json, as save_checkpoint writes it
    "step": (lambda value: type(value) is int and value >= 0, "an integer, at least 0"),
    "settings": (lambda value: isinstance(value, dict) and type(value.get("seed")) is int,
                 "an object with an integer seed"),
    "param_groups": (lambda value: isinstance(value, list) and all(map(_is_adamw_group, value)),
                     "a list of AdamW parameter groups"),
    "scalars": (lambda value: isinstance(value, list), "a list"),
}


def read_resume_state(out: Path) -> ResumeState:
    """The one check of a checkpoint for --resume: LrsError naming the part of OUT that is missing or malformed."""
    state_dir = out / STATE_DIR
    for name in ("state.json", "optimizer.safetensors", "rng.safetensors"):
        if not (state_dir / name).is_file():
            raise LrsError(f"--resume: {state_dir / name} is missing; the checkpoint in {out} is incomplete")
    state = read_json_object(state_dir / "state.json")
    check_fields({name: state.get(name) for name in STATE_FIELDS}, STATE_FIELDS,
                 f"{state_dir / 'state.json'}: malformed or missing ")
    per_param = _read_optimizer_tensors(state_dir / "optimizer.safetensors", state["scalars"])
    records = _read_records(out / METRICS)
    world = state.get("world_size")
    return ResumeState(state["step"], state["settings"], {"state": per_param, "param_groups": state["param_groups"]},
                       _read_rng(state_dir / "rng.safetensors"), [r for r in records if r["step"] <= state["step"]],
                       world if type(world) is int else None)


def _read_optimizer_tensors(path: Path, scalars: list[str]) -> dict[int, dict[str, torch.Tensor]]:
    """optimizer.safetensors back as {parameter index: {name: tensor}}, the `scalars` with their shape () again."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_tensors(path).items():
        index, _, name = key.partition(".")
        if not (index.isdigit() and name):
            raise LrsError(f"{path}: key {key!r} is not <parameter index>.<name>")
        per_param.setdefault(int(index), {})[name] = tensor.reshape(()) if key in scalars else tensor
    return per_param


def _read_rng(path: Path) -> dict[str, torch.Tensor]:
    """rng.safetensors, its CPU states checked to be torch's."""
    rng = load_tensors(path)
    size = torch.get_rng_state().numel()
    bad = next((k for k, t in rng.items() if k.startswith("cpu.") and (t.dtype != torch.uint8 or t.numel() != size)), None)
    if bad is not None:
        raise LrsError(f"{path}: {bad} is not a CPU random state ({size} bytes)")
    return rng


def _read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, each line a record with its integer step."""
    if not path.is_file():
        raise LrsError(f"--resume: {path} is missing; the checkpoint is incomplete")
    records = [record for _, record in read_jsonl(path)]
    bad = next((i for i, r in enumerate(records, 1) if type(r.get("step")) is not int), None)
    if bad is not None:
        raise LrsError(f"{path}: record {bad} has no integer step")
    return records


def _is_adamw_group(group: Any) -> bool:
    """A parameter group as AdamW's state_dict() writes it: parameter indices and its settings' kinds."""
    like = torch.optim.AdamW([nn.Parameter(torch.zeros(1))]).state_dict()["param_groups"][0]
    return (isinstance(group, dict) and isinstance(group.get("params"), list)
            and all(type(i) is int for i in group["params"]) and _same_kind({**group, "params": 0}, {**like, "params": 0}))


def _same_kind(value: Any, like: Any) -> bool:
    """`value` has the JSON shape of `like`: a finite number for a number, a bool for a bool, alike lists, and dicts
    alike in the keys both have (another torch version may add or drop one); anything where `like` is None (unset)."""
    if like is None:
        return True
    if isinstance(like, (bool, str)):
        return type(value) is type(like)
    if isinstance(like, (int, float)):
        return type(value) in (int, float) and math.isfinite(value)
    if isinstance(like, (list, tuple)):
        return isinstance(value, list) and len(value) == len(like) and all(map(_same_kind, value, like))
    if isinstance(like, dict):
        return isinstance(value, dict) and all(_same_kind(value[k], like[k]) for k in value.keys() & like.keys())
    return True


def restore(state: ResumeState, out: Path, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
            ctx: Context) -> tuple[int, list[dict]]:
    """Load the checkpoint's optimizer and RNG state, once this run's checkpoint_settings (`settings`) agree with
    the checkpoint's; returns the step to continue from and the metrics so far."""
    _check_unchanged(state.settings, settings)
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # torch's kinds for a state of another shape
        raise LrsError(f"{out / STATE_DIR}: optimizer state does not match the adapter ({exc})") from None
    _set_rng(state.rng, ctx, state.settings["seed"] + state.step)
    return state.step, state.records


def _check_unchanged(checkpoint: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse a resume whose settings marked must_match, or whose training data, differ from the checkpoint's."""
    changed = [f"{k} {settings[k]} (checkpoint: {checkpoint.get(k)})" for k in (*TrainConfig.must_match(), "data")
               if checkpoint.get(k) != settings[k]]
    if changed:
        raise LrsError(f"--resume needs the checkpoint's settings, but these differ: {', '.join(changed)}")


def _set_rng(states: dict[str, torch.Tensor], ctx: Context, fallback_seed: int) -> None:
    """Restore this rank's RNG state; a rank the checkpoint did not have (more processes now) is reseeded."""
    if f"cpu.{ctx.rank}" not in states:
        torch.manual_seed(fallback_seed + ctx.rank)
        return
    torch.set_rng_state(states[f"cpu.{ctx.rank}"])
    if ctx.device.type == "cuda" and f"cuda.{ctx.rank}" in states:
        torch.cuda.set_rng_state(states[f"cuda.{ctx.rank}"], ctx.device)


# ---------------------------------------------------------------------------- plot and summary
def pyplot() -> Any:
    """matplotlib.pyplot drawing to files, or None when matplotlib is not installed (the plot is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(records: list[dict], path: Path, plt: Any) -> None:
    """Training (and evaluation) loss against step, as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize(run: Run, seconds: float) -> dict[str, Any]:
    """What the run did, for the CLI and for scripts."""
    records, start = run.records, run.start
    ran = [r for r in records if r["step"] > start and "loss" in r]
    last = lambda key: next((r[key] for r in reversed(records) if key in r), None)  # noqa: E731
    return {"out": str(run.out), "steps": run.config.steps, "resumed_from": start, "examples": len(run.train_set),
            "truncated": run.train_set.truncated, "dropped": run.train_set.dropped,
            "eval_examples": len(run.eval_set) if run.eval_set else None, "loss": last("loss"),
            "eval_loss": last("eval_loss"), "trainable_parameters": sum(p.numel() for p in run.trainable),
            "processes": run.ctx.world, "shard": run.ctx.shard, "seconds": round(seconds, 2),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in ran) / len(ran), 1) if ran else None}
