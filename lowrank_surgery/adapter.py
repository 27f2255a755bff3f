"""The adapter directory: adapter_config.json + adapter_model.safetensors, laid out like PEFT."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import atomic_output, load_tensors, model_name, read_header, read_json_object, save_tensors
from .errors import LrsError

if TYPE_CHECKING:
    from .methods.base import Method

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# The `lrs` block (method, options, provenance) lives in the weights file's safetensors metadata under this key, as JSON:
# PEFT warns on every config key it does not know, and the original CoLA code (PEFT 0.12) refuses them.
# Adapters written before 0.2 carry it in adapter_config.json, where it is still read.
BLOCK_KEY = "lrs"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowrank-surgery")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class AdapterConfig:
    """Everything about an adapter but its tensors. `options` holds the method's own settings."""

    method: str
    r: int
    alpha: float
    target_modules: list[str]
    dropout: float = 0.0
    rslora: bool = False
    fan_in_fan_out: bool | None = False  # W stored transposed (Conv1D); None: the adapter does not say
    options: dict[str, Any] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)  # PEFT's: modules the adapter holds whole

    def rank(self, path: str) -> int:
        return _lookup(self.rank_pattern, path, self.r)

    def scale(self, path: str) -> float:
        """s = α/r, or α/√r with rsLoRA, honouring PEFT's per-module rank and alpha patterns."""
        r, alpha = self.rank(path), _lookup(self.alpha_pattern, path, self.alpha)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def lrs_block(self) -> dict[str, Any]:
        """The `lrs` block (see BLOCK_KEY): method, its options and where the adapter came from."""
        return {"method": self.method, "r": self.r, "alpha": self.alpha, **self.options,
                **self.provenance, "version": package_version()}


def _lookup(pattern: dict, path: str, default):
    """The value of the first key that matches the module path (PEFT's order), else the default."""
    for key, value in pattern.items():
        if pattern_matches(key, path):
            return value
    return default


def pattern_matches(key: str, path: str) -> bool:
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching the module path or a dotted suffix of it."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


def pattern_key(path: str, modules: Iterable[str]) -> str:
    """The module path as a pattern key that matches that module only: the path itself, or, where it would also
    match another of `modules` (one ending in `.<path>`), the path escaped and anchored at the start."""
    if all(m == path or not pattern_matches(path, m) for m in modules):
        return path
    return "^" + re.escape(path)


@dataclass
class Adapter:
    """An adapter in memory: its config and, per module path, its named tensors."""

    config: AdapterConfig
    weights: dict[str, dict[str, torch.Tensor]]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # whole tensors of modules_to_save, by checkpoint name

    @property
    def method(self) -> Method:
        from .methods import get_method

        return get_method(self.config)

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
        from .cards import adapter_card

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
    from .methods import method_from_json

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


def _positive_int(value: Any) -> bool:
    return type(value) is int and value >= 1  # not bool, not 4.9 (which int() would silently make 4)


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _fraction(value: Any) -> bool:
    return value is None or (_number(value) and 0 <= value < 1)


def _flag(value: Any) -> bool:
    return value is None or type(value) is bool


def _names(value: Any) -> bool:
    return value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _pattern(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or (isinstance(value, dict) and all(check(v) for v in value.values()))


def _block(value: Any) -> bool:
    return value is None or isinstance(value, dict)


Field = tuple[Callable[[Any], bool], str]
POSITIVE_INT: Field = (_positive_int, "a positive integer")
NUMBER: Field = (_number, "a finite number")
CONFIG_FIELDS: dict[str, Field] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"), "r": POSITIVE_INT, "lora_alpha": NUMBER,
    "lora_dropout": (_fraction, "a number in [0, 1) or null"), "miss_dropout": (_fraction, "a number in [0, 1) or null"),
    "use_rslora": (_flag, "true or false"), "fan_in_fan_out": (_flag, "true or false"),
    "target_modules": (_names, "a module name, a list of names or null"),
    "modules_to_save": (_names, "a module name, a list of names or null"),
    "rank_pattern": (_pattern(_positive_int), "an object of positive integers or null"),
    "alpha_pattern": (_pattern(_number), "an object of finite numbers or null"),
    "num_A": POSITIVE_INT, "num_B": POSITIVE_INT, "mini_r": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
    "lrs": (_block, "an object"),
}
LRS_FIELDS: dict[str, Field] = {"method": (lambda v: isinstance(v, str), "a string"), "r": POSITIVE_INT, "alpha": NUMBER,
                                "num_a": POSITIVE_INT, "num_b": POSITIVE_INT, "seed": (lambda v: type(v) is int, "an integer"),
                                "fan_in_fan_out": (lambda v: v is None or type(v) is bool, "true, false or null")}


def check_fields(data: dict[str, Any], fields: dict[str, Field], where: str = "") -> None:
    """Refuse a field of the wrong type or range, naming it (`where` is the enclosing block, e.g. 'lrs.')."""
    for key, (check, expected) in fields.items():
        if key in data and not check(data[key]):
            raise LrsError(f"{where}{key} must be {expected}, got {json.dumps(data[key])}")


def check_config_json(data: dict[str, Any]) -> None:
    """The one check of adapter_config.json contents, before any method reads them: types, ranges, regexes."""
    check_fields(data, CONFIG_FIELDS)
    check_fields(data.get("lrs") or {}, LRS_FIELDS, "lrs.")
    for name in ("rank_pattern", "alpha_pattern"):
        for key in data.get(name) or {}:
            try:
                re.compile(key)
            except re.error as exc:
                raise LrsError(f"{name} key {key!r} is not a regular expression ({exc})") from None


def split_key(key: str, param_names: tuple[str, ...]) -> tuple[str, str] | None:
    """'base_model.model.x.q_proj.lora_A.weight' -> ('x.q_proj', 'lora_A.weight'), or None."""
    body = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    for name in param_names:
        if body.endswith("." + name):
            return body[: -len(name) - 1], name
    return None
