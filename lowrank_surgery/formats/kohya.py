"""kohya-ss LoRA files, as sd-scripts' networks/lora.py writes them.

One safetensors file (lrs writes OUT/adapter_model.safetensors) with `<prefix><path with . -> _>.lora_down.weight`
(r × in), `.lora_up.weight` (out × r) and `.alpha` (0-d), ΔW = (alpha/r)·up·down (alpha 0 or absent means
alpha = r; it may be saved as fp16/bf16/int64). kohya's prefixes name diffusion parts (`lora_unet_`, `lora_te_`,
`lora_te1_`, ...) and no LLM tool defines one, so lrs writes the text-encoder prefix `lora_te_` (an LLM is a text
model) and reads any prefix. The header metadata carries kohya's `ss_network_*` fields and `lrs_modules` (kohya
name -> module path), so that lrs reads its own files back without the base.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter import WEIGHTS_NAME, Adapter
from ..checkpoint import Checkpoint, load_tensors, read_header
from ..errors import LrsError, warn
from ..targets import linear_targets
from .common import KEY_SUFFIXES, Pairs, by_module, linear_pair, lora_adapter, plain_config

PREFIX = "lora_te_"
DOWN, UP, ALPHA = KEY_SUFFIXES["kohya"]


def read_kohya(file: Path, base: Checkpoint | None = None) -> Adapter:
    """A kohya-style LoRA file; module paths from the base's names, else from lrs's `lrs_modules` metadata."""
    groups = by_module(load_tensors(file), KEY_SUFFIXES["kohya"])
    resolve = _resolver(file, base)
    pairs: Pairs = {}
    missing_alpha = []
    for name, parts in groups.items():
        if DOWN not in parts or UP not in parts:
            raise LrsError(f"{file}: kohya module {name} lacks its {(UP if DOWN in parts else DOWN).lstrip('.')}")
        up, down = linear_pair(file, name, parts[UP], parts[DOWN])
        r = down.shape[0]
        if ALPHA not in parts:
            missing_alpha.append(name)
        alpha = _alpha(file, name, parts[ALPHA]) if ALPHA in parts else 0.0
        pairs[resolve(name)] = (up, down, (alpha or r) / r)
    if missing_alpha:
        warn(f"{len(missing_alpha)} kohya module(s) have no .alpha (e.g. {missing_alpha[0]}): using alpha = r")
    return lora_adapter(pairs, plain_config(base))


def _alpha(file: Path, name: str, alpha: torch.Tensor) -> float:
    """A module's .alpha: one finite number (a 0-d float32, fp16/bf16 from --save_precision, or int64); 0 means r."""
    value = float(alpha.reshape(-1)[0]) if alpha.numel() == 1 else math.nan
    if not math.isfinite(value):
        raise LrsError(f"{file}: kohya module {name} has .alpha {alpha.tolist()}, not one finite number")
    return value


def _resolver(file: Path, base: Checkpoint | None) -> Callable[[str], str]:
    """kohya name -> module path: the longest base module whose mangled path ends the name after a prefix."""
    if base is not None:
        table = {_mangle(t.path): t.path for t in linear_targets(base)}
        source = f"base {base.source.id}"
    else:
        table = _lrs_modules(file)
        if table is None:
            raise LrsError(f"{file}: kohya module names use '_' for '.', so lrs needs the base model (--base MODEL) "
                           "to map them back to module paths")
        source = "the file's lrs_modules metadata"

    def resolve(name: str) -> str:
        if name in table:
            return table[name]
        for i, ch in enumerate(name):
            if ch == "_" and name[i + 1:] in table:
                return table[name[i + 1:]]
        raise LrsError(f"{file}: kohya module {name} matches no linear module of {source}")

    return resolve


def _lrs_modules(file: Path) -> dict[str, str] | None:
    """The `lrs_modules` metadata lrs writes into kohya files (kohya name -> module path), or None."""
    text = read_header(file)[1].get("lrs_modules")
    if not text:
        return None
    try:
        table = json.loads(text)
    except json.JSONDecodeError:
        table = None
    if not (isinstance(table, dict) and all(isinstance(v, str) for v in table.values())):
        raise LrsError(f"{file}: metadata lrs_modules is not a JSON object of kohya names to module paths")
    return table


def _mangle(path: str) -> str:
    return path.replace(".", "_")


def write_kohya(adapter: Adapter, directory: Path, prefix: str = PREFIX) -> None:
    """OUT/adapter_model.safetensors in kohya's lora_down/lora_up/alpha layout."""
    tensors, modules = {}, {}
    c = adapter.config
    for path, params in adapter.weights.items():
        name = prefix + _mangle(path)
        modules[name] = path
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        alpha = c.scale(path) * a.shape[0]
        tensors.update({f"{name}{DOWN}": a, f"{name}{UP}": b, f"{name}{ALPHA}": torch.tensor(alpha, dtype=torch.float32)})
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(c.r),
                "ss_network_alpha": str(c.alpha), "lrs_modules": json.dumps(modules)}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", **metadata})  # the 0-d alphas need it
