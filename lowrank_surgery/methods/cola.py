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

On disk: the original repository's layout (zyy-2001/CoLA, a vendored PEFT 0.12, peft/tuners/cola):
`peft_type: "COLA"`, `num_A`, `num_B`, keys `lora_A.{i}.weight`, `lora_B.{j}.weight` (its nn.ModuleList of
nn.Linear, adapter name stripped), plus `pissa_A0.weight`, `pissa_B0.weight` for the frozen factors. The
original code, for each layer: SVD W = U S Vᵀ of the base weight (float32); lora_A[i] = diag(√(S_r/s))·V_rᵀ / M,
lora_B[j] = U_r·diag(√(S_r/s)) / N (the same B0, A0 as here); base weight rewritten to W − s·B0·A0 (cast back
to its dtype); s = lora_alpha / r (no rsLoRA); forward Σ_i Σ_j B_j·A_i·dropout(x), a dropout mask per pair.
That is `fully`; its heuristic and random strategies (and a random one drawing an A per B) are
commented-out alternatives (same pairing as here; random draws with Python's `random` at every forward,
evaluation included) and its config does not record them. It saves no frozen factors: such adapters
load as `fully` (declare another strategy with an `"lrs": {"strategy": ...}` block in adapter_config.json),
and `complete` recomputes A0, B0 by exact PiSSA from the base weights; s·B0·A0 = U_r S_r V_rᵀ is unique
(up to ties in the singular values), so the recomputed residual is the one the original code trained on.
Its init (B0/N for every strategy) gives ΔW ≠ 0 at init for heuristic with M > 1 and random with N > 1;
lrs's B0·M/|P| (DESIGN) does not.

`lrs convert --to cola` writes what that code loads (`export_native`): its PEFT 0.12 passes every
adapter_config.json key to ColaConfig(**kwargs) and fails on unknown ones, so the config holds only
ColaConfig's fields (no `lrs` block, no `use_rslora`: rsLoRA's α/√r is written as lora_alpha = α·√r, and
per-module scales as full-path rank_pattern/alpha_pattern entries). Its copies are tied: pissa_init gives every
lora_A[i] the one tensor `lora_A` (`self.lora_A[adapter_name][i].weight.data = lora_A`, peft/tuners/cola/layer.py),
and every lora_B[j] the one `lora_B`; loading (peft/utils/save_and_load.py set_peft_model_state_dict,
model.load_state_dict(strict=False)) copies lora_A.0 … lora_A.{M−1} in turn into that one tensor, so the last
is what every copy holds (on a float32 base; the cast to a bf16/fp16 base's dtype unties them first). So the
copies written are equal, Ā = ΣA/M for every A_i and B̄ = (Σ_j c_j·B_j)/N for every B_j (c_j: the strategy's
weight of B_j), and the original's ΔW over them, s·[N·B̄·M·Ā − B0·A0] = s·[(Σ_j c_j·B_j)(Σ_i A_i) − B0·A0], is
the strategy's own: fully (c_j = 1), random's expectation (c_j = 1/N) and heuristic with one A (c_j = 1).
Heuristic with M > 1 pairs each A_i with its own B's, a sum of rank up to M·r that one rank-r pair cannot hold:
refused.
The frozen factors stay in the file (that code ignores unexpected keys) so lrs reads it back exactly.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..config import AdapterConfig
from ..errors import LrsError, warn
from ..targets import Target
from .base import Layer, Method, Params, Weights
from .lora import config_from_lora_json, lora_json
from .pissa import A0, B0, PissaInit, SvdOptions, frozen_factors_of


STRATEGIES = ("fully", "heuristic", "random")


@dataclass(frozen=True)
class CoLAOptions(SvdOptions):
    num_a: int = 2  # M, the A copies
    num_b: int = 3  # N, the B copies
    strategy: str = "fully"  # how A's and B's pair in a forward: fully, heuristic or random

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise LrsError(f"unknown CoLA strategy {self.strategy!r} (known: {', '.join(STRATEGIES)})")
        if self.num_a < 1 or self.num_b < 1:
            raise LrsError(f"CoLA needs --num-a and --num-b >= 1, got {self.num_a} and {self.num_b}")
        if self.strategy == "heuristic" and self.num_a > self.num_b:
            raise LrsError(f"CoLA heuristic needs --num-a <= --num-b, got {self.num_a} A's and {self.num_b} B's")


class CoLA(PissaInit, Method):
    name = "cola"
    peft_type = "COLA"
    Options = CoLAOptions
    paper = ("CoLA", "https://arxiv.org/abs/2505.15471")

    def __init__(self, config: AdapterConfig):
        super().__init__(config)
        options = self.config.options
        self.num_a, self.num_b, self.strategy = options.num_a, options.num_b, options.strategy
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
    def draws_in_forward(self) -> bool:
        return self.strategy == "random"

    @property
    def pairs_per_forward(self) -> int:
        """|P|: how many (A, B) products one forward sums."""
        return {"fully": self.num_a * self.num_b, "heuristic": self.num_b, "random": self.num_a}[self.strategy]

    def init(self, targets: Sequence[Target], weights: Sequence[torch.Tensor] | None,
             generator: torch.Generator, device: str | torch.device = "auto") -> list[dict[str, torch.Tensor]]:
        out = []
        for a0, b0 in self.frozen_factors(targets, weights, generator, device):
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
            # Σ_i A_i added up, not a.sum(0): the backward of a stacked sum hands every A_i a view of one gradient,
            # which clipping (in place) would then scale, and accumulation add to, once per A_i
            return torch.einsum("j,jor->or", c[0], b), sum(params[n] for n in self.a_names)
        sums = torch.einsum("ij,jor->ior", c, b)  # M × out × r
        return torch.cat(list(sums), 1), a.reshape(-1, a.shape[-1])

    def pair(self, params: Params, shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked effective pair, rank ≤ (M+1)·r, with −B0·A0; `random` gives its expectation
        (the per-layer training draws happen in `forward`, which knows the layer)."""
        b, a = self.trained_pair(params, self.coefficients())
        a0, b0 = frozen_factors_of(params)
        return torch.cat([b, -b0], 1), torch.cat([a, a0])

    def forward(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        params = layer.params()
        drawn = self.strategy == "random" and layer.training
        b, a = self.trained_pair(params, self.draw(layer.path) if drawn else self.coefficients())
        return self.residual_forward(layer, x, b, a, params)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return {**lora_json(self.config, peft_type=self.peft_type), "num_A": self.num_a, "num_B": self.num_b}

    # ------------------------------------------------------------------ the original code's layout
    def export_native(self, weights: Weights) -> tuple[Weights, AdapterConfig, dict[str, Any]]:
        """What the original code loads: `fully` parameters with equal copies, the same ΔW, only ColaConfig's fields."""
        tied = {path: self.as_tied_fully(params, path) for path, params in weights.items()}
        config = replace(self.config, options=replace(self.config.options, strategy="fully"))
        self.warn_original()
        return tied, config, self.original_json(tied)

    def as_tied_fully(self, params: Params, path: str) -> dict[str, torch.Tensor]:
        """`fully` parameters with equal copies (A_i = ΣA/M, B_j = Σ_j c_j·B_j / N) and this strategy's evaluation ΔW;
        possible when every A_i is summed with the same B's (c has equal rows), see the module doc."""
        c = self.coefficients()
        if not bool((c == c[0]).all()):
            raise LrsError(f"CoLA module {path}: strategy {self.strategy} with {self.num_a} A's pairs each A with its "
                           f"own B's, which the original code (one tied A and one tied B, strategy fully) cannot "
                           f"express; convert it --to peft-lora instead (exact)")
        b_sum, a_sum = self.trained_pair(params, c)
        a, b = a_sum / self.num_a, b_sum / self.num_b
        return {**params, **dict.fromkeys(self.a_names, a), **dict.fromkeys(self.b_names, b)}

    def original_json(self, paths: Iterable[str]) -> dict[str, Any]:
        """adapter_config.json with the original ColaConfig's fields only (PEFT 0.12 rejects unknown keys)."""
        c = self.config
        alpha = c.alpha * math.sqrt(c.r) if c.rslora else c.alpha  # s·r of a module without patterns
        ranks = {p: c.rank(p) for p in paths}
        alphas = {p: c.scale(p) * r for p, r in ranks.items()}
        return {
            "peft_type": self.peft_type, "task_type": None, "base_model_name_or_path": c.base_model,
            "revision": None, "inference_mode": True, "r": c.r, "lora_alpha": alpha, "lora_dropout": c.dropout,
            "num_A": self.num_a, "num_B": self.num_b, "target_modules": c.target_modules,
            "fan_in_fan_out": c.fan_in_fan_out, "bias": "none", "modules_to_save": None, "init_lora_weights": True,
            "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {p: r for p, r in ranks.items() if r != c.r},
            "alpha_pattern": {p: a for p, a in alphas.items() if not math.isclose(a, alpha, rel_tol=1e-9)},
        }

    def warn_original(self) -> None:
        """Warn where the original code will not reproduce this adapter's outputs exactly."""
        if self.strategy != "fully":
            warn(f"CoLA strategy {self.strategy} written as fully (the original code's only strategy) "
                 f"with the same evaluation ΔW")
        algorithm = self.config.options.init_svd
        if algorithm == "randomized":
            warn(f"the original CoLA code recomputes the residual W − s·B0·A0 by exact SVD, but this "
                 f"adapter's frozen factors come from a {algorithm} SVD: its outputs there differ by that SVD's error")
        if self.config.fan_in_fan_out:
            warn("the original CoLA code computes its PiSSA residual on Conv1D weights without transposing "
                 "them: it cannot reproduce this (fan_in_fan_out) adapter")

    @classmethod
    def config_from_json(cls, data: dict[str, Any], declared: Mapping[str, Any]) -> AdapterConfig:
        """lrs-written or original-code configs (`num_A`, `num_B`). The original's config cannot say which strategy
        trained it: the user's `declared` strategy, else it is read as `fully`, with a warning."""
        strategy = declared.get("strategy")
        config = config_from_lora_json(data, cls)
        recorded = config.options.get("strategy")  # in the `lrs` block of adapters lrs wrote
        if strategy is not None and recorded is not None and strategy != recorded:
            raise LrsError(f"--cola-strategy {strategy} contradicts the adapter's own strategy {recorded}")
        if strategy is None and recorded is None:
            warn("CoLA adapter in the original code's layout: its config does not record the strategy it was "
                 "trained with; reading it as fully (pass --cola-strategy heuristic or random if it was not)")
        config.options = {**config.options, "strategy": strategy or recorded or "fully",
                          "num_a": int(data.get("num_A", 1)), "num_b": int(data.get("num_B", 1))}
        return config
