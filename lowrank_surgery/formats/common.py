"""What the adapter formats share: recognising a file's key layout, and the plain PEFT LoRA they are read into."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..checkpoint import Checkpoint
from ..config import AdapterConfig
from ..errors import LrsError
from ..targets import linear_targets

KEY_SUFFIXES = {  # how each format's tensor names end, by which a file's layout is recognised
    "kohya": (".lora_down.weight", ".lora_up.weight", ".alpha"),
    "mlx": (".lora_a", ".lora_b"),
    "peft": (".lora_A.weight", ".lora_B.weight", ".miss_block", ".bone_block"),
}

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (B, A, s) with ΔW = s·B·A


def key_layout(keys: Iterable[str], file: Path, expected: str) -> None:
    """All keys follow the `expected` layout (kohya or mlx), else say which layouts were found."""
    found: dict[str, list[str]] = {}
    for key in keys:
        kind = next((name for name, suffixes in KEY_SUFFIXES.items() if key.endswith(suffixes)), "unknown")
        found.setdefault(kind, []).append(key)
    if set(found) != {expected}:
        seen = "; ".join(f"{len(v)} {k} key(s), e.g. {v[0]}" for k, v in found.items()) or "no tensors"
        raise LrsError(f"{file}: {'mixed' if len(found) > 1 else 'unrecognised'} adapter key layout: {seen} "
                       f"(expected only {expected} keys)")


def by_module(tensors: dict[str, torch.Tensor], suffixes: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """`<module path><suffix>` tensors grouped as {module path: {suffix: tensor}}; every key ends with a suffix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        suffix = next(s for s in suffixes if key.endswith(s))
        groups.setdefault(key[: -len(suffix)], {})[suffix] = t
    return groups


def linear_pair(file: Path, name: str, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two factors of a linear LoRA whose product left·right is defined (kohya up·down, mlx-lm lora_a·lora_b)."""
    if left.dim() != 2 or right.dim() != 2:
        raise LrsError(f"{file}: module {name} has factors of shapes {list(left.shape)} and {list(right.shape)}; only "
                       "linear (2-D) LoRA converts, not kohya Conv2d or mlx-lm SwitchLinear (expert) adapters")
    if left.shape[1] != right.shape[0]:
        raise LrsError(f"{file}: module {name} has factors of ranks {left.shape[1]} and {right.shape[0]} "
                       f"(shapes {list(left.shape)}, {list(right.shape)})")
    return left, right


def plain_config(base: Checkpoint | None, dropout: float = 0.0, base_model: str | None = None) -> dict[str, Any]:
    """Config fields of a LoRA read from a format that carries none."""
    fields: dict[str, Any] = {"dropout": dropout, "base_model": base_model}
    if base is not None:
        fields.update(base_model=base.source.id, fan_in_fan_out=any(t.conv1d for t in linear_targets(base)),
                      provenance={"base": base.source.id, "base_revision": base.source.revision,
                                  "base_hash": base.fingerprint()})
    return fields


def lora_adapter(pairs: Pairs, fields: dict[str, Any]) -> Adapter:
    """A PEFT LoRA with ΔW = s·B·A per module: the common (r, α) globally, the rest in rank/alpha patterns."""
    ranks = {path: b.shape[1] for path, (b, _, _) in pairs.items()}
    alphas = {path: _tidy(s * ranks[path]) for path, (_, _, s) in pairs.items()}
    (r, alpha), _ = Counter((ranks[p], alphas[p]) for p in pairs).most_common(1)[0]
    config = AdapterConfig(
        method="lora", r=r, alpha=alpha, target_modules=sorted({p.rsplit(".", 1)[-1] for p in pairs}),
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: a for p, a in alphas.items() if a != alpha}, **fields)
    weights = {p: {"lora_A.weight": a.contiguous(), "lora_B.weight": b.contiguous()} for p, (b, a, _) in pairs.items()}
    return Adapter(config, weights)


def _tidy(x: float) -> float:
    """α rounded away from float noise (16.000001 -> 16.0) when that changes it by < 1e-6 relative."""
    rounded = round(x, 6)
    return rounded if abs(rounded - x) <= 1e-6 * abs(x) else x
