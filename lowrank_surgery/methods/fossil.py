"""FOSSIL (PEFT's MiSS, formerly Bone): shared shards of a zero-initialised block D, no scaling.

Variants (PEFT's `init_weights`):
- balance (True; False in PEFT is the same variant with a random instead of a zero init):
  D ∈ R^{r×out}, ΔW[o, i] = D[i mod r, o]: Dᵀ tiled along the input;
- mini ("mini"): D ∈ R^{r×mini_r}, out % mini_r == 0, ΔW[o, i] = D[i mod r, o mod mini_r];
- bat ("bat"): D ∈ R^{(out/r)×r×r}, every r×r block W_{b,c} becomes W_{b,c}(I + D_b) + D_b.

balance and mini are exactly low-rank (B = the tiled Dᵀ, A = the 0/1 fold matrix) but their
forward folds x instead (f_j = Σ_g x[g·r + j], y += Dᵀf). bat involves W and is not low-rank.
As in PEFT, dropout (`miss_dropout`) acts on x in balance/mini only: PEFT's bat forward has none.
On disk: PEFT `MISS` (`miss_block`); old PEFT `BONE` adapters (`bone_block`, Bone = balance,
Bone-bat = bat with the same block convention) load as FOSSIL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AdapterConfig, Options, split_key
from ..errors import LrsError, warn
from ..targets import Target
from .base import Layer, Method, Params
from .lora import _as_list, options_from_lrs, provenance_from_lrs


VARIANTS = ("balance", "mini", "bat")
BLOCK = "miss_block"
LEGACY_BLOCK = "bone_block"  # PEFT's Bone, the same parameter under its old name
# PEFT's init_weights -> variant. False is balance with a random (Kaiming) init instead of zeros: the
# init does not matter for a saved adapter, so it reads as balance (and is written back as True).
INIT_VARIANTS: dict[bool | str, str] = {True: "balance", False: "balance", "mini": "mini", "bat": "bat"}


@dataclass(frozen=True)
class FossilOptions(Options):
    variant: str = "balance"  # balance, mini or bat
    mini_r: int | None = None  # mini: the block's width along the output

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise LrsError(f"unknown FOSSIL variant {self.variant!r} (known: {', '.join(VARIANTS)})")
        if self.variant == "mini" and (self.mini_r is None or self.mini_r < 1):
            raise LrsError("FOSSIL variant mini needs --mini-r N (N >= 1, dividing out_features)")
        if self.variant != "mini" and self.mini_r is not None:
            raise LrsError(f"--mini-r applies to FOSSIL variant mini only, not {self.variant}")


class Fossil(Method):
    name = "fossil"
    peft_type = "MISS"
    Options = FossilOptions
    paper = ("FOSSIL", "https://arxiv.org/abs/2409.15371")

    @property
    def variant(self) -> str:
        return self.config.options.variant

    @property
    def mini_r(self) -> int | None:
        return self.config.options.mini_r

    @property
    def needs_base_weight(self) -> bool:  # type: ignore[override]
        return self.variant == "bat"

    @classmethod
    def peft_types(cls) -> tuple[str, ...]:
        return ("MISS", "BONE")

    # ------------------------------------------------------------------ parameters
    @property
    def param_names(self) -> tuple[str, ...]:
        return (BLOCK,)

    def param_shapes(self, target: Target) -> dict[str, tuple[int, ...]]:
        r, out = self.config.rank(target.path), target.out_features
        shape = {"balance": (r, out), "mini": (r, self.mini_r), "bat": (out // r, r, r)}[self.variant]
        return {BLOCK: shape}

    def validate(self, target: Target) -> None:
        r, (out, inp) = self.config.rank(target.path), target.shape
        where = f"{target.path} (shape {out}x{inp})"
        if r < 1 or r > inp:
            raise LrsError(f"rank {r} is larger than {where} allows: FOSSIL needs 1 <= r <= in_features")
        if self.variant == "bat" and (inp % r or out % r):
            raise LrsError(f"FOSSIL bat needs both dimensions divisible by r={r}, but {where} is not")
        if self.variant == "mini" and out % self.mini_r:
            raise LrsError(f"FOSSIL mini needs mini_r={self.mini_r} to divide out_features of {where}")

    def init(self, targets: Sequence[Target], weights: Sequence[torch.Tensor] | None,
             generator: torch.Generator, device: str | torch.device = "auto") -> list[dict[str, torch.Tensor]]:
        return [{BLOCK: torch.zeros(self.param_shapes(t)[BLOCK])} for t in targets]

    # ------------------------------------------------------------------ maths
    @property
    def low_rank(self) -> bool:
        return self.variant != "bat"

    def scale(self, path: str) -> float:
        """1: FOSSIL's ΔW is its block itself, whatever α says (PEFT's MiSS has no α)."""
        return 1.0

    def pair(self, params: Params, shape: tuple[int, int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tiled Dᵀ, fold matrix) for balance/mini; needs the module shape (out, in). None for bat."""
        if self.variant == "bat":
            return None
        if shape is None:
            raise LrsError("FOSSIL's fold matrix depends on the module's in_features, which the adapter does not store")
        out, inp = shape
        block = params[BLOCK]
        r = block.shape[0]
        fold = (torch.arange(inp, device=block.device) % r == torch.arange(r, device=block.device)[:, None])
        return self._tiled(block, out).T, fold.to(block.dtype)

    def _tiled(self, block: torch.Tensor, out: int) -> torch.Tensor:
        """D as r × out: mini repeats its mini_r columns along the output."""
        return block.repeat(1, out // self.mini_r) if self.variant == "mini" else block

    def delta(self, params: Params, path: str, shape: tuple[int, int], weight: torch.Tensor | None = None
              ) -> torch.Tensor:
        """ΔW (out × in, float32). balance/mini: the fold pair's product, exact (each column of the 0/1 fold matrix
        holds a single 1, so every entry is one D value); bat: W_{b,c}·D_b + D_b, which needs W."""
        if self.variant != "bat":
            return super().delta(params, path, shape)
        if weight is None:
            raise LrsError(f"FOSSIL bat's ΔW at {path} depends on the base weight W, which was not given")
        return _bat_delta(weight.float(), params[BLOCK].float())

    def merge(self, weight: torch.Tensor, params: Params, path: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """balance/mini: W + ΔW through the fold pair; bat: W_{b,c}(I + D_b) + D_b in float64 (returned as such,
        `out` unused)."""
        if self.variant != "bat":
            return super().merge(weight, params, path, out)
        w = weight.double()
        return w + _bat_delta(w, params[BLOCK].double())

    def unmerge(self, merged: torch.Tensor, params: Params, path: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """balance/mini: W' − ΔW; bat: the exact inverse W_{b,c} = (W'_{b,c} − D_b)(I + D_b)⁻¹ in float64."""
        if self.variant != "bat":
            return super().unmerge(merged, params, path, out)
        block = params[BLOCK].double()
        eye = torch.eye(block.shape[-1], dtype=torch.float64, device=block.device)
        affine = eye + block
        sv = torch.linalg.svdvals(affine)
        bad = (sv[:, -1] <= sv[:, 0] * block.shape[-1] * torch.finfo(torch.float64).eps).nonzero()
        if len(bad):
            raise LrsError(f"cannot unmerge FOSSIL bat at {path}: I + D_b is singular for block b={int(bad[0])} "
                           f"of {tuple(block.shape)} (weight {tuple(merged.shape)})")
        blocks = _blocks(merged.double(), block.shape[-1])  # (out/r, r, in/r, r)
        shifted = (blocks - block[:, :, None, :]).permute(0, 2, 1, 3)  # (out/r, in/r, r, r)
        w = torch.linalg.solve(affine[:, None], shifted, left=False).permute(0, 2, 1, 3)
        return w.reshape(merged.shape)

    def unmerge_error(self, error: torch.Tensor, params: Params) -> torch.Tensor:
        """bat: unmerge maps every block row e of its input through (I + D_b)⁻¹, so |e|·|(I + D_b)⁻¹| bounds
        how far it moves the result (the inverse's entries are large where I + D_b is ill-conditioned)."""
        if self.variant != "bat":
            return error
        block = params[BLOCK].to(error)
        inverse = torch.linalg.inv(torch.eye(block.shape[-1], dtype=block.dtype, device=block.device) + block)
        return _blockwise(error, inverse.abs()).reshape(error.shape)

    # ------------------------------------------------------------------ training
    def forward(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """The fold kernel (balance/mini, never builds ΔW) or the block-affine kernel (bat)."""
        from .. import kernels

        block = layer.params()[BLOCK]
        if self.variant == "bat":
            return kernels.bat_linear(x, layer.weight, layer.bias, block)
        dropout = self.config.dropout if layer.training else 0.0
        return kernels.fold_linear(x, layer.weight, layer.bias, block, block.shape[0],
                                   mini_r=self.mini_r, dropout=dropout)

    # ------------------------------------------------------------------ files
    def split_keys(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """As the base, also reading Bone's `bone_block` as `miss_block`."""
        renamed = {}
        for key, tensor in tensors.items():
            legacy = split_key(key, (LEGACY_BLOCK,))
            renamed[f"{legacy[0]}.{BLOCK}" if legacy else key] = tensor
        return super().split_keys(renamed)

    def warn_native(self) -> None:
        """PEFT's MiSS layer wraps nn.Linear only: on Conv1D (GPT-2) PeftModel.from_pretrained raises TypeError."""
        if not self.config.fan_in_fan_out:
            return
        lossy = self.variant == "bat"
        lora = "a truncated-SVD LoRA (bat is not low-rank)" if lossy else "an exact LoRA"
        warn(f"stock PEFT cannot load MiSS (FOSSIL) adapters on Conv1D layers (GPT-2): use lrs (attach, merge), or "
             f"`lrs convert ADAPTER OUT --to peft-lora --base MODEL{' --allow-lossy' if lossy else ''}` for {lora}, "
             f"which PEFT loads on Conv1D")

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "peft_type": "MISS",
            "task_type": None,
            "base_model_name_or_path": c.base_model,
            "revision": None,
            "inference_mode": True,
            "r": c.r,
            "miss_dropout": c.dropout,
            "mini_r": self.mini_r or 1,
            "target_modules": c.target_modules,
            "exclude_modules": None,
            "init_weights": {"balance": True, "mini": "mini", "bat": "bat"}[self.variant],
            "layers_to_transform": None,
            "layers_pattern": None,
            "bias": "none",
            "modules_to_save": None,
            "lrs": {**c.lrs_block(), "fan_in_fan_out": c.fan_in_fan_out},  # MiSS has no field for it
        }

    @classmethod
    def config_from_json(cls, data: dict[str, Any], declared: Mapping[str, Any]) -> AdapterConfig:
        """From PEFT MiSS or Bone configs (lrs-written or not)."""
        lrs = data.get("lrs") or {}
        init = data.get("init_weights", True)
        variant = INIT_VARIANTS.get(init) if isinstance(init, (bool, str)) else None
        if variant is None:
            raise LrsError(f"FOSSIL/MiSS init_weights={init!r} is not supported (true, false, 'mini' or 'bat')")
        r = int(data.get("r", 64))
        options = {**options_from_lrs(lrs, cls), "variant": variant,
                   "mini_r": int(data.get("mini_r") or 1) if variant == "mini" else None}
        return AdapterConfig(
            method=cls.name, r=r, alpha=float(lrs.get("alpha", r)),
            target_modules=_as_list(data.get("target_modules")),
            dropout=float(data.get("miss_dropout") or 0.0),
            fan_in_fan_out=lrs.get("fan_in_fan_out") if lrs else False,  # PEFT's MiSS adapts nn.Linear only
            options=options, base_model=data.get("base_model_name_or_path"),
            provenance=provenance_from_lrs(lrs, cls),
        )


def _blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """W (out × in) as (out/r, r, in/r, r): [b, :, c, :] is the block W_{b,c}."""
    out, inp = weight.shape
    return weight.reshape(out // r, r, inp // r, r)


def _blockwise(weight: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """W_{b,c}·M_b for every r×r block of W (out × in), one M_b per block row (out/r × r × r): (out/r, r, in/r, r)."""
    return torch.einsum("bpcq,bqs->bpcs", _blocks(weight, mats.shape[-1]), mats)


def _bat_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W_{b,c}·D_b + D_b for every block: ΔW of bat, in the dtype of its inputs."""
    return (_blockwise(weight, block) + block[:, :, None, :]).reshape(weight.shape)
