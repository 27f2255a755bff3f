"""Where a command computes: the one reading of `--device auto|cpu|cuda` that every command shares, a tensor as
one process of a sharded run (`lrs train --shard`) holds it, and host memory given back when freed."""

from __future__ import annotations

import ctypes
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


M_MMAP_THRESHOLD = -3  # glibc's mallopt setting: blocks from this size up are mapped, and unmapped when freed


def return_freed_memory() -> None:
    """Give every allocation of 1 MiB or more its own mapping, returned to the system when freed (process-wide).

    Once a mapped block is freed glibc raises its mmap threshold (up to 32 MiB), and weight-sized tensors then come
    from its heap, which fragments between the blocks still live and never shrinks: extract-lora's peak grew by a
    batch of weights per batch, and each process of `train --shard` on the CPU (FSDP2 frees every layer's gathered
    weights) to more than the whole model. A fixed threshold keeps the peak at what is live (tests/test_memory.py).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows): no such ratchet to turn off
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)


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
