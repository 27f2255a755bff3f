"""CoLA: M matrices A_i (r × in) and N matrices B_j (out × r), PiSSA-initialised, summed over pairs.

ΔW = s·[Σ_{(i,j)∈P} B_j·A_i − B0·A0], with the frozen PiSSA factors A0, B0 kept in the adapter,
and A_i = A0/M, B_j = B0·M/|P| at init (|P| = pairs summed per forward), so ΔW = 0 for every strategy:
- fully: P = every pair, ΔW = s·[(Σ_j B_j)(Σ_i A_i) − B0·A0];
- heuristic (M ≤ N): A_i pairs with B_{ik} … B_{ik+k−1} (k = N // M), the N mod M leftover B's
  pair with A_0, A_1, … in order;
- random: in training each forward pairs every A_i with one B drawn uniformly from a generator
  seeded per layer (its path and the adapter's seed); evaluation, merge and export use the
  expectation ΔW = s·[(1/N Σ_j B_j)(Σ_i A_i) − B0·A0] (the original code keeps drawing at eval).

Dropout acts once on x before the A's (the original code draws a mask per pair). Hence `fully`
gives every A_i (and every B_j) the same gradient: its copies stay identical during training,
with dropout 0 as with a shared dropout mask; it is PiSSA with scaled learning rates.

On disk: the original repository's layout (zyy-2001/CoLA, vendored PEFT 0.12): `peft_type: "COLA"`,
`num_A`, `num_B`, keys `lora_A.{i}.weight`, `lora_B.{j}.weight`, plus `pissa_A0.weight`,
`pissa_B0.weight` for the frozen factors. The original code saves no frozen factors (it rewrites
the base to W − s·B0·A0 instead) and always uses `fully`: such adapters load, and `complete`
recomputes A0, B0 by exact PiSSA from the base weights; s·B0·A0 = U_r S_r V_rᵀ is unique (up to
ties in the singular values), so the recomputed residual is the one the original code trained on.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..adapter import AdapterConfig
from ..errors import LrsError
from ..targets import Target
from .base import Method, Params
from .lora import config_from_lora_json, lora_json
from .pissa import A0, B0, PissaInit, frozen_factors_of

if TYPE_CHECKING:
    from ..attach import AdapterLayer

STRATEGIES = ("fully", "heuristic", "random")


class CoLA(PissaInit, Method):
    name = "cola"
    peft_type = "COLA"
    needs_base_weight = True
    defaults = {"num_a": 2, "num_b": 3, "strategy": "fully", "init_svd": "exact", "niter": None}

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        self.check_svd_options()
        self.num_a, self.num_b = int(config.options.get("num_a", 2)), int(config.options.get("num_b", 3))
        self.strategy = config.options.get("strategy", "fully")
        if self.strategy not in STRATEGIES:
            raise LrsError(f"unknown CoLA strategy {self.strategy!r} (known: {', '.join(STRATEGIES)})")
        if self.num_a < 1 or self.num_b < 1:
            raise LrsError(f"CoLA needs --num-a and --num-b >= 1, got {self.num_a} and {self.num_b}")
        if self.strategy == "heuristic" and self.num_a > self.num_b:
            raise LrsError(f"CoLA heuristic needs --num-a <= --num-b, got {self.num_a} A's and {self.num_b} B's")
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ parameters
    @property
    def a_names(self) -> list[str]:
        return [f"lora_A.{i}.weight" for i in range(self.num_a)]

    @property
    def b_names(self) -> list[str]:
        return [f"lora_B.{j}.weight" for j in range(self.num_b)]

    @property
    def param_names(self) -> tuple[str, ...]:
        return (*self.a_names, *self.b_names, A0, B0)

    @property
    def frozen(self) -> set[str]:
        return set(self.completable)

    def param_shapes(self, target: Target) -> dict[str, tuple[int, ...]]:
        r, (out, inp) = self.config.rank(target.path), target.shape
        return {**{n: (r, inp) for n in self.a_names}, **{n: (out, r) for n in self.b_names},
                A0: (r, inp), B0: (out, r)}

    @property
    def pairs_per_forward(self) -> int:
        """|P|: how many (A, B) products one forward sums."""
        return {"fully": self.num_a * self.num_b, "heuristic": self.num_b, "random": self.num_a}[self.strategy]

    def init(self, targets: Sequence[Target], weights: Sequence[torch.Tensor] | None,
             generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
        out = []
        for a0, b0 in self.frozen_factors(targets, weights, generator):
            a, b = a0 / self.num_a, b0 * (self.num_a / self.pairs_per_forward)
            out.append({**{n: a.clone() for n in self.a_names}, **{n: b.clone() for n in self.b_names},
                        A0: a0, B0: b0})
        return out

    # ------------------------------------------------------------------ maths
    def coefficients(self) -> torch.Tensor:
        """c (M × N) with ΔW = s·[Σ_ij c_ij B_j A_i − B0·A0]: the pairing, or for random its expectation."""
        m, n = self.num_a, self.num_b
        if self.strategy == "fully":
            return torch.ones(m, n)
        if self.strategy == "random":
            return torch.full((m, n), 1.0 / n)
        k, c = n // m, torch.zeros(m, n)
        for i in range(m):
            c[i, i * k:(i + 1) * k] = 1.0
        for t, j in enumerate(range(m * k, n)):
            c[t, j] = 1.0
        return c

    def draw(self, path: str) -> torch.Tensor:
        """One training draw for `random`: every A_i paired with one B, from the layer's own generator."""
        gen = self._generators.get(path)
        if gen is None:
            seed = int(self.config.provenance.get("seed", 0))
            gen = self._generators[path] = torch.Generator().manual_seed(zlib.crc32(path.encode()) + seed)
        c = torch.zeros(self.num_a, self.num_b)
        c[torch.arange(self.num_a), torch.randint(self.num_b, (self.num_a,), generator=gen)] = 1.0
        return c

    def trained_pair(self, params: Params, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with B·A = Σ_ij c_ij B_j A_i: one block when every A_i sees the same B's, else one per A_i."""
        a = torch.stack([params[n] for n in self.a_names])  # M × r × in
        b = torch.stack([params[n] for n in self.b_names])  # N × out × r
        c = coefficients.to(b.device, b.dtype)
        if bool((c == c[0]).all()):
            return torch.einsum("j,jor->or", c[0], b), a.sum(0)
        sums = torch.einsum("ij,jor->ior", c, b)  # M × out × r
        return torch.cat(list(sums), 1), a.reshape(-1, a.shape[-1])

    def pair(self, params: Params, training: bool = False,
             shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked effective pair, rank ≤ (M+1)·r, with −B0·A0; `random` gives its expectation
        (the per-layer training draws happen in `forward`, which knows the layer)."""
        b, a = self.trained_pair(params, self.coefficients())
        a0, b0 = frozen_factors_of(params)
        return torch.cat([b, -b0], 1), torch.cat([a, a0])

    def forward(self, layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
        params = layer.params()
        drawn = self.strategy == "random" and layer.training
        b, a = self.trained_pair(params, self.draw(layer.path) if drawn else self.coefficients())
        return self.residual_forward(layer, x, b, a, params)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {**lora_json(self.config, peft_type=self.peft_type), "num_A": self.num_a, "num_B": self.num_b}

    @classmethod
    def config_from_json(cls, data: dict[str, Any]) -> AdapterConfig:
        """lrs-written or original-code configs (`num_A`, `num_B`; no `lrs` block means the original's `fully`)."""
        config = config_from_lora_json(data, cls.name)
        config.options = {**cls.defaults, **config.options,
                          "num_a": int(data.get("num_A", 1)), "num_b": int(data.get("num_B", 1))}
        return config
