"""The adapter directory: adapter_config.json + adapter_model.safetensors, laid out like PEFT, and the Adapter
in memory (its config, its tensors and the method bound to them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cards import adapter_card
from .checkpoint import atomic_output, load_tensors, model_name, read_header, read_json_object, save_tensors
from .config import BLOCK_KEY, KEY_PREFIX, LRS_FIELDS, AdapterConfig, check_config_json, check_fields
from .errors import LrsError
from .methods import Method, get_method, method_from_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class Adapter:
    """An adapter in memory: its config and, per module path, its named tensors."""

    config: AdapterConfig
    weights: dict[str, dict[str, torch.Tensor]]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # whole tensors of modules_to_save, by checkpoint name
    method: Method = field(init=False, repr=False, compare=False)  # bound once to this config

    def __post_init__(self) -> None:
        self.method = get_method(self.config)

    @property
    def modules(self) -> list[str]:
        return list(self.weights)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Every stored number (whole modules_to_save tensors included), or those that train."""
        frozen = self.method.frozen if trainable_only else set()
        whole = 0 if trainable_only else sum(t.numel() for t in self.saved.values())
        return whole + sum(t.numel() for params in self.weights.values() for n, t in params.items() if n not in frozen)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-layout keys: base_model.model.<module path>.<param>, and base_model.model.<tensor> for the whole
        tensors of modules_to_save (as PEFT's get_peft_model_state_dict saves them)."""
        low_rank = {f"{KEY_PREFIX}{path}.{name}": t.contiguous() for path, params in self.weights.items()
                    for name, t in params.items()}
        return low_rank | {f"{KEY_PREFIX}{name}": t.contiguous() for name, t in self.saved.items()}


def default_adapter_out(base: str | os.PathLike, method: str, rank: int) -> Path:
    """OUT when none is given, in the current directory, named after the base model as `git clone` names its
    directory: <model>-<method>-r<rank> (SmolLM2-135M-Instruct-cola-r8)."""
    return Path(f"{model_name(base)}-{method}-r{rank}")


def save_adapter(adapter: Adapter, out: str | os.PathLike | None = None, force: bool = False,
                 card: str | None = None) -> Path:
    """Write the adapter directory atomically (temporary sibling, renamed into place) and return its path;
    OUT defaults to `default_adapter_out` of the adapter's base model, method and rank."""
    out = _adapter_out(adapter.config) if out is None else Path(out)
    with atomic_output(out, force) as tmp:
        write_adapter_files(adapter, tmp, card)
    return out


def _adapter_out(config: AdapterConfig) -> Path:
    if config.base_model is None:
        raise LrsError("the adapter names no base model to name its directory after; give an output path")
    return default_adapter_out(config.base_model, config.method, config.r)


def write_adapter_files(adapter: Adapter, directory: Path, card: str | None = None,
                        config: dict[str, Any] | None = None) -> None:
    """Write config (the method's own unless given), weights and model card into an existing directory."""
    config = dict(adapter.method.to_json() if config is None else config)
    block = config.pop(BLOCK_KEY, None)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str) + "\n")
    metadata = None if block is None else {BLOCK_KEY: json.dumps(block, default=str)}
    save_tensors(adapter.state_dict(), directory / WEIGHTS_NAME, metadata)
    if card is None:
        card = adapter_card(adapter)
    (directory / "README.md").write_text(card)


def read_config(path: Path) -> dict:
    """adapter_config.json with the `lrs` block: the config's own (adapters before 0.2), else the weights' metadata."""
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise LrsError(f"{path}: not an adapter directory (no {CONFIG_NAME})")
    config = read_json_object(config_path)
    weights_path = path / WEIGHTS_NAME
    if BLOCK_KEY not in config and weights_path.is_file():
        block = read_header(weights_path)[1].get(BLOCK_KEY)
        if block is not None:
            config[BLOCK_KEY] = _parse_block(block, weights_path)
    return config


def _parse_block(text: str, where: Path) -> dict[str, Any]:
    try:
        block = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LrsError(f"{where}: the {BLOCK_KEY!r} metadata is not JSON ({exc})") from None
    try:
        if not isinstance(block, dict):
            raise LrsError(f"the {BLOCK_KEY!r} metadata must be a JSON object, got {text[:80]}")
        check_fields(block, LRS_FIELDS, f"{BLOCK_KEY}.")
    except LrsError as exc:
        raise LrsError(f"{where}: {exc}") from None
    return block


def load_adapter(path: str | os.PathLike, cola_strategy: str | None = None) -> Adapter:
    """Read an adapter directory written by lrs, PEFT (LoRA, MiSS, Bone) or the original CoLA code
    (`cola_strategy`: the strategy it was trained with, which that code's config does not record)."""
    path = Path(path)
    if not path.exists():
        raise LrsError(f"no such file or directory: {path}")
    config = read_config(path)
    try:
        check_config_json(config)
    except LrsError as exc:
        raise LrsError(f"{path / CONFIG_NAME}: {exc}") from None
    method = method_from_json(config, cola_strategy)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise LrsError(f"{path} holds a pickled adapter_model.bin; convert it to safetensors first")
        raise LrsError(f"{path}: no {WEIGHTS_NAME}")
    saved, low_rank = split_saved(load_tensors(weights_path), method.config.modules_to_save)
    adapter = Adapter(method.config, method.split_keys(low_rank), saved)
    method.check_weights(adapter.weights)
    return adapter


def split_saved(tensors: dict[str, torch.Tensor], modules: list[str]
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(whole tensors of modules_to_save by checkpoint name, the other keys): a module matches an entry as PEFT
    matches them, by its path ending in it."""
    saved, rest = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(KEY_PREFIX)
        module = name.rpartition(".")[0]
        if any(module == m or module.endswith("." + m) for m in modules):
            saved[name] = tensor
        else:
            rest[key] = tensor
    return saved, rest

