"""What transformers knows about a checkpoint's architecture: its linear modules, as PEFT sees them.

The class named in config.json (`architectures`) is built on the meta device (no memory, no weights),
which gives what names and shapes alone cannot: which 2-D tensors belong to an nn.Linear or a
transformers Conv1D (not to an embedding such as T5's `shared` or `relative_attention_bias`), the output
layer (`get_output_embeddings()`, which PEFT's `all-linear` leaves out), the checkpoint tensor a module's
weight is stored under (transformers v5 renames some on load, e.g. GPT-NeoX's `embed_out` -> `lm_head`),
and the tensor a tied weight shares. `layout` is None when transformers cannot build the class (no
config, remote code, an architecture this transformers does not know): callers then guess from names.

Building the class imports its transformers module (2-4 s for most models), so a layout is kept on disk under
$LRS_CACHE (default ~/.cache/lowrank-surgery), keyed by the config, the transformers version and this file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Linear:
    """One linear module of the architecture."""

    path: str  # module path in the model
    conv1d: bool  # transformers' Conv1D, which stores W transposed
    names: tuple[str, ...]  # checkpoint tensors that may hold W: its own name first, then the tensors it is tied to
    output: bool  # the model's output layer


@dataclass(frozen=True)
class Layout:
    linears: tuple[Linear, ...]
    prefix: str  # the base model's attribute (base_model_prefix), which some checkpoints leave out
    tied: tuple[tuple[str, ...], ...] = ()  # checkpoint names of the parameters that share one tensor, per tensor

    def without_prefix(self) -> Layout:
        """The layout of the base model alone, as in a checkpoint saved without the `prefix.` of its head class."""
        strip = lambda name: name[len(self.prefix) + 1:]  # noqa: E731
        inside = lambda name: name.startswith(self.prefix + ".")  # noqa: E731
        linears = tuple(Linear(strip(lin.path), lin.conv1d, tuple(strip(n) for n in lin.names if inside(n)), lin.output)
                        for lin in self.linears if inside(lin.path))
        return Layout(linears, "", tuple(tuple(strip(n) for n in group if inside(n)) for group in self.tied))


def layout(config: dict) -> Layout | None:
    """The linear modules of the architecture a config.json describes, or None when transformers cannot build it."""
    if not config.get("architectures") or "auto_map" in config:  # no class named, or remote code (never run here)
        return None
    return _cached_layout(json.dumps(config, sort_keys=True))


def untied_copies(config: dict, stored: Collection[str]) -> dict[str, str]:
    """What a checkpoint must hold once its config sets tie_word_embeddings to false: tensor name -> the stored
    tensor it copies. Untying may separate more than the output layer (BART's encoder and decoder embed_tokens,
    BERT's decoder bias), which transformers would otherwise initialise at random. Empty when transformers cannot
    build the architecture."""
    before, after = layout(config), layout({**config, "tie_word_embeddings": False})
    if before is None or after is None:
        return {}
    still = {name for group in after.tied if any(n in stored for n in group) for name in group}
    copies = {}
    for group in before.tied:
        source = next((n for n in group if n in stored), None)
        copies.update({name: source for name in group if source and name not in stored and name not in still})
    return copies


@functools.lru_cache(maxsize=16)
def _cached_layout(config_json: str) -> Layout | None:
    path = _cache_dir() / f"{_cache_key(config_json)}.json"
    try:
        return _from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):  # not cached yet, or unreadable: build it again
        pass
    found = _built_layout(config_json)
    _store(path, {"layout": None if found is None else _to_json(found)})
    return found


def _cache_dir() -> Path:
    root = os.environ.get("LRS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                "lowrank-surgery")
    return Path(root) / "layouts"


def _cache_key(config_json: str) -> str:
    """The config, the transformers that builds it and the code that reads it: a change to any is another key."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        version = "none"
    parts = (config_json, version, Path(__file__).read_text())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _to_json(found: Layout) -> dict[str, Any]:
    return {"linears": [[lin.path, lin.conv1d, list(lin.names), lin.output] for lin in found.linears],
            "prefix": found.prefix, "tied": [list(group) for group in found.tied]}


def _from_json(data: dict[str, Any]) -> Layout | None:
    found = data["layout"]
    if found is None:
        return None
    linears = tuple(Linear(str(path), bool(conv1d), tuple(map(str, names)), bool(output))
                    for path, conv1d, names, output in found["linears"])
    return Layout(linears, str(found["prefix"]), tuple(tuple(map(str, group)) for group in found["tied"]))


def _store(path: Path, data: dict[str, Any]) -> None:
    """Write atomically; a cache that cannot be written (read-only home) only costs the next run the build."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _built_layout(config_json: str) -> Layout | None:
    model = _skeleton(json.loads(config_json))
    if model is None:
        return None
    params = dict(model.named_parameters(remove_duplicate=False))
    by_tensor: dict[int, list[str]] = {}
    for name, p in params.items():
        by_tensor.setdefault(id(p), []).append(name)
    groups = {name: group for group in by_tensor.values() for name in group}
    found = [(path, module) for path, module in model.named_modules() if _is_linear(module)]
    tied = [group for group in by_tensor.values() if len(group) > 1]
    stored = _stored_names(model, {n: params[n] for group in tied for n in group} |
                           {f"{path}.weight": m.weight for path, m in found})
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = tuple(Linear(path, type(m).__name__ == "Conv1D", _names(f"{path}.weight", groups, stored), m is output)
                    for path, m in found)
    return Layout(linears, getattr(model, "base_model_prefix", "") or "",
                  tuple(tuple(stored[n] for n in group) for group in tied))


def _names(own: str, groups: dict[str, list[str]], stored: dict[str, str]) -> tuple[str, ...]:
    """The checkpoint names a weight may be stored under: its own first, then those of the parameters it is tied to."""
    return tuple(dict.fromkeys(stored[n] for n in [own, *groups[own]]))


def _is_linear(module: nn.Module) -> bool:
    """What PEFT's `all-linear` takes: nn.Linear and transformers' Conv1D (with a weight of their own)."""
    return (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and \
        isinstance(getattr(module, "weight", None), nn.Parameter)


def _skeleton(config: dict) -> nn.Module | None:
    """The model class of config.json, built on the meta device; None if transformers cannot."""
    try:
        import transformers
    except ImportError:
        return None
    cls = getattr(transformers, config["architectures"][0], None)
    if not isinstance(cls, type) or not hasattr(cls, "config_class"):
        return None
    with _quiet():
        try:
            offline = {"use_pretrained_backbone": False} if "use_pretrained_backbone" in config else {}
            model_config = cls.config_class.from_dict({**config, **offline})  # never fetch a backbone's weights
            with torch.device("meta"):
                return cls(model_config)
        except Exception:  # any config or model this transformers version cannot build: guess from names instead
            return None


def _stored_names(model: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, str]:
    """Parameter name -> the checkpoint name save_pretrained writes it under (transformers v5 renames some)."""
    same = {name: name for name in params}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoint names are parameter names
        return same
    probes = {name: p.detach() for name, p in params.items()}  # one object per name, tied ones included
    try:
        with _quiet():
            reverted = revert_weight_conversion(model, dict(probes))
    except Exception:  # a conversion that cannot run on meta tensors: keep the parameter names
        return same
    by_id = {id(t): name for name, t in reverted.items()}
    return {name: by_id.get(id(t), name) for name, t in probes.items()}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers log lines or warnings about a config only read for its shapes."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
