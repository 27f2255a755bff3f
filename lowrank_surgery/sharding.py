"""`lrs train --shard`: the base and the adapter sharded over the process group by PyTorch's FSDP2 (`fully_shard` on
every decoder layer, then on the root), each process reading from the checkpoint only the rows it keeps.

The model is built with its parameters on the meta device (no memory, no init; buffers such as the rotary
frequencies are computed as usual), the adapter attached and the layers sharded; then each process allocates its
shard of every parameter and fills it: base rows straight from the safetensors files (`Checkpoint.get_rows`),
adapter rows from the adapter's tensors, which every process holds whole (small, and the same everywhere). FSDP2
shards every parameter by rows as torch.chunk cuts it: process k of n keeps rows [k·c, (k+1)·c), c = ⌈rows / n⌉.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .attach import adapter_layers, attach
from .checkpoint import Checkpoint
from .device import local_part, return_freed_memory
from .errors import LrsError

Rows = Callable[[int, int], torch.Tensor]  # rows start:stop of one parameter's full tensor


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, stop) that process `rank` of `world` keeps of a tensor with `rows` rows (FSDP2's Shard(0))."""
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def load_sharded(ckpt: Checkpoint, adapter: Adapter, device: torch.device, grad_checkpointing: bool) -> nn.Module:
    """The base causal LM with the adapter attached, sharded over the default process group, in train mode: float32
    on the CPU; on CUDA stored in bfloat16, computing in bfloat16 and reducing the adapter's gradients in float32.

    On the CPU, over several processes, this sets the process's malloc to give large freed blocks back at once (see
    return_freed_memory in device.py; the CLI sets it for every command)."""
    if device.type == "cpu" and torch.distributed.get_world_size() > 1:
        return_freed_memory()
    model = _empty_model(ckpt, torch.bfloat16 if device.type == "cuda" else torch.float32)
    stored = _stored_names(model, ckpt)
    attach(model, adapter, stored_weight=lambda module: ckpt.get(stored[id(module.weight)]))
    sources = _sources(model, ckpt, stored, adapter)
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _shard(model, device)
    _materialise(model, sources, ckpt, device)
    return model.train()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers goes to the meta device at once (so its init costs nothing); buffers
    are computed as usual, since the checkpoint does not hold the non-persistent ones (rotary frequencies)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _empty_model(ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's causal LM architecture, its parameters on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ckpt.path)
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise LrsError(f"{ckpt.path}: cannot build it as a causal language model ({str(exc).splitlines()[0]})") \
            from None
    model.config.use_cache = False
    return model


def _stored_names(model: nn.Module, ckpt: Checkpoint) -> dict[int, str]:
    """The checkpoint's name of every parameter of the model (by the parameter's id), its shape checked; a base-model
    prefix present on one side only is tolerated, as transformers does."""
    prefix = getattr(model, "base_model_prefix", "")
    names, missing = {}, []
    for name, param in model.named_parameters():
        spellings = (name, name.removeprefix(f"{prefix}."), f"{prefix}.{name}")
        found = next((n for n in spellings if n in ckpt.tensors), None)
        if found is None:
            missing.append(name)
            continue
        if ckpt.info(found).shape != tuple(param.shape):
            raise LrsError(f"{ckpt.source.id}: {found} has shape {list(ckpt.info(found).shape)}, but its config makes "
                           f"{name} {list(param.shape)}")
        names[id(param)] = found
    if missing:  # transformers would initialise them at random: training would fit the adapter to a random head
        raise LrsError(f"{ckpt.source.id}: not a causal language model with its head: {type(model).__name__} needs "
                       f"{len(missing)} tensor(s) it lacks (e.g. {missing[0]}), which would start random (--shard "
                       "reads tensors by the model's own names; transformers' renamed layouts need a run without it)")
    return names


def _sources(model: nn.Module, ckpt: Checkpoint, stored: dict[int, str], adapter: Adapter) -> dict[str, Rows]:
    """Where each parameter's rows come from, by its name in the model: the checkpoint for the base, the adapter's
    tensors (whole in every process) for the adapter."""
    adapter_params = {id(p): adapter.weights[layer.path][name]
                      for layer in adapter_layers(model) for name, p in layer.params().items()}
    sources: dict[str, Rows] = {}
    for name, param in model.named_parameters():
        if id(param) in stored:
            sources[name] = lambda start, stop, key=stored[id(param)]: ckpt.get_rows(key, start, stop)
        else:
            sources[name] = lambda start, stop, full=adapter_params[id(param)]: full[start:stop]
    return sources


def _shard(model: nn.Module, device: torch.device) -> None:
    """fully_shard on every decoder layer (transformers names their class in `_no_split_modules`), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise LrsError(f"--shard: {type(model).__name__} does not name its decoder layers (_no_split_modules), which "
                       "--shard shards by; train it without --shard")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    cuda = device.type == "cuda"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None,
                                  reduce_dtype=torch.float32 if cuda else None)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@torch.no_grad()
def _materialise(model: nn.Module, sources: dict[str, Rows], ckpt: Checkpoint, device: torch.device) -> None:
    """Allocate this process's shard of every parameter on `device` and fill it with its rows; buffers keep their
    computed values (or the checkpoint's, where it holds them)."""
    buffers = {name: ckpt.get(name) if name in ckpt.tensors else b.clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)  # through FSDP2, which re-registers every sharded parameter's local storage
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for name, param in model.named_parameters():
        local = local_part(param)
        start, stop = shard_rows(param.shape[0], rank, world) if param.dim() else (0, 1)
        if param.dim() and local.shape[0] != stop - start:
            raise AssertionError(f"FSDP2 gave process {rank} {local.shape[0]} rows of {name}, not {stop - start}")
        local.copy_(sources[name](start, stop))


def shard_optimizer_state(state: dict[str, Any], params: list[nn.Parameter]) -> dict[str, Any]:
    """An optimizer state as checkpoints store it (torch's Optimizer.state_dict() layout, whole tensors) cut to this
    process's rows of every sharded parameter, as DTensors placed like the parameters."""
    from torch.distributed.tensor import DTensor

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def cut(value: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        if not isinstance(param, DTensor) or tuple(value.shape) != tuple(param.shape) or not param.dim():
            return value  # AdamW's step count, or a state that does not fit (load_state_dict says so)
        start, stop = shard_rows(param.shape[0], rank, world)
        return DTensor.from_local(value[start:stop], param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())

    per_param = {i: {k: cut(v, params[i]) if i < len(params) else v for k, v in s.items()}
                 for i, s in state["state"].items()}
    return {**state, "state": per_param}
