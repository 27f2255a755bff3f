"""`lrs init`: build a fresh adapter for a base checkpoint, for any registered method."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .adapter import Adapter
from .config import AdapterConfig
from .checkpoint import Checkpoint
from .device import resolve_device
from .errors import LrsError
from .methods import METHODS, get_method
from .progress import progress
from .targets import Target, compact_names, in_batches, load_weight, select_targets


def init_adapter(method: str, base: str | os.PathLike | Checkpoint, *, r: int = 8, alpha: float | None = None,
                 targets: str | Sequence[str] | None = None, dropout: float = 0.0, rslora: bool = False,
                 seed: int = 0, revision: str | None = None, options: dict[str, Any] | None = None,
                 device: str = "auto", allow_pickle: bool = False) -> Adapter:
    """Initialise a `method` adapter (lora, cora, pissa, cola, fossil) for the linear modules of `base`.

    `device` is where the SVDs of PiSSA and CoLA run (auto: CUDA when present); the adapter is on the CPU.
    """
    if method not in METHODS:
        raise LrsError(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if r < 1:
        raise LrsError(f"--rank must be at least 1, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise LrsError(f"--dropout must be in [0, 1), got {dropout}")
    if alpha is not None and not (math.isfinite(alpha) and alpha != 0):
        raise LrsError(f"--alpha must be a finite nonzero number, got {alpha}")
    check_seed(seed)
    dev = resolve_device(device)
    cls = METHODS[method]
    typed = cls.Options.build(options or {}, method)
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base, revision, allow_pickle)
    spec = targets if targets is not None else cls.default_targets(typed)
    chosen = select_targets(ckpt, spec)
    config = AdapterConfig(
        method=method, r=r, alpha=float(alpha if alpha is not None else r),
        target_modules=compact_names(chosen, ckpt), dropout=dropout, rslora=rslora,
        fan_in_fan_out=any(t.conv1d for t in chosen), options=typed, base_model=ckpt.source.id,
        provenance={"base": ckpt.source.id, "base_revision": ckpt.source.revision,
                    "base_hash": ckpt.fingerprint(), "seed": seed},
    )
    impl = get_method(config)
    for t in chosen:
        impl.validate(t)
    impl.warn_native()
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for batch, mats in _batches(ckpt, chosen, impl.needs_base_weight):
        for t, params in zip(batch, impl.init(batch, mats, generator, dev)):
            weights[t.path] = params
    return Adapter(impl.config, weights)


SEED_LIMIT = 2**32  # numpy's range; leaves room for the per-layer and per-epoch offsets added to it


def check_seed(seed: int) -> None:
    """Seeds must fit torch's generators, offsets included."""
    if not 0 <= seed < SEED_LIMIT:
        raise LrsError(f"--seed must be between 0 and {SEED_LIMIT - 1}, got {seed}")


def _batches(ckpt: Checkpoint, targets: list[Target], with_weights: bool
             ) -> Iterator[tuple[list[Target], list[torch.Tensor] | None]]:
    """All targets at once, or in bounded batches with their float32 weights when the method reads W."""
    if not with_weights:
        yield targets, None
        return
    batches = in_batches(ckpt, targets)
    for batch in progress(batches, "init", total=len(batches), unit="batch"):
        yield batch, [load_weight(ckpt, t) for t in batch]
