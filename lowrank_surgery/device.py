"""Where a command computes: the one reading of `--device auto|cpu|cuda` that every command shares, and a tensor as
one process of a sharded run (`lrs train --shard`) holds it."""

from __future__ import annotations

import sys

import torch

from .errors import LrsError


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything torch.device reads; refuse cuda when it is not there."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LrsError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LrsError(f"device {device!r} requested but CUDA is not available")
    return dev


def _is_dtensor(t: torch.Tensor) -> bool:
    # Importing torch.distributed.tensor costs most of a second: when nothing has imported it, nothing is sharded.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor gathered (collective: every process of its group must call this), any
    other tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of the tensor: a DTensor's local shard, any other tensor whole."""
    return t.to_local() if _is_dtensor(t) else t
