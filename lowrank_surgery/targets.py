"""Target selection from tensor names and shapes alone: which linear weights an adapter touches."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .checkpoint import Checkpoint
from .errors import LrsError

# Model types whose projections are transformers' Conv1D, which stores W transposed (in, out).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_NAMES = {"c_attn", "c_proj", "c_fc", "q_attn"}
OUTPUT_LAYERS = {"lm_head", "embed_out", "output", "decoder", "score", "classifier"}
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Target:
    """A linear weight an adapter may touch, in nn.Linear terms (out_features × in_features)."""

    path: str  # module path, e.g. model.layers.0.self_attn.q_proj
    out_features: int
    in_features: int
    conv1d: bool = False  # stored transposed, as GPT-2's Conv1D does

    @property
    def weight(self) -> str:
        return f"{self.path}.weight"

    @property
    def kind(self) -> str:
        """The module type: the last component of the path (q_proj, c_attn, ...)."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def linear_targets(ckpt: Checkpoint) -> list[Target]:
    """Every 2-D weight that belongs to a linear layer (embeddings excluded), in checkpoint order."""
    conv1d_model = ckpt.config.get("model_type") in CONV1D_MODEL_TYPES
    targets = []
    for name, info in ckpt.tensors.items():
        if not name.endswith(".weight") or len(info.shape) != 2 or not info.dtype.is_floating_point:
            continue
        path = name[: -len(".weight")]
        if _is_embedding(path):
            continue
        conv1d = _is_conv1d(ckpt, path, info.shape, conv1d_model)
        out_f, in_f = (info.shape[1], info.shape[0]) if conv1d else info.shape
        targets.append(Target(path, out_f, in_f, conv1d))
    return targets


def _is_embedding(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return "embed" in last or last in {"wte", "wpe"} or ".embeddings." in f".{path}."


def _is_conv1d(ckpt: Checkpoint, path: str, shape: tuple[int, ...], conv1d_model: bool) -> bool:
    if conv1d_model:
        return path.rsplit(".", 1)[-1] in CONV1D_NAMES
    bias = ckpt.tensors.get(f"{path}.bias")
    # Without a config, a bias sized like dim 1 rather than dim 0 gives a Conv1D away.
    return bias is not None and shape[0] != shape[1] and bias.shape == (shape[1],)


def is_output_layer(path: str) -> bool:
    """lm_head and its kin, which `all-linear` leaves out (as PEFT does)."""
    return path.rsplit(".", 1)[-1] in OUTPUT_LAYERS and path.count(".") <= 2


def parse_targets(spec: str | Sequence[str]) -> list[str]:
    """'q_proj,v_proj' or a list -> ['q_proj', 'v_proj']."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s.strip() for s in items if s.strip()]
    if not items:
        raise LrsError("--targets is empty")
    return items


def matches(path: str, item: str) -> bool:
    """A plain name matches the module path or its dotted suffix; anything else is a full-match regex."""
    if re.fullmatch(r"[\w.]+", item):
        return path == item or path.endswith("." + item)
    try:
        return re.fullmatch(item, path) is not None
    except re.error as exc:
        raise LrsError(f"--targets {item!r} is not a valid regex: {exc}") from None


def select_targets(ckpt: Checkpoint, spec: str | Sequence[str]) -> list[Target]:
    """The linear modules matched by names, regexes or `all-linear`; an error lists what exists."""
    candidates = linear_targets(ckpt)
    items = parse_targets(spec)
    chosen = [
        t for t in candidates
        if any((item == ALL_LINEAR and not is_output_layer(t.path)) or (item != ALL_LINEAR and matches(t.path, item))
               for item in items)
    ]
    if not chosen:
        raise LrsError(f"--targets {','.join(items)} matched no linear module; this model has: {', '.join(kinds(candidates))}")
    return chosen


def kinds(targets: Iterable[Target]) -> list[str]:
    """Distinct module types, in order of appearance."""
    return list(dict.fromkeys(t.kind for t in targets))


def compact_names(chosen: Sequence[Target], candidates: Sequence[Target]) -> list[str]:
    """Module types when the choice is exactly every module of those types, else full paths (for PEFT configs)."""
    types = set(kinds(chosen))
    if {t.path for t in candidates if t.kind in types} == {t.path for t in chosen}:
        return sorted(types)
    return [t.path for t in chosen]
