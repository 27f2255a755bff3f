"""`lrs train`: a small, resumable training loop for any lrs adapter, single process or under torchrun.

Read top to bottom: set up the process group, load data, base and adapter; then for each optimizer
step, run `grad_accum` micro-batches (each rank takes its slice of every micro-batch, so the global
batch does not depend on the number of processes), clip, step AdamW at the warmup+cosine learning
rate, log, evaluate and checkpoint. OUT is the adapter directory (the format `lrs init` writes) plus
metrics.jsonl, loss_curve.png (when matplotlib is installed) and the hidden `.trainer/` state; every
checkpoint replaces these atomically (what else OUT holds is kept), so OUT always holds one consistent,
resumable step. The run holds an exclusive claim on OUT from start to end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
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
from .data import IGNORE, Dataset, collate, load_dataset, read_jsonl, step_indices
from .errors import LrsError
from .initialize import check_seed

STATE_DIR = ".trainer"  # hidden: `lrs push OUT` uploads the adapter, metrics and plot, not optimizer state
METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"
OUTPUTS = (CONFIG_NAME, WEIGHTS_NAME, "README.md", METRICS, PLOT, STATE_DIR)  # what a checkpoint replaces in OUT
NO_PLOT = f"no {PLOT}: matplotlib is not installed (pip install matplotlib to plot the losses)"
STREAM_SETTINGS = ("steps", "lr", "batch_size", "grad_accum", "seq_len", "warmup", "weight_decay",
                   "max_grad_norm", "packing", "seed", "data")  # must match for --resume to be exact


@dataclass
class Context:
    """Where this process runs: its rank among `world` processes and its device."""

    rank: int
    world: int
    device: torch.device

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


def train(adapter: str | os.PathLike | Adapter, base: str | os.PathLike, data: str | os.PathLike,
          out: str | os.PathLike, *, steps: int | None = None, epochs: float | None = None, lr: float = 2e-4,
          batch_size: int = 8, grad_accum: int = 1, seq_len: int = 512, eval_data: str | os.PathLike | None = None,
          eval_every: int = 100, save_every: int = 100, warmup: int | None = None, weight_decay: float = 0.0,
          max_grad_norm: float = 1.0, grad_checkpointing: bool = False, packing: bool = False, resume: bool = False,
          force: bool = False, seed: int = 0, device: str = "auto", cola_strategy: str | None = None,
          allow_pickle: bool = False,
          on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train the adapter's parameters on `data` and write the result to `out`; returns a summary.

    steps (optimizer steps) or epochs (default 1) set the length; the global batch is batch_size x grad_accum
    examples whatever the number of processes. on_log receives every metrics record (rank 0 only). cola_strategy
    declares the strategy of an original-code CoLA adapter (see load_adapter).
    """
    out = Path(out)
    _check_args(out, resume, force, steps, epochs, inputs=(adapter, base, data, eval_data),
                positive={"--steps": steps, "--epochs": epochs, "--lr": lr, "--batch-size": batch_size,
                          "--grad-accum": grad_accum, "--save-every": save_every, "--eval-every": eval_every,
                          "--max-grad-norm": max_grad_norm},
                non_negative={"--warmup": warmup, "--weight-decay": weight_decay}, seed=seed)
    ctx = _setup_distributed(device)
    try:
        with claim_output(out, force or resume) if ctx.main else nullcontext():
            return _run(ctx, adapter, base, data, out, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                        grad_accum=grad_accum, seq_len=seq_len, eval_data=eval_data, eval_every=eval_every,
                        save_every=save_every, warmup=warmup, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, grad_checkpointing=grad_checkpointing, packing=packing,
                        resume=resume, seed=seed, cola_strategy=cola_strategy, allow_pickle=allow_pickle,
                        on_log=on_log)
    except KeyboardInterrupt as exc:
        raise exc if exc.args else _interrupted(out) from None
    finally:
        if ctx.world > 1:
            torch.distributed.destroy_process_group()


def _run(ctx: Context, adapter, base, data, out: Path, *, steps, epochs, lr, batch_size, grad_accum, seq_len,
         eval_data, eval_every, save_every, warmup, weight_decay, max_grad_norm, grad_checkpointing, packing,
         resume, seed, cola_strategy, allow_pickle, on_log) -> dict[str, Any]:
    if batch_size % ctx.world:
        raise LrsError(f"--batch-size {batch_size} must be a multiple of the number of processes ({ctx.world})")
    ckpt = Checkpoint(base, allow_pickle=allow_pickle)  # the one resolver: pickles only when allowed
    ckpt.require_unquantized()  # transformers would load it quantized, or not at all on a CPU
    base_path = ckpt.path
    tokenizer = load_tokenizer(base_path)
    train_set = load_dataset(data, tokenizer, seq_len, packing)
    eval_set = load_dataset(eval_data, tokenizer, seq_len, packing) if eval_data else None
    global_batch = batch_size * grad_accum
    total = steps if steps is not None else math.ceil((epochs or 1.0) * len(train_set) / global_batch)
    settings = {"steps": total, "lr": lr, "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len,
                "warmup": round(0.05 * total) if warmup is None else warmup, "weight_decay": weight_decay,
                "max_grad_norm": max_grad_norm, "packing": packing, "seed": seed, "data": train_set.fingerprint}

    resumed = read_resume_state(out) if resume else None  # checked before the (slow) model load
    if isinstance(adapter, Adapter) and not resume:
        start_adapter = adapter
    else:
        start_adapter = load_adapter(out if resume else adapter, cola_strategy)
    model = load_model(base_path, start_adapter, ctx, grad_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise LrsError("the adapter has no trainable parameters")
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    start, records = (restore(resumed, out, optimizer, settings, ctx) if resumed is not None else (0, []))
    if resumed is None:
        torch.manual_seed(seed + ctx.rank)  # dropout streams; a resumed run restores them instead
    engine = _wrap(model, ctx)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    plt = pyplot()

    def evaluate() -> float:
        return evaluate_loss(model, eval_set, batch_size, pad_id, ctx)

    def save(step: int, keep_others: bool) -> None:
        save_checkpoint(out, start_adapter, model, optimizer, step, records, settings, ctx, plt, keep_others)

    if eval_set is not None and start == 0:
        records.append({"step": 0, "eval_loss": evaluate()})
        if ctx.main and on_log:
            on_log(records[-1])
    saved, bar, began = start, _bar(total, start, ctx), time.perf_counter()
    for step in range(start, total):
        rate = lr_at(step, total, lr, settings["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = rate
        t0 = time.perf_counter()
        batch = [train_set.examples[i] for i in step_indices(len(train_set), step, global_batch, seed)]
        loss, tokens = train_step(engine, batch, batch_size, pad_id, ctx)
        grad_norm = float(nn.utils.clip_grad_norm_(trainable, max_grad_norm))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise LrsError(f"loss is {loss} (gradient norm {grad_norm}) at step {step + 1}; stopped, {_kept(out, saved)}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "epoch": round((step + 1) * global_batch / len(train_set), 4), "loss": loss,
                  "lr": rate, "grad_norm": grad_norm, "tokens_per_s": tokens / (time.perf_counter() - t0)}
        if eval_set is not None and ((step + 1) % eval_every == 0 or step + 1 == total):
            record["eval_loss"] = evaluate()
        records.append(record)
        if ctx.main and on_log:
            on_log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (step + 1) % save_every == 0 or step + 1 == total:
            if not all(bool(torch.isfinite(p).all()) for p in trainable):  # a finite loss can precede them
                raise LrsError(f"adapter parameters hold NaN or Inf after step {step + 1} (learning rate or weight "
                               f"decay too large?); stopped, {_kept(out, saved)}")
            save(step + 1, keep_others=resume or saved > 0)
            saved = step + 1
    if bar is not None:
        bar.close()
    return summarize(out, records, train_set, eval_set, start, total, trainable, ctx, time.perf_counter() - began,
                     plotted=plt is not None)


def _interrupted(out: Path) -> KeyboardInterrupt:
    """The interrupt to report: saying which checkpoint OUT keeps, when it has one."""
    try:
        step = json.loads((out / STATE_DIR / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return KeyboardInterrupt()
    return KeyboardInterrupt(f"interrupted; {out} keeps its checkpoint of step {step}")


def _kept(out: Path, saved: int) -> str:
    """What a stopped run leaves in OUT."""
    return f"{out} keeps the last good checkpoint (step {saved})" if saved else "no checkpoint was written"


FLOAT32_MAX = torch.finfo(torch.float32).max  # the optimizer's float32 steps overflow past it: "finite" means below


def _check_args(out: Path, resume: bool, force: bool, steps, epochs, inputs: Sequence[object],
                positive: dict[str, float | None], non_negative: dict[str, float | None], seed: int) -> None:
    if resume and not (out / STATE_DIR / "state.json").is_file():
        raise LrsError(f"--resume: {out} holds no training checkpoint ({STATE_DIR}/state.json)")
    if resume:  # the checkpoint replaces only lrs's own files in OUT; ADAPTER is not read (OUT holds it)
        check_output(out, True, inputs[1:], replaces=OUTPUTS)
    else:
        check_output(out, force, inputs)
    if steps is not None and epochs is not None:
        raise LrsError("give --steps or --epochs, not both")
    for name, value in positive.items():
        if value is not None and not 0 < value <= FLOAT32_MAX:  # also refuses nan
            raise LrsError(f"{name} must be positive and finite, got {value}")
    for name, value in non_negative.items():
        if value is not None and not 0 <= value <= FLOAT32_MAX:
            raise LrsError(f"{name} must be at least 0 and finite, got {value}")
    check_seed(seed)


# ---------------------------------------------------------------------------- setup
def _setup_distributed(device: str) -> Context:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device not in ("auto", "cpu", "cuda"):
        raise LrsError(f"--device must be auto, cpu or cuda, got {device!r}")
    if cuda and not torch.cuda.is_available():
        raise LrsError("--device cuda: no CUDA device is available")
    if cuda and local >= torch.cuda.device_count():
        raise LrsError(f"process {local} on this node needs its own GPU but {torch.cuda.device_count()} are visible: "
                       "start at most that many processes per node (torchrun --nproc_per_node), or use --device cpu")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return Context(rank, world, dev)


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, TypeError) as exc:
        raise LrsError(f"{base}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if not tokenizer("Hello world")["input_ids"]:  # transformers 5 builds an empty tokenizer when files are missing
        raise LrsError(f"{base}: no usable tokenizer (it encodes text to no tokens; are its tokenizer files missing?)")
    return tokenizer


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
        with nullcontext() if sync else engine.no_sync():
            loss = token_loss_sum(engine, batch, ctx)
            (loss * (ctx.world / n_targets)).backward()
        loss_sum += loss.item()
        tokens += batch["attention_mask"].sum().item()
    loss_sum, tokens = ctx.all_sum(loss_sum, tokens)
    return loss_sum / n_targets, tokens


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: Dataset, batch_size: int, pad_id: int, ctx: Context) -> float:
    """Mean loss per target token over the evaluation set (sharded over processes)."""
    model.eval()
    mine = data.examples[ctx.rank::ctx.world]
    loss = targets = 0.0
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        loss += token_loss_sum(model, collate(chunk, pad_id), ctx).item()
        targets += sum(e.targets() for e in chunk)
    model.train()
    loss, targets = ctx.all_sum(loss, targets)
    return loss / targets


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, adapter: Adapter, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    records: list[dict], settings: dict, ctx: Context, plt: Any, keep_others: bool) -> None:
    """Rewrite OUT atomically: adapter files, metrics, plot (with pyplot `plt`), card and the state needed to resume.
    keep_others: keep what else OUT holds (else OUT is replaced whole, as --force asks of a new run)."""
    rng = _gather_rng(ctx)
    if not ctx.main:
        return
    trained = Adapter(adapter.config, trained_weights(model))
    tensors, groups = _optimizer_tensors(optimizer)
    with atomic_output(out, force=True, replaces=OUTPUTS if keep_others else None) as tmp:
        (tmp / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
        images = []
        if plt is not None:
            plot_losses(records, tmp / PLOT, plt)
            images = [PLOT]
        write_adapter_files(trained, tmp, adapter_card(trained, metrics=read_metrics(tmp), images=images))
        state = tmp / STATE_DIR
        state.mkdir()
        save_tensors({k: t.reshape(t.shape or (1,)) for k, t in tensors.items()}, state / "optimizer.safetensors")
        save_tensors(rng, state / "rng.safetensors")
        scalars = sorted(k for k, t in tensors.items() if t.dim() == 0)  # stored with shape [1]
        (state / "state.json").write_text(json.dumps({"step": step, "settings": settings, "param_groups": groups,
                                                      "scalars": scalars, "world_size": ctx.world}, indent=2) + "\n")


@dataclass
class ResumeState:
    """A training checkpoint read back from OUT, every part checked."""

    step: int
    settings: dict[str, Any]
    optimizer: dict[str, Any]  # torch's Optimizer.state_dict() layout
    rng: dict[str, torch.Tensor]
    records: list[dict[str, Any]]


def read_resume_state(out: Path) -> ResumeState:
    """The one check of a checkpoint for --resume: LrsError naming the part of OUT that is missing or malformed."""
    state_dir = out / STATE_DIR
    for name in ("state.json", "optimizer.safetensors", "rng.safetensors"):
        if not (state_dir / name).is_file():
            raise LrsError(f"--resume: {state_dir / name} is missing; the checkpoint in {out} is incomplete")
    state = read_json_object(state_dir / "state.json")
    _check_state_fields(state, state_dir / "state.json")
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in load_tensors(state_dir / "optimizer.safetensors").items():
        index, _, name = key.partition(".")
        if not (index.isdigit() and name):
            raise LrsError(f"{state_dir / 'optimizer.safetensors'}: key {key!r} is not <parameter index>.<name>")
        per_param.setdefault(int(index), {})[name] = tensor.reshape(()) if key in state["scalars"] else tensor
    rng = load_tensors(state_dir / "rng.safetensors")
    size = torch.get_rng_state().numel()
    bad = next((k for k, t in rng.items() if k.startswith("cpu.") and (t.dtype != torch.uint8 or t.numel() != size)), None)
    if bad is not None:
        raise LrsError(f"{state_dir / 'rng.safetensors'}: {bad} is not a CPU random state ({size} bytes)")
    records = _read_records(out / METRICS)
    return ResumeState(state["step"], state["settings"], {"state": per_param, "param_groups": state["param_groups"]},
                       rng, [r for r in records if r["step"] <= state["step"]])


def _check_state_fields(state: dict, where: Path) -> None:
    groups = state.get("param_groups")
    checks = {
        "step": type(state.get("step")) is int and state["step"] >= 0,
        "settings": isinstance(state.get("settings"), dict) and type(state["settings"].get("seed")) is int,
        "param_groups": isinstance(groups, list) and all(_is_adamw_group(g) for g in groups),
        "scalars": isinstance(state.get("scalars"), list),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise LrsError(f"{where}: malformed or missing {', '.join(bad)}")


def _read_records(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl, each line a record with its integer step."""
    if not path.is_file():
        raise LrsError(f"--resume: {path} is missing; the checkpoint is incomplete")
    records = [record for _, record in read_jsonl(path)]
    bad = next((i for i, r in enumerate(records, 1) if type(r.get("step")) is not int), None)
    if bad is not None:
        raise LrsError(f"{path}: record {bad} has no integer step")
    return records


def restore(state: ResumeState, out: Path, optimizer: torch.optim.Optimizer, settings: dict,
            ctx: Context) -> tuple[int, list[dict]]:
    """Load the checkpoint's optimizer and RNG state; returns the step to continue from and the metrics so far."""
    changed = [f"{k} {settings[k]} (checkpoint: {state.settings.get(k)})" for k in STREAM_SETTINGS
               if state.settings.get(k) != settings[k]]
    if changed:
        raise LrsError(f"--resume needs the checkpoint's settings, but these differ: {', '.join(changed)}")
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # torch's kinds for a state of another shape
        raise LrsError(f"{out / STATE_DIR}: optimizer state does not match the adapter ({exc})") from None
    _set_rng(state.rng, ctx, state.settings["seed"] + state.step)
    return state.step, state.records


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


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer state as flat `<param index>.<name>` tensors plus its JSON-able parameter groups."""
    sd = optimizer.state_dict()
    tensors = {f"{i}.{name}": torch.as_tensor(v).detach().cpu() for i, s in sd["state"].items() for name, v in s.items()}
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


def _set_rng(states: dict[str, torch.Tensor], ctx: Context, fallback_seed: int) -> None:
    """Restore this rank's RNG state; a rank the checkpoint did not have (more processes now) is reseeded."""
    if f"cpu.{ctx.rank}" not in states:
        torch.manual_seed(fallback_seed + ctx.rank)
        return
    torch.set_rng_state(states[f"cpu.{ctx.rank}"])
    if ctx.device.type == "cuda" and f"cuda.{ctx.rank}" in states:
        torch.cuda.set_rng_state(states[f"cuda.{ctx.rank}"], ctx.device)


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


def summarize(out: Path, records: list[dict], train_set: Dataset, eval_set: Dataset | None, start: int, total: int,
              trainable: list[torch.Tensor], ctx: Context, seconds: float, plotted: bool) -> dict[str, Any]:
    """What the run did, for the CLI and for scripts."""
    ran = [r for r in records if r["step"] > start and "loss" in r]
    last = lambda key: next((r[key] for r in reversed(records) if key in r), None)  # noqa: E731
    return {"out": str(out), "steps": total, "resumed_from": start, "examples": len(train_set),
            "truncated": train_set.truncated, "dropped": train_set.dropped,
            "eval_examples": len(eval_set) if eval_set else None, "loss": last("loss"), "eval_loss": last("eval_loss"),
            "trainable_parameters": sum(p.numel() for p in trainable), "processes": ctx.world,
            "seconds": round(seconds, 2), "notes": [] if plotted else [NO_PLOT],
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in ran) / len(ran), 1) if ran else None}
