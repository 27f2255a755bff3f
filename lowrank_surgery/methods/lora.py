"""LoRA: ΔW = s·B·A with A Kaiming-uniform (a=√5) and B = 0 at init. Stock PEFT `LORA` on disk."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import AdapterConfig
from ..targets import Target
from .base import Method, Params


class LoRA(Method):
    name = "lora"
    peft_type = "LORA"
    paper = ("LoRA", "https://arxiv.org/abs/2106.09685")

    @property
    def param_names(self) -> tuple[str, ...]:
        return ("lora_A.weight", "lora_B.weight")

    def param_shapes(self, target: Target) -> dict[str, tuple[int, ...]]:
        r = self.config.rank(target.path)
        return {"lora_A.weight": (r, target.in_features), "lora_B.weight": (target.out_features, r)}

    def init(self, targets: Sequence[Target], weights: Sequence[torch.Tensor] | None,
             generator: torch.Generator, device: str | torch.device = "auto") -> list[dict[str, torch.Tensor]]:
        return [{"lora_A.weight": kaiming_a(self.config.rank(t.path), t.in_features, generator),
                 "lora_B.weight": torch.zeros(t.out_features, self.config.rank(t.path))} for t in targets]

    def pair(self, params: Params, shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return params["lora_B.weight"], params["lora_A.weight"]

    def to_json(self) -> dict[str, Any]:
        return lora_json(self.config)

    @classmethod
    def config_from_json(cls, data: dict[str, Any], declared: Mapping[str, Any]) -> AdapterConfig:
        return config_from_lora_json(data, cls)


def kaiming_a(r: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init for A (Kaiming-uniform, a=√5), as PEFT uses: U(-1/√in, 1/√in)."""
    a = torch.empty(r, in_features)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def lora_json(config: AdapterConfig, peft_type: str = "LORA") -> dict[str, Any]:
    """PEFT LoraConfig fields (unknown keys such as `lrs` are ignored by PEFT)."""
    return {
        "peft_type": peft_type,
        "task_type": None,
        "base_model_name_or_path": config.base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "fan_in_fan_out": config.fan_in_fan_out,
        "use_rslora": config.rslora,
        "bias": "none",
        "init_lora_weights": True,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "modules_to_save": config.modules_to_save or None,
        "inference_mode": True,
        "lrs": config.lrs_block(),
    }


def config_from_lora_json(data: dict[str, Any], method: type[Method]) -> AdapterConfig:
    """An AdapterConfig from a PEFT LoRA config (written by lrs, PEFT or anyone else)."""
    lrs = data.get("lrs") or {}
    r = int(data.get("r", 8))
    return AdapterConfig(
        method=method.name,
        r=r,
        alpha=float(data.get("lora_alpha", r)),
        target_modules=_as_list(data.get("target_modules")),
        dropout=float(data.get("lora_dropout") or 0.0),
        rslora=bool(data.get("use_rslora", False)),
        fan_in_fan_out=None if data.get("fan_in_fan_out") is None else bool(data["fan_in_fan_out"]),
        options=options_from_lrs(lrs, method),
        rank_pattern=dict(data.get("rank_pattern") or {}),
        alpha_pattern=dict(data.get("alpha_pattern") or {}),
        base_model=data.get("base_model_name_or_path"),
        provenance=provenance_from_lrs(lrs, method),
        modules_to_save=_as_list(data.get("modules_to_save")),
    )


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


CORE_KEYS = {"method", "r", "alpha", "version", "fan_in_fan_out"}  # the block's own fields, not options


def options_from_lrs(lrs: dict[str, Any], method: type[Method]) -> dict[str, Any]:
    """The method's options among the `lrs` block's keys."""
    return {k: v for k, v in lrs.items() if k in method.Options.names()}


def provenance_from_lrs(lrs: dict[str, Any], method: type[Method]) -> dict[str, Any]:
    """The rest of the block: where the adapter came from and what made it (extract-lora's and convert's reports)."""
    return {k: v for k, v in lrs.items() if k not in CORE_KEYS and k not in method.Options.names()}
