"""Where a command computes: the one reading of `--device auto|cpu|cuda` that every command shares."""

from __future__ import annotations

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
