"""`lrs extract-lora`: a LoRA from the difference of a fine-tuned checkpoint and its base (like mergekit-extract-lora).

Shard by shard, D = W_ft − W_base for every target; same-shape differences go through one batched
truncated SVD; B = U_r·diag(S_r), A = Vh_r, α = r (s = 1), so s·B·A is the best rank-r approximation
of D. The retained energy Σ_{i≤r}σ_i² / ‖D‖_F² is reported per module; modules that did not change
are left out of the adapter.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, AdapterConfig, save_adapter
from .checkpoint import Checkpoint, check_output
from .errors import LrsError
from .initialize import load_weight
from .methods import get_method
from .progress import progress
from .targets import Target, compact_names, select_targets


def extract_lora(finetuned: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, rank: int,
                 targets: str = "all-linear", algorithm: str = "exact", niter: int = 4, device: str = "auto",
                 force: bool = False) -> dict[str, Any]:
    """Write a PEFT LoRA approximating FINETUNED − BASE at rank r; returns a report with per-module energy."""
    out = Path(out)
    check_output(out, force, inputs=(finetuned, base))
    if rank < 1:
        raise LrsError(f"--rank must be at least 1, got {rank}")
    if niter < 0:
        raise LrsError(f"--niter must be at least 0, got {niter}")
    start = time.perf_counter()
    ft, bs = Checkpoint(finetuned), Checkpoint(base)
    for ckpt in (ft, bs):  # before comparing layouts: fp8 checkpoints add scale tensors
        ckpt.require_unquantized()
    check_same_layout(ft, bs)
    chosen = select_targets(bs, targets)
    config = AdapterConfig(method="lora", r=rank, alpha=float(rank), target_modules=[],
                           fan_in_fan_out=any(t.conv1d for t in chosen), base_model=bs.source.id)
    for t in chosen:
        get_method(config).validate(t)
    weights, rows = _extract(ft, bs, chosen, rank, algorithm, niter, device)
    if not weights:
        raise LrsError(f"{ft.source.id} and {bs.source.id} have identical weights in every targeted module")
    changed = [t for t in chosen if t.path in weights]
    config.target_modules = compact_names(changed, bs)
    config.options = {"extracted_from": ft.source.id, "algorithm": algorithm,
                      "energy": {row["module"]: row["energy"] for row in rows}}
    config.provenance = {"base": bs.source.id, "base_revision": bs.source.revision, "base_hash": bs.fingerprint(),
                         "created_by": "extract-lora"}
    save_adapter(Adapter(config, weights), out, force=force)
    energies = [row["energy"] for row in rows]
    return {"finetuned": ft.source.id, "base": bs.source.id, "out": str(out), "rank": rank, "algorithm": algorithm,
            "modules": len(weights), "unchanged": len(chosen) - len(weights),
            "min_energy": min(energies), "mean_energy": sum(energies) / len(energies),
            "seconds": round(time.perf_counter() - start, 3), "per_module": rows}


def check_same_layout(ft: Checkpoint, base: Checkpoint) -> None:
    """Same tensor names and shapes, else name the first difference."""
    for name in sorted(set(ft.tensors) | set(base.tensors)):
        if name not in base.tensors:
            raise LrsError(f"tensor {name} is in {ft.source.id} but not in {base.source.id}")
        if name not in ft.tensors:
            raise LrsError(f"tensor {name} is in {base.source.id} but not in {ft.source.id}")
        a, b = ft.tensors[name].shape, base.tensors[name].shape
        if a != b:
            raise LrsError(f"tensor {name} has shape {list(a)} in {ft.source.id} but {list(b)} in {base.source.id}")


def _extract(ft: Checkpoint, bs: Checkpoint, chosen: list[Target], rank: int, algorithm: str, niter: int,
             device: str) -> tuple[dict[str, dict[str, torch.Tensor]], list[dict[str, Any]]]:
    """Per fine-tuned shard: differences, one batched SVD, the factors and their energy."""
    from .svd import truncated_svd

    by_shard: dict[Path, list[Target]] = {}
    for t in chosen:
        by_shard.setdefault(ft.info(t.source).shard, []).append(t)
    weights, rows = {}, []
    for batch in progress(by_shard.values(), "extract", total=len(by_shard), unit="shard"):
        diffs = [(t, load_weight(ft, t) - load_weight(bs, t)) for t in batch]
        diffs = [(t, d) for t, d in diffs if d.any()]
        if not diffs:
            continue
        svds = truncated_svd([d for _, d in diffs], rank, algorithm=algorithm, niter=niter, device=device)
        for (t, d), (u, s, vh) in zip(diffs, svds):
            weights[t.path] = {"lora_A.weight": vh.contiguous(), "lora_B.weight": (u * s).contiguous()}
            energy = min(1.0, float(s.double().square().sum() / d.double().square().sum()))
            rows.append({"module": t.path, "shape": f"{t.out_features}x{t.in_features}", "energy": energy,
                         "error": math.sqrt(1.0 - energy)})
    return weights, rows
