"""Where a command computes: the one reading of `--device auto|cpu|cuda` that every command shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from .errors import LrsError

_DEFAULT: ContextVar[str] = ContextVar("lrs_default_device", default="auto")


@contextlib.contextmanager
def default_device(device: str | torch.device) -> Iterator[None]:
    """Within the block, `auto` means `device` (how `init --device` reaches the SVDs of every method)."""
    resolve_device(device)
    token = _DEFAULT.set(str(device))
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto` -> the default_device, else cuda when available, else cpu; refuse cuda when it is not there."""
    if str(device) == "auto":
        device = _DEFAULT.get()
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LrsError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LrsError(f"device {device!r} requested but CUDA is not available")
    return dev
