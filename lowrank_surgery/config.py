"""What an adapter is, apart from its tensors: AdapterConfig, PEFT's pattern rules, the state-dict key layout and the
checks of adapter_config.json. A leaf module: every method imports it, and it imports none of them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import LrsError

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


@dataclass(frozen=True)
class Options(Mapping[str, Any]):
    """A method's own settings. Each method declares its fields (with defaults) in a subclass and checks them in
    `__post_init__`, the one place they are validated; LoRA has none. Read as attributes (options.strategy), and as
    a read-only mapping of the same names, which is how the `lrs` block stores them."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, given: Mapping[str, Any], method: str) -> Options:
        """From user- or file-given values (None: the default); a name the method does not take is refused."""
        unknown = sorted(set(given) - set(cls.names()))
        if unknown:
            raise LrsError(f"--{unknown[0].replace('_', '-')} does not apply to --method {method}")
        return cls(**{k: v for k, v in given.items() if v is not None})

    def __getitem__(self, key: str) -> Any:
        if key not in self.names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


@dataclass
class AdapterConfig:
    """Everything about an adapter but its tensors. `options` holds the method's own settings (its Options, or a
    mapping the method turns into them when it is bound); `provenance` where it came from and what made it."""

    method: str
    r: int
    alpha: float
    target_modules: list[str]
    dropout: float = 0.0
    rslora: bool = False
    fan_in_fan_out: bool | None = False  # W stored transposed (Conv1D); None: the adapter does not say
    options: Mapping[str, Any] = field(default_factory=dict)
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
        return {"method": self.method, "r": self.r, "alpha": self.alpha, **dict(self.options),
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
                                "fan_in_fan_out": (lambda v: v is None or type(v) is bool, "true, false or null"),
                                "niter": (lambda v: v is None or (type(v) is int and v >= 0), "an integer >= 0 or null")}


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
