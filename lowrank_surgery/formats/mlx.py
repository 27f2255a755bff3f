"""mlx-lm LoRA adapters, as mlx-lm's tuner reads them.

OUT/adapters.safetensors with `<path>.lora_a` (in × r) and `.lora_b` (r × out), and an adapter_config.json with
fine_tune_type, num_layers, lora_parameters {rank, scale, dropout, keys}: LoRALinear computes
y += scale·(x·lora_a)·lora_b with `scale` a plain multiplier (mlx-lm's default 20.0), not α/r; linear_to_lora_layers
wraps `keys` (paths relative to a layer) in the last `num_layers` layers (-1: all). mlx-lm has one rank and one scale
per adapter: smaller ranks are zero-padded and other scales folded into lora_b (exact). Paths are the checkpoint's,
which are mlx-lm's for Llama-style models (model.layers.N...); architectures that mlx-lm renames (e.g. GPT-2's
transformer.h.N) would need their paths mapped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ..adapter import CONFIG_NAME, Adapter, read_config
from ..checkpoint import Checkpoint, load_tensors, save_tensors
from ..config import CONFIG_FIELDS, NUMBER, POSITIVE_INT, check_fields
from ..errors import LrsError
from .common import KEY_SUFFIXES, Pairs, by_module, key_layout, linear_pair, lora_adapter, plain_config

WEIGHTS = "adapters.safetensors"
LORA_A, LORA_B = KEY_SUFFIXES["mlx"]
FIELDS = {"scale": NUMBER, "rank": POSITIVE_INT, "dropout": CONFIG_FIELDS["lora_dropout"]}


def read_mlx(directory: Path, base: Checkpoint | None = None) -> Adapter:
    """An mlx-lm LoRA adapter directory: ΔW = scale·lora_bᵀ·lora_aᵀ."""
    config = read_config(directory)
    kind = config.get("fine_tune_type", "dora" if config.get("use_dora") else "lora")  # older mlx-lm: use_dora
    if kind != "lora":
        raise LrsError(f"{directory}: mlx-lm fine_tune_type {kind!r} is not a LoRA (only 'lora' converts)")
    params = config.get("lora_parameters") or {}
    if not isinstance(params, dict) or "scale" not in params:
        raise LrsError(f"{directory}/{CONFIG_NAME}: lora_parameters has no scale")
    try:
        check_fields(params, FIELDS, "lora_parameters.")
    except LrsError as exc:
        raise LrsError(f"{directory / CONFIG_NAME}: {exc}") from None
    file = directory / WEIGHTS
    if not file.is_file():
        raise LrsError(f"{directory}: no {WEIGHTS}")
    tensors = load_tensors(file)
    key_layout(tensors, file, "mlx")
    pairs: Pairs = {}
    for path, parts in by_module(tensors, KEY_SUFFIXES["mlx"]).items():
        if set(parts) != {LORA_A, LORA_B}:
            raise LrsError(f"{file}: module {path} lacks {({LORA_A, LORA_B} - set(parts)).pop().lstrip('.')}")
        lora_a, lora_b = linear_pair(file, path, parts[LORA_A], parts[LORA_B])  # in × r, r × out
        pairs[path] = (lora_b.T, lora_a.T, float(params["scale"]))  # mlx-lm's scale multiplies as is (not α/r)
    return lora_adapter(pairs, plain_config(base, dropout=float(params.get("dropout") or 0.0),
                                            base_model=config.get("model")))


def write_mlx(adapter: Adapter, directory: Path, num_hidden_layers: int | None = None) -> None:
    """OUT/adapters.safetensors + adapter_config.json as mlx-lm's load_adapters reads them."""
    c = adapter.config
    rank = max(params["lora_A.weight"].shape[0] for params in adapter.weights.values())
    scale = Counter(c.scale(p) for p in adapter.weights).most_common(1)[0][0]
    tensors = {}
    for path, params in adapter.weights.items():
        a, b = params["lora_A.weight"], params["lora_B.weight"] * (c.scale(path) / scale)
        pad = rank - a.shape[0]  # zero rows/columns leave ΔW unchanged
        tensors[f"{path}{LORA_A}"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).T.contiguous()
        tensors[f"{path}{LORA_B}"] = torch.nn.functional.pad(b, (0, pad)).T.contiguous()
    save_tensors(tensors, directory / WEIGHTS)
    layers = [_layer_key(p) for p in adapter.weights]
    first = min((i for i, _ in layers if i is not None), default=None)
    num_layers = -1 if first is None or num_hidden_layers is None else num_hidden_layers - first
    config = {"fine_tune_type": "lora", "model": c.base_model, "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": c.dropout,
                                  "keys": sorted({key for _, key in layers})},
              "lrs": c.lrs_block()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _layer_key(path: str) -> tuple[int | None, str]:
    """model.layers.3.self_attn.q_proj -> (3, 'self_attn.q_proj'): mlx-lm's keys are relative to a layer."""
    m = re.match(r"^.*?\.(\d+)\.(.+)$", path)
    return (int(m.group(1)), m.group(2)) if m else (None, path)
