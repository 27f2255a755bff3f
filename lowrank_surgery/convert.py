"""`lrs convert`: adapters between PEFT LoRA, PEFT MiSS, CoLA, kohya and mlx-lm, and to llama.cpp's GGUF, through ΔW.

Every method reaches plain LoRA through the `Method` interface alone: `pair` gives (B, A) with
ΔW = s·B·A (exact; s is recovered from `delta`, so methods that do not scale by α/r need nothing
special), and a method without a pair (ΔW depends on W) is exported by a truncated SVD of `delta`
at --rank, which is lossy and reported. The plain-LoRA result is then written as:

- peft-lora: PEFT `LORA` directory; per-module `rank_pattern`/`alpha_pattern` (keys = module paths)
  so that PEFT's α/r reproduces each module's scale exactly. (llama.cpp's convert_lora_to_gguf.py reads
  only the global `lora_alpha` and takes r from each tensor's shape: rank_pattern is fine there,
  alpha_pattern is not.)
- kohya, mlx, gguf: kohya-ss, mlx-lm and llama.cpp's files, each laid out as its module in `formats/` documents
  (kohya and mlx are read too, and any adapter lrs reads converts).
- peft-miss, cola: the FOSSIL and CoLA methods' own formats as their reference code loads them
  (`Method.export_native`): PEFT MiSS (Bone -> MiSS); the original CoLA code's layout (see methods/cola.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .adapter import CONFIG_NAME, Adapter, load_adapter, read_config, write_adapter_files
from .checkpoint import Checkpoint, atomic_output, check_output, read_header
from .errors import LrsError
from .formats.common import Pairs, key_layout, lora_adapter
from .formats.gguf import family_of, write_gguf
from .formats.kohya import read_kohya, write_kohya
from .formats.mlx import read_mlx, write_mlx
from .methods import METHODS
from .svd import lowrank_factors
from .targets import Target, linear_targets, load_weight

FORMATS = ("peft-lora", "peft-miss", "kohya", "mlx", "cola", "gguf")
NATIVE = {"peft-miss": "MISS", "cola": "COLA"}  # formats that are a method's own on-disk layout


# ------------------------------------------------------------------------------------------ reading


def detect_format(path: str | os.PathLike) -> str:
    """'peft' (an lrs/PEFT adapter directory), 'kohya' or 'mlx'; LrsError for anything else."""
    p = Path(path)
    if not p.exists():
        raise LrsError(f"no such file or directory: {p}")
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        return "mlx" if "lora_parameters" in read_config(p) else "peft"
    file = _single_safetensors(p)
    key_layout(read_header(file)[0], file, "kohya")
    return "kohya"


def _single_safetensors(p: Path) -> Path:
    if p.is_file():
        return p
    files = sorted(p.glob("*.safetensors"))
    if len(files) != 1:
        raise LrsError(f"{p}: not an adapter (no {CONFIG_NAME}, and {len(files)} .safetensors files instead of one)")
    return files[0]


def read_adapter(path: str | os.PathLike, base: Checkpoint | None = None, cola_strategy: str | None = None
                 ) -> tuple[Adapter, str]:
    """Any adapter lrs reads, as (adapter, format); kohya names resolve against `base`."""
    fmt = detect_format(path)
    if fmt == "peft":
        return load_adapter(path, cola_strategy), fmt
    if cola_strategy is not None:
        raise LrsError(f"--cola-strategy applies to CoLA adapters, but {path} is a {fmt} LoRA")
    if fmt == "mlx":
        return read_mlx(Path(path), base), fmt
    return read_kohya(_single_safetensors(Path(path)), base), fmt


# ------------------------------------------------------------------------------------------ plain LoRA


def to_lora(adapter: Adapter, base: Checkpoint | None = None, rank: int | None = None,
            allow_lossy: bool = False) -> tuple[Adapter, list[dict[str, Any]]]:
    """Plain LoRA with the same ΔW: exact through `pair`, else a truncated SVD of ΔW (needs --base, --allow-lossy)."""
    method = adapter.method
    targets = _base_targets(adapter, base)
    found = {path: _pair(method, params, targets.get(path), path) for path, params in adapter.weights.items()}
    lossy = [p for p, pair in found.items() if pair is None or (rank is not None and pair[0].shape[1] > rank)]
    _check_lossy(adapter, found, lossy, base, rank, allow_lossy)
    pairs: Pairs = {}
    rows = []
    for path, pair in found.items():
        s, err = method.scale(path), 0.0
        if pair is not None:
            pairs[path] = (*pair, s)
        if path in lossy:
            delta = _weight_delta(adapter, path, base, targets[path]) if pair is None \
                else s * (pair[0].float() @ pair[1].float())
            b, a, err = _truncate(delta, min(rank or adapter.config.rank(path), *delta.shape))
            pairs[path] = (b, a, 1.0)
        rows.append({"module": path, "rank": pairs[path][0].shape[1], "error": err, "exact": path not in lossy})
    return lora_adapter(pairs, _converted_fields(adapter, rows)), rows


def _base_targets(adapter: Adapter, base: Checkpoint | None) -> dict[str, Target]:
    """The base's targets for the adapter's modules, after filling parameters only the base can give."""
    if base is None:
        return {}
    targets = {t.path: t for t in linear_targets(base)}
    for path in adapter.weights:
        if path not in targets:
            raise LrsError(f"adapter module {path} is not a linear module of {base.source.id}")
    method = adapter.method
    method.complete(adapter.weights, lambda p: load_weight(base, targets[p]))
    for path, params in adapter.weights.items():
        method.check_fits(targets[path], params)
    return targets


def _pair(method, params, target: Target | None, path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        return method.pair(params, shape=None if target is None else target.shape)
    except LrsError as exc:
        if target is not None:
            raise
        raise LrsError(f"converting {method.name} module {path} needs the base model (--base MODEL): {exc}") from None


def _check_lossy(adapter: Adapter, found: dict, lossy: list[str], base: Checkpoint | None, rank: int | None,
                 allow_lossy: bool) -> None:
    """Refuse, before any work, what needs the base or loses information without --allow-lossy."""
    name = adapter.method.name
    no_pair = [p for p in lossy if found[p] is None]
    if no_pair and base is None:
        raise LrsError(f"{name} module {no_pair[0]}: ΔW is not low-rank (it depends on the base weight); "
                       f"pass --base MODEL (and --rank R, --allow-lossy) to export it by truncated SVD")
    if lossy and not allow_lossy:
        why = "ΔW is not low-rank" if no_pair else f"--rank {rank} truncates ΔW"
        raise LrsError(f"converting {len(lossy)} {name} module(s) to LoRA loses information "
                       f"({why}, e.g. {lossy[0]}); pass --allow-lossy to accept a truncated SVD")


def _weight_delta(adapter: Adapter, path: str, base: Checkpoint, target: Target) -> torch.Tensor:
    """ΔW of a module whose ΔW depends on the base weight W (FOSSIL bat)."""
    return adapter.method.delta(adapter.weights[path], path, target.shape, load_weight(base, target)).float()


def _relative(reference: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(reference.double().norm())
    diff = float((reference.double() - approx.double()).norm())
    return diff / norm if norm > 0 else diff


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-r SVD of ΔW as (B = U·S, A = Vh) and its relative Frobenius error."""
    b, a = lowrank_factors([delta], rank, algorithm="exact", device="cpu")[0]
    return b, a, _relative(delta, b @ a)


def _converted_fields(adapter: Adapter, rows: list[dict[str, Any]]) -> dict[str, Any]:
    c = adapter.config
    lossy = {row["module"]: row["error"] for row in rows if not row["exact"]}
    provenance = {**c.provenance, "converted_from": {"method": c.method, **dict(c.options)}}
    if lossy:
        provenance["conversion_error"] = lossy
    return {"dropout": c.dropout, "fan_in_fan_out": c.fan_in_fan_out, "base_model": c.base_model,
            "provenance": provenance}


# ------------------------------------------------------------------------------------------ convert


def convert(adapter_path: str | os.PathLike, out: str | os.PathLike, to: str, base: str | os.PathLike | None = None,
            rank: int | None = None, allow_lossy: bool = False, force: bool = False,
            cola_strategy: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Convert any adapter lrs reads to `to` (peft-lora, peft-miss, kohya, mlx, cola); returns a report."""
    if to not in FORMATS:
        raise LrsError(f"unknown format {to!r} (known: {', '.join(FORMATS)})")
    if rank is not None and rank < 1:
        raise LrsError(f"--rank must be at least 1, got {rank}")
    if to == "gguf" and base is None:
        raise LrsError("--to gguf needs --base MODEL: its config.json names the architecture and the heads "
                       "llama.cpp's tensor layout depends on")
    out = Path(out)
    check_output(out, force, inputs=(adapter_path, base))
    ckpt = Checkpoint(base, allow_pickle=allow_pickle) if base is not None else None
    if to == "gguf":
        family_of(ckpt)  # refuse an architecture llama.cpp's layout is not known for before any work
    adapter, fmt = read_adapter(adapter_path, ckpt, cola_strategy)
    if adapter.saved:
        raise LrsError(f"{adapter_path} holds whole modules (modules_to_save: {', '.join(adapter.config.modules_to_save)})"
                       f", which --to {to} cannot carry; PEFT and lrs merge read the adapter as it is")
    report: dict[str, Any] = {"source": str(adapter_path), "from": fmt, "method": adapter.config.method,
                              "to": to, "out": str(out)}
    config, rows = None, []
    if to in NATIVE:
        result, config = _native(adapter, NATIVE[to], ckpt)
    else:
        result, rows = to_lora(adapter, ckpt, rank, allow_lossy)
    with atomic_output(out, force, file=to == "gguf") as tmp:
        _write(result, to, tmp, ckpt, config)
    errors = [row["error"] for row in rows]
    return report | {"modules": len(result.weights), "rank": result.config.r, "alpha": result.config.alpha,
                     "lossy": any(not row["exact"] for row in rows), "max_error": max(errors, default=0.0),
                     "per_module": rows}


def _native(adapter: Adapter, peft_type: str, base: Checkpoint | None) -> tuple[Adapter, dict[str, Any]]:
    """The adapter in its own method's format as that format's reference code loads it (see Method.export_native):
    (adapter, its adapter_config.json), when the method writes `peft_type`."""
    writers = [cls.name for cls in METHODS.values() if cls.peft_type == peft_type]
    if not writers:
        raise LrsError(f"no installed method writes {peft_type} adapters")
    if adapter.method.peft_type != peft_type:
        raise LrsError(f"a {adapter.config.method} adapter cannot be expressed as {peft_type} "
                       f"(only {', '.join(writers)} adapters can); convert it --to peft-lora instead")
    _base_targets(adapter, base)
    weights, config, json_config = adapter.method.export_native(adapter.weights)
    return Adapter(config, weights), json_config


def _write(adapter: Adapter, to: str, directory: Path, base: Checkpoint | None,
           config: dict[str, Any] | None = None) -> None:
    if to == "gguf":
        write_gguf(adapter, directory, base)
    elif to == "kohya":
        write_kohya(adapter, directory)
    elif to == "mlx":
        write_mlx(adapter, directory, None if base is None else base.config.get("num_hidden_layers"))
    else:
        write_adapter_files(adapter, directory, config=config)
