"""`lrs inspect`: a summary of a checkpoint, an adapter or a subspace directory."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from .adapter import CONFIG_NAME
from .checkpoint import Checkpoint, DTYPE_NAMES
from .convert import detect_format, read_adapter
from .errors import LrsError
from .subspace import read_subspace_info
from .targets import kinds, linear_targets


def inspect_path(path: str | os.PathLike, cola_strategy: str | None = None, allow_pickle: bool = False
                 ) -> dict[str, Any]:
    """Describe PATH as a dict with a `kind` key: checkpoint, adapter or subspace."""
    p = Path(path)
    if not p.exists():
        raise LrsError(f"no such file or directory: {p}")
    if _is_adapter(p) and not (p.is_dir() and (p / "subspace.json").is_file()):
        return inspect_adapter(p, cola_strategy)
    if cola_strategy is not None:
        raise LrsError(f"--cola-strategy applies to CoLA adapters, but {p} is not an adapter")
    if p.is_dir() and (p / "subspace.json").is_file():
        return read_subspace_info(p) | {"kind": "subspace", "path": str(p)}
    return inspect_checkpoint(p, allow_pickle)


def _is_adapter(p: Path) -> bool:
    """An lrs/PEFT, mlx-lm or kohya adapter (a .safetensors of kohya keys is one too)."""
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        return True
    try:
        detect_format(p)
    except LrsError:
        return False
    return True


def inspect_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, Any]:
    ckpt = Checkpoint(path, allow_pickle=allow_pickle)
    dtypes = Counter(DTYPE_NAMES.get(i.dtype, str(i.dtype)) for i in ckpt.tensors.values())
    linears = linear_targets(ckpt)
    return {
        "kind": "checkpoint",
        "path": str(path),
        "model_type": ckpt.config.get("model_type"),
        "architectures": ckpt.config.get("architectures"),
        "shards": [s.name for s in ckpt.shards],
        "tensors": len(ckpt.tensors),
        "parameters": sum(i.numel for i in ckpt.tensors.values()),
        "bytes": sum(i.nbytes for i in ckpt.tensors.values()),
        "dtypes": dict(dtypes),
        "linear_modules": len(linears),
        "module_types": {k: _shape_of(linears, k) for k in kinds(linears)},
        "conv1d": any(t.conv1d for t in linears),
        "tie_word_embeddings": ckpt.config.get("tie_word_embeddings"),
    }


def _shape_of(targets, kind: str) -> str:
    shapes = sorted({f"{t.out_features}x{t.in_features}" for t in targets if t.kind == kind})
    count = sum(t.kind == kind for t in targets)
    return f"{count} x ({', '.join(shapes)})"


def inspect_adapter(path: Path, cola_strategy: str | None = None) -> dict[str, Any]:
    adapter, fmt = read_adapter(path, cola_strategy=cola_strategy)
    c = adapter.config
    return {
        "kind": "adapter",
        "path": str(path),
        "format": fmt,
        "method": c.method,
        "peft_type": adapter.method.peft_type,
        "rank": c.r,
        "alpha": c.alpha,
        "scale": c.scale(adapter.modules[0]),
        "dropout": c.dropout,
        "options": dict(c.options),
        "base_model": c.base_model,
        "target_modules": c.target_modules,
        "modules_to_save": c.modules_to_save,
        "modules": len(adapter.weights),
        "parameters": adapter.num_parameters(),
        "trainable_parameters": adapter.num_parameters(trainable_only=True),
        "tensors": sorted({n for params in adapter.weights.values() for n in params}),
    }


NESTED = {"module_types", "energy", "shapes"}  # dicts shown one entry per line


def format_summary(info: dict[str, Any]) -> str:
    """A readable, aligned key: value listing."""
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) if key not in NESTED else "\n" + "\n".join(
                f"{'':{width + 4}}{k}: {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        lines.append(f"{key:>{width}}: {value}")
    return "\n".join(lines)
