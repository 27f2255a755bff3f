"""`lrs extract-lora`: a LoRA from the difference of a fine-tuned checkpoint and its base (like mergekit-extract-lora).

Shard by shard, D = W_ft − W_base for every target; same-shape differences go through one batched
truncated SVD D ≈ U_r·diag(S_r)·Vh_r. The rank r is fixed (`rank`) or chosen per module (`RankRule`): the fewest
singular values whose energy Σ_{i≤r}σ_i² reaches a fraction of ‖D‖_F² = Σσ_i², or those above a fraction of σ_max,
at most `rank` when given. The factors are B = U_r·diag(S_r), A = Vh_r (mergekit's split) or, with
`distribute_scale`, B = U_r·diag(√S_r), A = diag(√S_r)·Vh_r; α = r per module (alpha_pattern beside rank_pattern),
so s = 1 and s·B·A is the rank-r truncation of D. The retained energy Σ_{i≤r}σ_i² / ‖D‖_F² is reported per module;
modules that did not change (D exactly zero) are left out of the adapter.

A LoRA only holds linear weights: changes to anything else (norms, embeddings, biases, an untargeted lm_head)
are reported, with their share in the total retained energy, and warned about unless kept whole as PEFT
`modules_to_save` (`--save-changed`, `--save-module NAME`, mergekit's habit), which PEFT and `lrs merge` apply.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapter import Adapter, save_adapter
from .architecture import layout
from .config import AdapterConfig, pattern_key
from .checkpoint import Checkpoint, check_output
from .errors import LrsError, warn
from .methods import get_method
from .progress import progress
from .svd import split_factors, squared_norm, truncated_svd
from .targets import Target, compact_names, in_batches, load_weight, select_targets


@dataclass(frozen=True)
class Change:
    """A changed tensor outside the LoRA targets: ‖ΔT‖² and ‖ΔT‖ / ‖T_base‖."""

    name: str
    squared: float
    relative: float

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]


SPLITS = {False: "B=U*S, A=Vh", True: "B=U*sqrt(S), A=sqrt(S)*Vh"}  # by distribute_scale; recorded in the adapter
# Float32 singular values carry ~1e-7 relative rounding: without slack, --energy 1 on an exactly low-rank
# difference would keep noise singular values past its rank.
ENERGY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class RankRule:
    """How many singular values each module keeps: `rank` alone fixes it; `energy` keeps the fewest whose energy
    Σ_{i≤r}σ_i² reaches that fraction of ‖ΔW‖_F² = Σσ_i², `threshold` those with σ_i > threshold·σ_max (relative to
    the module's largest); with either, `rank` is the most a module keeps. Never 0 for a changed module."""

    rank: int | None = None
    energy: float | None = None
    threshold: float | None = None

    @property
    def fixed(self) -> bool:
        return self.energy is None and self.threshold is None

    def svd_rank(self, rows: int, columns: int) -> int:
        """Singular triplets to compute for a rows×columns difference: the fixed rank, else one past the cap
        (which tells whether the cap stopped the rule short), else all of them."""
        if self.fixed:
            return self.rank  # type: ignore[return-value]
        full = min(rows, columns)
        return full if self.rank is None else min(self.rank + 1, full)

    def choose(self, s: Tensor, squared: float, full: int) -> tuple[int, bool]:
        """(rank, whether the cap kept fewer than the rule asks) from the leading singular values `s` (descending)
        of a difference with ‖ΔW‖_F² = `squared` and min(rows, columns) = `full`."""
        if self.fixed:
            return len(s), False
        if self.energy is not None:
            reached = torch.cumsum(s.double().square(), 0) >= (self.energy - ENERGY_TOLERANCE) * squared
            wanted = int(reached.int().argmax()) + 1 if reached.any() else len(s) + 1
        else:
            wanted = int((s > self.threshold * s[0]).sum())
        limit = full if self.rank is None else min(self.rank, full)
        return max(1, min(wanted, limit)), wanted > limit and limit < full


def _rank_rule(rank: int | None, energy: float | None, threshold: float | None, algorithm: str) -> RankRule:
    """The rule the flags give, or the one line saying what is wrong with them."""
    if rank is None and energy is None and threshold is None:
        raise LrsError("give --rank R, --energy F or --threshold T: how many singular values each module keeps")
    if energy is not None and threshold is not None:
        raise LrsError("--energy and --threshold both choose each module's rank: give one of them")
    if rank is not None and rank < 1:
        raise LrsError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise LrsError(f"--energy must be in (0, 1] (the share of the squared Frobenius norm of the difference "
                       f"to keep), got {energy}")
    if threshold is not None and not 0 <= threshold < 1:
        raise LrsError(f"--threshold must be in [0, 1) (a fraction of each module's largest singular value), "
                       f"got {threshold}")
    if algorithm == "randomized" and rank is None:
        raise LrsError("--algorithm randomized computes at most --rank singular values: give --rank as the cap "
                       "of --energy or --threshold, or use --algorithm exact")
    return RankRule(rank, energy, threshold)


def extract_lora(finetuned: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                 rank: int | None = None, targets: str = "all-linear", algorithm: str = "exact", niter: int = 4,
                 device: str = "auto", force: bool = False, save_modules: Sequence[str] = (),
                 save_changed: bool = False, allow_pickle: bool = False, energy: float | None = None,
                 threshold: float | None = None, distribute_scale: bool = False) -> dict[str, Any]:
    """Write a PEFT LoRA approximating FINETUNED − BASE; returns a report with per-module rank and energy.
    The rank is `rank` everywhere, or chosen per module by `energy` or `threshold` (see RankRule), at most `rank`.
    Changed tensors outside the targets are kept whole (PEFT modules_to_save) for the modules `save_modules`
    names, or all of them with `save_changed`; the others are reported as dropped."""
    out = Path(out)
    rule = _rank_rule(rank, energy, threshold, algorithm)
    check_output(out, force, inputs=(finetuned, base))
    if niter < 0:
        raise LrsError(f"--niter must be at least 0, got {niter}")
    start = time.perf_counter()
    # refused before comparing layouts when quantized: fp8 checkpoints add scale tensors
    ft, bs = (Checkpoint(m, allow_pickle=allow_pickle, quantized="refuse") for m in (finetuned, base))
    check_same_layout(ft, bs)
    chosen = select_targets(bs, targets)
    config = AdapterConfig(method="lora", r=1, alpha=1.0, target_modules=[],
                           fan_in_fan_out=any(t.conv1d for t in chosen), base_model=bs.source.id)
    if rule.fixed:  # a fixed rank must fit every module before a shard is read; chosen ranks fit by construction
        config.r = rank
        for t in chosen:
            get_method(config).validate(t)
    kept = modules_to_save(bs, chosen, save_modules)
    weights, rows = _extract(ft, bs, chosen, rule, distribute_scale, algorithm, niter, device)
    if not weights:
        raise LrsError(f"{ft.source.id} and {bs.source.id} have identical weights in every targeted module")
    targeted = {t.path for t in chosen}

    def keeps(module: str) -> bool:  # kept whole: named by --save-module, or any changed one with --save-changed
        return module in kept or (save_changed and module not in targeted)

    changes, fine_tuned = other_changes(ft, bs, chosen, keeps)
    kept |= {c.module for c in changes if keeps(c.module)}
    dropped = [c for c in changes if c.module not in kept]
    if dropped:
        warn(_dropped_warning(dropped))
    changed = [t for t in chosen if t.path in weights]
    config.target_modules = compact_names(changed, bs)
    config.modules_to_save = sorted(kept)
    _set_ranks(config, {row["module"]: row["rank"] for row in rows}, [t.path for t in chosen])
    split = SPLITS[distribute_scale]
    config.provenance = {"base": bs.source.id, "base_revision": bs.source.revision, "base_hash": bs.fingerprint(),
                         "created_by": "extract-lora", "extracted_from": ft.source.id, "algorithm": algorithm,
                         "split": split, "rank_rule": asdict(rule),
                         "energy": {row["module"]: row["energy"] for row in rows}}
    saved = {name: fine_tuned[name] if name in fine_tuned else ft.get_finite(name)
             for name in ft.tensors if name.rpartition(".")[0] in kept}
    for group in _tied_groups(bs, saved):
        warn(f"{group[0]} is tied to {', '.join(group[1:])} in this architecture: PEFT keeps its modules_to_save copy "
             f"apart from the tied weight, so PEFT will not reproduce the fine-tuned model (lrs merge does)")
    save_adapter(Adapter(config, weights, saved), out, force=force)
    energies = [row["energy"] for row in rows]
    return {"finetuned": ft.source.id, "base": bs.source.id, "out": str(out), "rank": rank, "energy_target": energy,
            "threshold": threshold, "split": split, "algorithm": algorithm, "modules": len(weights),
            "unchanged": len(chosen) - len(weights),
            "min_energy": min(energies), "mean_energy": sum(energies) / len(energies),
            "total_energy": _total_energy(rows, changes, dropped), "modules_to_save": config.modules_to_save,
            "dropped": {"tensors": [c.name for c in dropped],
                        "max_relative_change": max((c.relative for c in dropped), default=0.0)},
            "seconds": round(time.perf_counter() - start, 3), "per_module": rows}


def modules_to_save(base: Checkpoint, chosen: Sequence[Target], names: Sequence[str]) -> set[str]:
    """The module paths that `--save-module NAME`s give (a path or its dotted suffix), outside the LoRA targets."""
    targeted = {t.path for t in chosen}
    modules = {name.rpartition(".")[0] for name in base.tensors}
    kept = set()
    for name in names:
        found = {m for m in modules if m == name or m.endswith("." + name)}
        if not found:
            raise LrsError(f"--save-module {name} matches no module of {base.source.id}")
        if found & targeted:
            raise LrsError(f"--save-module {name} names {sorted(found & targeted)[0]}, a module the LoRA targets "
                           f"(leave it out of --targets to keep it whole)")
        kept |= found
    return kept


def _tied_groups(base: Checkpoint, saved: dict[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """The groups of tied weights (saved one first) in which the adapter holds one tensor whole."""
    found = layout(base.config)
    groups = found.tied if found is not None else ()
    return [(name, *(n for n in group if n != name)) for group in groups for name in group if name in saved]


def other_changes(ft: Checkpoint, bs: Checkpoint, chosen: Sequence[Target], keeps: Callable[[str], bool]
                  ) -> tuple[list[Change], dict[str, Tensor]]:
    """Every floating-point tensor outside the targeted weights that differs between the checkpoints, and the
    fine-tuned value of those in a module that `keeps` (read here once, for modules_to_save)."""
    targeted = {t.source for t in chosen}
    changes, fine_tuned = [], {}
    for name, info in bs.tensors.items():
        if name in targeted or not info.dtype.is_floating_point or ft.same_stored(bs, name):
            continue
        before, after = bs.get_finite(name).float(), ft.get_finite(name)
        diff = after.float() - before
        if diff.any():
            squared = squared_norm(diff)
            scale = math.sqrt(squared_norm(before))
            changes.append(Change(name, squared, math.sqrt(squared) / scale if scale else math.inf))
            if keeps(changes[-1].module):
                fine_tuned[name] = after
    return changes, fine_tuned


def _dropped_warning(dropped: Sequence[Change]) -> str:
    worst = max(dropped, key=lambda c: c.relative)
    names = ", ".join(c.name for c in dropped[:3]) + (", …" if len(dropped) > 3 else "")
    return (f"{len(dropped)} changed tensor(s) that are not targeted linear weights are not in the LoRA ({names}; "
            f"largest relative change {worst.relative:.3g} in {worst.name}): pass --save-changed, or "
            f"--save-module NAME, to keep them whole")


def _total_energy(rows: Sequence[dict[str, Any]], changes: Sequence[Change], dropped: Sequence[Change]) -> float:
    """The share of the whole change Σ‖ΔT‖² (every tensor) that the adapter reproduces."""
    total = sum(row["squared"] for row in rows) + sum(c.squared for c in changes)
    lost = sum((1.0 - row["energy"]) * row["squared"] for row in rows) + sum(c.squared for c in dropped)
    return 1.0 - lost / total if total else 1.0


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


def _extract(ft: Checkpoint, bs: Checkpoint, chosen: list[Target], rule: RankRule, distribute_scale: bool,
             algorithm: str, niter: int, device: str) -> tuple[dict[str, dict[str, Tensor]], list[dict[str, Any]]]:
    """Batch by batch of the fine-tuned model's targets: differences, batched SVDs, each module's rank, its factors
    and their energy."""
    batches = in_batches(ft, chosen)
    weights, rows = {}, []
    for batch in progress(batches, "extract", total=len(batches), unit="batch"):
        diffs = [(t, load_weight(ft, t) - load_weight(bs, t)) for t in batch]
        diffs = [(t, d) for t, d in diffs if d.any()]
        for (t, d), (u, s, vh) in zip(diffs, _svds([d for _, d in diffs], rule, algorithm, niter, device)):
            squared = squared_norm(d)
            r, capped = rule.choose(s, squared, min(d.shape))
            b, a = split_factors(u[:, :r], s[:r], vh[:r], distribute_scale)
            weights[t.path] = {"lora_A.weight": a, "lora_B.weight": b}
            energy = min(1.0, float(s[:r].double().square().sum()) / squared)
            rows.append({"module": t.path, "shape": f"{t.out_features}x{t.in_features}", "rank": r, "energy": energy,
                         "error": math.sqrt(1.0 - energy), "squared": squared, "capped": capped})
    return weights, rows


def _svds(diffs: list[Tensor], rule: RankRule, algorithm: str, niter: int, device: str
          ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Each difference's leading singular triplets, as many as the rule needs; one batched call per count."""
    counts = [rule.svd_rank(*d.shape) for d in diffs]
    svds: list[tuple[Tensor, Tensor, Tensor]] = [None] * len(diffs)  # type: ignore[list-item]
    for count in dict.fromkeys(counts):
        picked = [k for k, c in enumerate(counts) if c == count]
        found = truncated_svd([diffs[k] for k in picked], count, algorithm=algorithm, niter=niter, device=device)
        for k, svd in zip(picked, found):
            svds[k] = svd
    return svds


def _set_ranks(config: AdapterConfig, ranks: dict[str, int], modules: Sequence[str]) -> None:
    """r (and α) from the most common rank (the larger on a tie); the other modules go to PEFT's rank_pattern,
    keyed so as to match that one of the targeted `modules`, with α = rank in alpha_pattern: s = α/r = 1 everywhere."""
    counts = Counter(ranks.values())
    config.r = max(counts, key=lambda r: (counts[r], r))
    config.alpha = float(config.r)
    config.rank_pattern = {pattern_key(path, modules): r for path, r in ranks.items() if r != config.r}
    config.alpha_pattern = {key: float(r) for key, r in config.rank_pattern.items()}
