"""PiSSA: LoRA started on the principal singular directions of W, trained on the residual.

SVD W = U S Vᵀ; A0 = diag(√(S_r/s))·V_rᵀ, B0 = U_r·diag(√(S_r/s)), so s·B0·A0 = U_r S_r V_rᵀ.
The base checkpoint is never rewritten: the adapter keeps the frozen A0, B0 (`pissa_A0.weight`,
`pissa_B0.weight`) next to the trained A, B (`lora_A.weight`, `lora_B.weight`) and defines
ΔW = s·(B·A − B0·A0): exactly "train on the residual model W − s·B0·A0", ΔW = 0 at init.
Dropout acts on the input of the trained A only, as on PEFT's residual model.

On disk `peft_type: "PISSA"`, which stock PEFT refuses: read as a plain LoRA it would drop the
−B0·A0 term. `lrs convert --to peft-lora` exports the rank-2r pair ([B | −B0], [A; A0]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AdapterConfig, Options
from ..errors import LrsError
from ..svd import lowrank_factors
from ..targets import Target
from .base import Layer, Method, Params
from .lora import config_from_lora_json, lora_json


A0, B0 = "pissa_A0.weight", "pissa_B0.weight"
SVD_ALGORITHMS = ("exact", "randomized", "gram")  # gram: exact, through the Gram matrix (svd.py)
# The default is PEFT's own route (float32 torch.linalg.svd, as in the original CoLA code): PEFT's `pissa`
# factors bit for bit. `gram` is twice as fast and ~100x closer to a float64 SVD (bench_init), but on real
# weights, whose top singular values are close, it differs from those float32 factors by ~5e-5.
DEFAULT_SVD = "exact"
DEFAULT_NITER = 4


def pissa_factors(weights: Sequence[torch.Tensor], r: int, scale: float, algorithm: str = DEFAULT_SVD,
                  niter: int | None = None, generator: torch.Generator | None = None,
                  device: str | torch.device = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A0, B0) per weight (out × in, float32), s·B0·A0 its rank-r truncation; same shapes share one batched SVD."""
    factors = lowrank_factors(weights, r, distribute_scale=True, scale=scale, algorithm=algorithm,
                              niter=DEFAULT_NITER if niter is None else niter, generator=generator, device=device)
    return [(a0, b0) for b0, a0 in factors]


@dataclass(frozen=True)
class SvdOptions(Options):
    """PiSSA's options, which CoLA shares: how the SVD of W is computed."""

    init_svd: str = DEFAULT_SVD
    niter: int | None = None  # power iterations of the randomized SVD (default DEFAULT_NITER)

    def __post_init__(self) -> None:
        if self.init_svd not in SVD_ALGORITHMS:
            raise LrsError(f"unknown --init-svd {self.init_svd!r} (known: {', '.join(SVD_ALGORITHMS)})")
        if self.niter is not None and (self.init_svd != "randomized" or self.niter < 0):
            raise LrsError(f"--niter {self.niter} needs --init-svd randomized and a value >= 0")


class PissaInit:
    """What PiSSA and CoLA share: the frozen factors and the residual-model forward."""

    config: AdapterConfig
    completable = frozenset({A0, B0})
    needs_base_weight = True  # the frozen factors are the SVD of W

    def max_rank(self, target: Target) -> int:
        """The SVD of W has min(out, in) directions."""
        return min(target.out_features, target.in_features)

    def frozen_factors(self, targets: Sequence[Target], weights: Sequence[torch.Tensor], generator: torch.Generator,
                       device: str | torch.device = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A0, B0) per target, one batched SVD per (shape, rank, scale)."""
        groups: dict[tuple[int, float], list[int]] = {}
        for k, t in enumerate(targets):
            groups.setdefault((self.config.rank(t.path), self.config.scale(t.path)), []).append(k)
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(targets)
        for (r, s), idx in groups.items():
            found = pissa_factors([weights[k] for k in idx], r, s, self.config.options.init_svd,
                                  self.config.options.niter, generator, device)
            for k, f in zip(idx, found):
                out[k] = f
        return out  # type: ignore[return-value]

    def complete(self, weights: dict[str, dict[str, torch.Tensor]],
                 base_weight: Callable[[str], torch.Tensor]) -> None:
        """Recompute missing frozen factors by PiSSA from the base (the original CoLA code never saves them)."""
        missing = [path for path, params in weights.items() if A0 not in params or B0 not in params]
        if not missing:
            return
        mats = [base_weight(path).float() for path in missing]
        targets = [Target(path, *m.shape) for path, m in zip(missing, mats)]
        generator = torch.Generator().manual_seed(int(self.config.provenance.get("seed", 0)))
        for path, (a0, b0) in zip(missing, self.frozen_factors(targets, mats, generator)):
            weights[path].update({A0: a0, B0: b0})

    def residual_forward(self, layer: Layer, x: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
                         params: Params) -> torch.Tensor:
        """y = x·Wᵀ + bias + s·B·A·drop(x) − s·B0·A0·x: the trained pair (b, a) on the residual model."""
        from .. import kernels

        s = self.config.scale(layer.path)
        a0, b0 = frozen_factors_of(params, layer.path)
        dropout = self.config.dropout if layer.training else 0.0
        if dropout == 0.0:
            return kernels.lowrank_linear(x, layer.weight, layer.bias, torch.cat([a, a0]), torch.cat([b, -b0], 1), s)
        y = kernels.lowrank_linear(x, layer.weight, layer.bias, a, b, s, dropout)
        return y - s * ((x @ a0.to(x.dtype).T) @ b0.to(x.dtype).T)


def frozen_factors_of(params: Params, path: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    if A0 not in params or B0 not in params:
        raise LrsError(f"adapter module {path or '(unnamed)'} lacks the frozen PiSSA factors {A0}/{B0}: "
                       f"give the base model so that they are recomputed")
    return params[A0], params[B0]


class PiSSA(PissaInit, Method):
    name = "pissa"
    peft_type = "PISSA"
    Options = SvdOptions
    paper = ("PiSSA", "https://arxiv.org/abs/2404.02948")

    @property
    def param_names(self) -> tuple[str, ...]:
        return ("lora_A.weight", "lora_B.weight", A0, B0)

    @property
    def frozen(self) -> set[str]:
        return set(self.completable)

    def param_shapes(self, target: Target) -> dict[str, tuple[int, ...]]:
        r, (out, inp) = self.config.rank(target.path), target.shape
        return {"lora_A.weight": (r, inp), "lora_B.weight": (out, r), A0: (r, inp), B0: (out, r)}

    def init(self, targets: Sequence[Target], weights: Sequence[torch.Tensor] | None,
             generator: torch.Generator, device: str | torch.device = "auto") -> list[dict[str, torch.Tensor]]:
        return [{"lora_A.weight": a0.clone(), "lora_B.weight": b0.clone(), A0: a0, B0: b0}
                for a0, b0 in self.frozen_factors(targets, weights, generator, device)]

    def pair(self, params: Params, shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """([B | −B0], [A; A0]): rank 2r."""
        a0, b0 = frozen_factors_of(params)
        return torch.cat([params["lora_B.weight"], -b0], 1), torch.cat([params["lora_A.weight"], a0])

    def forward(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        params = layer.params()
        return self.residual_forward(layer, x, params["lora_B.weight"], params["lora_A.weight"], params)

    def to_json(self) -> dict[str, Any]:
        return {**lora_json(self.config, peft_type=self.peft_type), "init_lora_weights": _peft_init(self.config.options)}

    @classmethod
    def config_from_json(cls, data: dict[str, Any], declared: Mapping[str, Any]) -> AdapterConfig:
        return config_from_lora_json(data, cls)


def _peft_init(options: SvdOptions) -> str:
    """PEFT's name for the same init (informational: these adapters keep the frozen factors)."""
    if options.init_svd != "randomized":
        return "pissa"
    return f"pissa_niter_{options.niter or DEFAULT_NITER}"
