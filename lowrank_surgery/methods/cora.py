"""CoRA: LoRA whose B is a common subspace U_r computed offline (`lrs extract-subspace`). A plain LoRA on disk.

B := the first r columns of the subspace basis for the module (by module path for scope `layer`, by module
type for scope `model`), so r may be at most the subspace's rank. A := 0 (the model is unchanged at init)
or Kaiming-uniform as LoRA's (the paper's random A). Mode `frozen` trains A only; mode `init` trains both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cards import CORA_PAPER
from ..config import Options
from ..errors import LrsError
from ..subspace import Subspace, load_subspace
from ..targets import Target
from .lora import LoRA, kaiming_a

MODES = ("frozen", "init")
A_INITS = ("zeros", "kaiming")


@dataclass(frozen=True)
class CoRAOptions(Options):
    subspace: str | None = None  # the directory `lrs extract-subspace` wrote (needed at init only)
    cora_mode: str = "frozen"  # frozen: B fixed, A trains; init: both train
    a_init: str = "zeros"  # or kaiming, LoRA's (the paper's random A)

    def __post_init__(self) -> None:
        if self.cora_mode not in MODES:
            raise LrsError(f"unknown --cora-mode {self.cora_mode!r} (known: {', '.join(MODES)})")
        if self.a_init not in A_INITS:
            raise LrsError(f"unknown --a-init {self.a_init!r} (known: {', '.join(A_INITS)})")


class CoRA(LoRA):
    name = "cora"
    Options = CoRAOptions
    paper = CORA_PAPER

    @classmethod
    def default_targets(cls, options: CoRAOptions) -> str:
        """The module types the subspace was built for."""
        return ",".join(_subspace(options).info["targets"])

    @property
    def frozen(self) -> set[str]:
        return {"lora_B.weight"} if self.config.options.cora_mode == "frozen" else set()

    def init(self, targets: Sequence[Target], weights: Sequence[torch.Tensor] | None,
             generator: torch.Generator, device: str | torch.device = "auto") -> list[dict[str, torch.Tensor]]:
        subspace = _subspace(self.config.options)
        rank = subspace.info["rank"]
        self.config.provenance.update(subspace=subspace.id, subspace_hash=subspace.hash)
        params = []
        for t in targets:
            r = self.config.rank(t.path)
            if r > rank:
                raise LrsError(f"--rank {r} for {t.path} exceeds the subspace's rank {rank} (CoRA takes its first r columns)")
            b = subspace.basis(t)[:, :r].contiguous()
            a = kaiming_a(r, t.in_features, generator) if self.config.options.a_init == "kaiming" \
                else torch.zeros(r, t.in_features)
            params.append({"lora_A.weight": a, "lora_B.weight": b})
        return params


def _subspace(options: CoRAOptions) -> Subspace:
    if not options.subspace:
        raise LrsError("--method cora needs --subspace DIR (from lrs extract-subspace)")
    return load_subspace(options.subspace)
