"""CoRA common subspaces: stream target weights from one or more checkpoints into one orthonormal basis per name.

A name is a module path (scope `layer`: that module's weight across the models) or a module type (scope `model`:
every layer of every model). The basis is U_r of M = [W_1 | W_2 | …] (out × Σin, nn.Linear layout). Weights are
read one at a time, in file order, with the next one read in the background; a name is solved as soon as its
last weight is in, so scope `layer` never holds more than one name's matrices (and their float32 Gram).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .checkpoint import (Checkpoint, atomic_output, check_finite, check_output, load_tensors, model_name,
                         read_json_object, resolve_model, save_tensors)
from .config import package_version
from .device import resolve_device
from .errors import LrsError
from .progress import progress
from .svd import ALGORITHMS, GramAccumulator, common_basis
from .targets import Target, kinds, linear_float32, select_targets

FORMAT, VERSION = "lrs-subspace", 1
BASES_NAME, INFO_NAME = "subspace.safetensors", "subspace.json"
SCOPES = ("layer", "model")
DEFAULT_TARGETS = "q_proj,k_proj,v_proj"
# Pretrained attention weights have flat spectra: with Halko's usual 4 power iterations and 8 extra columns the
# randomized basis misses ~1.5% of the energy on SmolLM2 at r=64; 8 iterations and r/2 extra columns get
# within 3e-4 (benchmarks/bench_subspace.py).
DEFAULT_NITER = 8


def oversample(rank: int) -> int:
    """Extra columns of the randomized range finder."""
    return max(8, rank // 2)
T = TypeVar("T")


@dataclass
class Group:
    """One basis to compute: its name and the (model index, module) pairs whose weights it combines."""

    name: str
    members: list[tuple[int, Target]] = field(default_factory=list)

    @property
    def out_features(self) -> int:
        return self.members[0][1].out_features

    @property
    def columns(self) -> int:
        return sum(t.in_features for _, t in self.members)


MOST_NAMED = 3  # models named in a default output directory; more are counted


def default_subspace_out(models: Sequence[str | os.PathLike], rank: int) -> Path:
    """OUT when none is given, in the current directory, named after the models as `git clone` names its directory:
    <model>-subspace-r<rank>, several models joined by '+' (a+b-subspace-r64), beyond three counted (a+3-more-...)."""
    names = [model_name(m) for m in models]
    joined = "+".join(names) if len(names) <= MOST_NAMED else f"{names[0]}+{len(names) - 1}-more"
    return Path(f"{joined}-subspace-r{rank}")


def extract_subspace(models: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, rank: int = 64,
                     targets: str | Sequence[str] = DEFAULT_TARGETS, scope: str = "layer", algorithm: str = "gram",
                     niter: int = DEFAULT_NITER, device: str = "auto", revision: str | None = None,
                     force: bool = False, allow_pickle: bool = False) -> dict[str, Any]:
    """Write OUT/subspace.safetensors (`<name>.basis`, `<name>.singular_values`) and subspace.json; return the latter.
    OUT defaults to `default_subspace_out(models, rank)`."""
    _check_options(models, rank, scope, algorithm, niter)
    out = default_subspace_out(models, rank) if out is None else Path(out)
    check_output(out, force, inputs=models)
    dev = resolve_device(device)
    ckpts = [Checkpoint(m, revision, allow_pickle) for m in models]
    chosen = _common_targets(ckpts, targets)
    groups = _groups(chosen, len(ckpts), scope)
    _check_rank(groups, rank)
    start = time.perf_counter()
    results = _solve(ckpts, chosen, groups, rank, algorithm, niter, dev)
    tensors = {f"{name}.{key}": t for name, (u, s, _) in results.items() for key, t in (("basis", u), ("singular_values", s))}
    info = {
        "format": FORMAT, "version": VERSION,
        "models": [{"id": c.source.id, "revision": c.source.revision, "hash": c.fingerprint(),
                    "model_type": c.config.get("model_type")} for c in ckpts],
        "rank": rank, "scope": scope, "algorithm": algorithm,
        "parameters": {"niter": niter, "oversample": oversample(rank)} if algorithm == "randomized" else {},
        "device": dev.type, "targets": kinds(chosen),
        "energy": {name: round(e, 8) for name, (_, _, e) in results.items()},
        "shapes": {g.name: [g.out_features, g.columns] for g in groups},
        "wall_time_s": round(time.perf_counter() - start, 3), "created_by": f"lowrank-surgery {package_version()}",
    }
    with atomic_output(out, force) as tmp:
        save_tensors(tensors, tmp / BASES_NAME, {"format": FORMAT})
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        from .cards import subspace_card

        (tmp / "README.md").write_text(subspace_card(info))
    return info


def _check_options(models: Sequence, rank: int, scope: str, algorithm: str, niter: int) -> None:
    if not models:
        raise LrsError("extract-subspace needs at least one model")
    if scope not in SCOPES:
        raise LrsError(f"unknown --scope {scope!r} (known: {', '.join(SCOPES)})")
    if algorithm not in ALGORITHMS:
        raise LrsError(f"unknown --algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")
    if rank < 1:
        raise LrsError(f"--rank must be at least 1, got {rank}")
    if niter < 0:
        raise LrsError(f"--niter must be at least 0, got {niter}")


def _common_targets(ckpts: Sequence[Checkpoint], spec: str | Sequence[str]) -> list[Target]:
    """The targets of the first model, after checking every other model has the same architecture and modules."""
    first = ckpts[0]
    chosen = select_targets(first, spec)
    for other in ckpts[1:]:
        mismatch = _mismatch(first, chosen, other, select_targets(other, spec))
        if mismatch:
            raise LrsError(f"models do not share the architecture: {mismatch}")
    return chosen


def _mismatch(a: Checkpoint, mine: list[Target], b: Checkpoint, theirs: list[Target]) -> str | None:
    """The first difference between two models' targets (or model types), in words; None when they match."""
    type_a, type_b = a.config.get("model_type"), b.config.get("model_type")
    if type_a != type_b:
        return f"{a.source.id} is {type_a!r} but {b.source.id} is {type_b!r}"
    shapes = {t.path: t.shape for t in theirs}
    for t in mine:
        if t.path not in shapes:
            return f"{b.source.id} has no module {t.path}"
        if shapes.pop(t.path) != t.shape:
            return f"{t.path} is {_dims(t.shape)} in {a.source.id} but {_dims(_shape(theirs, t.path))} in {b.source.id}"
    return f"{b.source.id} has module {next(iter(shapes))}, which {a.source.id} lacks" if shapes else None


def _shape(targets: Iterable[Target], path: str) -> tuple[int, int]:
    return next(t.shape for t in targets if t.path == path)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def group_name(target: Target, scope: str) -> str:
    """The subspace entry a module uses: its path (scope layer) or its module type (scope model)."""
    return target.path if scope == "layer" else target.kind


def _groups(chosen: Sequence[Target], n_models: int, scope: str) -> list[Group]:
    groups: dict[str, Group] = {}
    for t in chosen:
        group = groups.setdefault(group_name(t, scope), Group(group_name(t, scope)))
        if group.members and t.out_features != group.out_features:
            raise LrsError(f"scope model cannot combine {group.members[0][1].path} ({_dims(group.members[0][1].shape)}) "
                           f"with {t.path} ({_dims(t.shape)}): their output sizes differ; use --scope layer")
        group.members += [(k, t) for k in range(n_models)]
    return list(groups.values())


def _check_rank(groups: Sequence[Group], rank: int) -> None:
    for g in groups:
        limit = min(g.out_features, g.columns)
        if rank > limit:
            t = g.members[0][1]
            raise LrsError(f"--rank {rank} is larger than {t.path} allows (shape {_dims(t.shape)}"
                           f"{'' if g.columns == t.in_features else f', {g.columns} columns combined'}: at most {limit})")


def _solve(ckpts: Sequence[Checkpoint], chosen: Sequence[Target], groups: Sequence[Group], rank: int, algorithm: str,
           niter: int, dev: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(U_r, S_r, energy) per group name, reading each weight once in file order of the first model (scope model's
    gram bases read their weights twice more, for the refinement, rather than hold a model's worth)."""
    order = {t.path: k for k, t in enumerate(chosen)}
    owner = {(m, t.path): g for g in groups for m, t in g.members}
    reads = sorted(owner, key=lambda key: (order[key[1]], key[0]))
    targets = {t.path: t for t in chosen}

    def reload(group: Group) -> Callable[[], Iterator[torch.Tensor]] | None:
        """None for a layer's few weights (kept); for a whole model's, a reader of them."""
        if len(group.members) <= len(ckpts):
            return None
        return lambda: (linear_float32(ckpts[m].get(t.source), t) for m, t in group.members)

    pending = {g.name: _Collector(algorithm, dev, reload(g)) for g in groups}
    left = {g.name: len(g.members) for g in groups}
    results = {}
    # the reading thread only reads: a torch op there would fight the SVD for the OpenMP threads (3x slower)
    stored = read_ahead(reads, lambda key: ckpts[key[0]].get(targets[key[1]].source))
    for key, w in progress(zip(reads, stored), "extract-subspace", total=len(reads), unit="matrix"):
        name = owner[key].name
        check_finite(w, targets[key[1]].source, ckpts[key[0]].source.id)  # here: the reading thread only reads
        pending[name].add(linear_float32(w, targets[key[1]]))
        left[name] -= 1
        if not left[name]:
            results[name] = pending.pop(name).result(rank, niter, dev)
    return {g.name: results[g.name] for g in groups}


class _Collector:
    """A name's weights so far: a Gram for `gram` (and the weights, unless `reload` reads them again), else the
    weights themselves."""

    def __init__(self, algorithm: str, dev: torch.device, reload: Callable[[], Iterator[torch.Tensor]] | None):
        self.algorithm = algorithm
        self.gram = GramAccumulator(dev) if algorithm == "gram" else None
        self.reload = reload
        self.blocks: list[torch.Tensor] = []

    def add(self, w: torch.Tensor) -> None:
        if self.gram is not None:
            self.gram.add(w)
        if self.gram is None or self.reload is None:
            self.blocks.append(w)

    def result(self, rank: int, niter: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        if self.gram is not None:
            return self.gram.result(rank, self.reload or (lambda: self.blocks), oversample(rank))
        return common_basis(self.blocks, rank, self.algorithm, niter, oversample(rank), dev)


def read_ahead(items: Sequence[T], load: Callable[[T], Any]) -> Iterator[Any]:
    """load(item) for each item in order, the next one loading in a background thread (file reads release the GIL)."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(load, items[0]) if items else None
        for k in range(len(items)):
            value = future.result()
            future = pool.submit(load, items[k + 1]) if k + 1 < len(items) else None
            yield value


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Subspace:
    """A subspace directory in memory: its info (subspace.json), bases and where it came from."""

    info: dict[str, Any]
    bases: dict[str, torch.Tensor]
    id: str
    revision: str | None
    hash: str

    @property
    def scope(self) -> str:
        return self.info["scope"]

    def basis(self, target: Target) -> torch.Tensor:
        """The basis (out × rank, float32) for a base module; an error names the module if absent or misshapen."""
        name = group_name(target, self.scope)
        if name not in self.bases:
            raise LrsError(f"subspace {self.id} has no basis for {target.path} (scope {self.scope}, "
                           f"looked for {name!r}; it has {', '.join(list(self.bases)[:4])}{', …' if len(self.bases) > 4 else ''})")
        u = self.bases[name]
        if u.shape[1] < self.info["rank"]:
            raise LrsError(f"subspace {self.id} is corrupt: basis {name} has {u.shape[1]} columns but its "
                           f"{INFO_NAME} says rank {self.info['rank']}")
        if u.shape[0] != target.out_features:
            raise LrsError(f"subspace {self.id} does not fit the base: basis {name} has {u.shape[0]} rows but "
                           f"{target.path} has {target.out_features} output features ({_dims(target.shape)})")
        return u


def load_subspace(path: str | os.PathLike, revision: str | None = None) -> Subspace:
    """Read a subspace directory (local or a Hub repo id)."""
    source = resolve_model(path, revision)
    info = read_subspace_info(source.path, source.id)
    _check_fields(info, source.path / INFO_NAME)
    bases_path = source.path / BASES_NAME
    bases = {k[: -len(".basis")]: check_finite(t, k, source.id).float()
             for k, t in load_tensors(bases_path).items() if k.endswith(".basis")}
    return Subspace(info, bases, source.id, source.revision, _file_hash(bases_path))


def read_subspace_info(directory: Path, name: str | None = None) -> dict[str, Any]:
    """The checked subspace.json of a subspace directory (`name`: how to call it in errors)."""
    info_path, bases_path = directory / INFO_NAME, directory / BASES_NAME
    if not info_path.is_file() or not bases_path.is_file():
        raise LrsError(f"{name or directory}: not a subspace directory (needs {INFO_NAME} and {BASES_NAME})")
    info = read_json_object(info_path)
    if info.get("format") != FORMAT or info.get("scope") not in SCOPES:
        raise LrsError(f"{info_path}: not an {FORMAT} file")
    return info


def _check_fields(info: dict[str, Any], info_path: Path) -> None:
    """The fields CoRA computes with (inspect and push only show the others)."""
    rank, targets = info.get("rank"), info.get("targets")
    if type(rank) is not int or rank < 1:
        raise LrsError(f"{info_path}: 'rank' must be a positive integer, got {rank!r}")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise LrsError(f"{info_path}: 'targets' must be a non-empty list of module names, got {targets!r}")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def summary_rows(info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per name of a subspace.json: name, shape of M, rank, captured energy."""
    shapes = info.get("shapes", {})
    return [{"name": name, "shape": _dims(shapes.get(name, [])), "rank": info.get("rank"), "energy": f"{energy:.4f}"}
            for name, energy in info.get("energy", {}).items()]
