"""The method registry: one module per adapter method, all behind the `Method` interface."""

from __future__ import annotations

from typing import Any

from ..config import AdapterConfig
from ..errors import LrsError
from .base import Method
from .cola import CoLA
from .cora import CoRA
from .fossil import Fossil
from .lora import LoRA
from .pissa import PiSSA

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (LoRA, CoRA, PiSSA, CoLA, Fossil)}


def get_method(config: AdapterConfig) -> Method:
    """The method object for a config."""
    try:
        return METHODS[config.method](config)
    except KeyError:
        raise LrsError(f"unknown method {config.method!r} (known: {', '.join(METHODS)})") from None


def method_from_json(data: dict[str, Any], cola_strategy: str | None = None) -> Method:
    """Pick the method from adapter_config.json: the `lrs` block first, then PEFT's peft_type. `cola_strategy`
    is the user's word on what a CoLA config cannot say (the original code's adapters)."""
    declared = (data.get("lrs") or {}).get("method")
    peft_type = str(data.get("peft_type", "")).upper()
    candidates = [cls for cls in METHODS.values() if peft_type in cls.peft_types()]
    if not candidates:
        known = sorted({t for cls in METHODS.values() for t in cls.peft_types()})
        raise LrsError(f"adapter peft_type {data.get('peft_type')!r} is not supported (known: {', '.join(known)})")
    if declared is not None and declared not in [c.name for c in candidates]:
        raise LrsError(f"adapter declares lrs method {declared!r}, which peft_type {peft_type} does not support "
                       f"(it can be: {', '.join(c.name for c in candidates)})")
    cls = next((c for c in candidates if c.name == declared), candidates[0])
    stated = {} if cola_strategy is None else {"strategy": cola_strategy}
    if not set(stated) <= set(cls.Options.names()):
        raise LrsError(f"--cola-strategy applies to CoLA adapters, but this one is {cls.name}")
    return cls(cls.config_from_json(data, stated))
