"""Target selection: which linear weights of a checkpoint an adapter touches, as PEFT would pick them, and a
target's weight read in nn.Linear layout.

The architecture (see `architecture`) says which tensors are linear weights when transformers can build
the config's class; otherwise they are guessed from tensor names and shapes (a bare .safetensors file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .architecture import Layout, Linear, layout
from .checkpoint import Checkpoint, split_by_size
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
    stored_as: str | None = None  # checkpoint tensor of W when not `<path>.weight` (renamed by transformers)
    tied_to: str | None = None  # the checkpoint tensor W shares when its own is not stored (a tied output layer)
    output: bool = False  # the model's output layer, which `all-linear` leaves out

    @property
    def weight(self) -> str:
        """The module's own weight tensor in the checkpoint (a merge writes W + ΔW there)."""
        return self.stored_as or f"{self.path}.weight"

    @property
    def source(self) -> str:
        """The checkpoint tensor W is read from."""
        return self.tied_to or self.weight

    @property
    def kind(self) -> str:
        """The module type: the last component of the path (q_proj, c_attn, ...)."""
        return self.path.rsplit(".", 1)[-1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def linear_targets(ckpt: Checkpoint) -> list[Target]:
    """Every linear module whose weight the checkpoint holds (tied output layers included), in checkpoint order.

    These are the nn.Linear / Conv1D modules of the architecture when transformers can build it (what PEFT
    sees), else the 2-D weights that do not look like embeddings.
    """
    arch = layout(ckpt.config)
    found = _from_layout(ckpt, arch) if arch is not None else []
    return found or guessed_targets(ckpt)


def find_targets(ckpt: Checkpoint, paths: Iterable[str], fan_in_fan_out: bool | None) -> dict[str, Target]:
    """The targets among `paths`: from names and shapes when these find every path (no architecture to build),
    else from `linear_targets` (renamed or tied weights). Paths that are no linear module are left out.

    Where the checkpoint cannot tell whether a weight is stored transposed (no config.json, no telling bias), the
    adapter's `fan_in_fan_out` decides; when the adapter does not say either (None), a square weight is refused.
    """
    paths = list(paths)
    found = {t.path: t for t in guessed_targets(ckpt)}
    if not all(p in found for p in paths):
        found = {t.path: t for t in linear_targets(ckpt)}
    return {p: _as_declared(ckpt, found[p], fan_in_fan_out) for p in paths if p in found}


def _as_declared(ckpt: Checkpoint, target: Target, fan_in_fan_out: bool | None) -> Target:
    """The target laid out as the adapter declares, where the checkpoint itself does not tell."""
    if _layout_told(ckpt, target) or fan_in_fan_out == target.conv1d:
        return target
    if fan_in_fan_out is None:
        if target.out_features != target.in_features:
            return target  # a wrong guess shows in the adapter's shapes, which are checked against it
        raise LrsError(f"cannot tell whether {ckpt.source.id} stores {target.weight} transposed (as GPT-2's Conv1D "
                       "does): it has no config.json and the adapter does not declare fan_in_fan_out; put the "
                       "model's config.json next to its weights or set fan_in_fan_out in adapter_config.json")
    return Target(target.path, target.in_features, target.out_features, fan_in_fan_out, output=target.output)


def _layout_told(ckpt: Checkpoint, target: Target) -> bool:
    """Whether the checkpoint says how the target's weight is stored: a config naming the model type, a tied
    weight or an output layer, or a bias sized like one dimension of a non-square weight."""
    if ckpt.config.get("model_type") or target.tied_to or target.stored_as or target.output:  # output layers: Linear
        return True
    bias = ckpt.tensors.get(f"{target.path}.bias")
    return bias is not None and target.out_features != target.in_features and len(bias.shape) == 1


def _from_layout(ckpt: Checkpoint, arch: Layout) -> list[Target]:
    """The layout's linear modules found in the checkpoint, whose names may lack the base model's prefix."""
    variants = [arch, arch.without_prefix()] if arch.prefix else [arch]
    found = max((_stored_targets(ckpt, v) for v in variants), key=len)
    order = {name: k for k, name in enumerate(ckpt.tensors)}
    return sorted(found, key=lambda t: (t.tied_to is not None, order[t.source]))


def _stored_targets(ckpt: Checkpoint, arch: Layout) -> list[Target]:
    targets = (_stored_target(ckpt, lin) for lin in arch.linears)
    return [t for t in targets if t is not None]


def _stored_target(ckpt: Checkpoint, lin: Linear) -> Target | None:
    """A module's Target when the checkpoint stores its weight, under its own name or one it is tied to."""
    stored = next((n for n in lin.names if n in ckpt.tensors), None)
    info = ckpt.tensors[stored] if stored else None
    if info is None or len(info.shape) != 2 or not info.dtype.is_floating_point:
        return None
    out_f, in_f = (info.shape[1], info.shape[0]) if lin.conv1d else info.shape
    own = stored == lin.names[0]
    renamed = own and stored != f"{lin.path}.weight"
    return Target(lin.path, out_f, in_f, lin.conv1d, stored_as=stored if renamed else None,
                  tied_to=None if own else stored, output=lin.output)


def guessed_targets(ckpt: Checkpoint) -> list[Target]:
    """Every 2-D weight that looks like a linear layer's (embeddings excluded by name), in checkpoint order."""
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
        targets.append(Target(path, out_f, in_f, conv1d, output=is_output_layer(path)))
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
    """lm_head and its kin by name, for checkpoints without an architecture."""
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
        if any((item == ALL_LINEAR and not t.output) or (item != ALL_LINEAR and matches(t.path, item))
               for item in items)
    ]
    if not chosen:
        ckpt.require_unquantized()  # GPTQ/AWQ/bitsandbytes store no float weights a linear module is found by
        raise LrsError(f"--targets {','.join(items)} matched no linear module; this model has: {', '.join(kinds(candidates))}")
    if any(t.conv1d for t in candidates):
        _refuse_untold_square(ckpt, chosen)
    return chosen


def _refuse_untold_square(ckpt: Checkpoint, chosen: Sequence[Target]) -> None:
    """In a checkpoint that stores some weights transposed (GPT-2's Conv1D), a square weight whose layout
    nothing tells could be either: refuse rather than take it for nn.Linear."""
    for t in chosen:
        if not t.conv1d and t.out_features == t.in_features and not _layout_told(ckpt, t):
            raise LrsError(f"cannot tell whether {ckpt.source.id} stores {t.weight} transposed, as it stores other "
                           "weights (GPT-2's Conv1D): it has no config.json naming the model type; put the model's "
                           "config.json next to its weights")


def kinds(targets: Iterable[Target]) -> list[str]:
    """Distinct module types, in order of appearance."""
    return list(dict.fromkeys(t.kind for t in targets))


def compact_names(chosen: Sequence[Target], ckpt: Checkpoint) -> list[str]:
    """Module types when PEFT's suffix matching of those names finds exactly the chosen modules, else full paths."""
    types = set(kinds(chosen))
    if {m for m in module_paths(ckpt) if m.rsplit(".", 1)[-1] in types} == {t.path for t in chosen}:
        return sorted(types)
    return [t.path for t in chosen]


def module_paths(ckpt: Checkpoint) -> set[str]:
    """The module paths of the checkpoint's model: the linear modules, and every dotted prefix of a tensor name
    but those of linear modules whose tensors transformers renames (they are not module paths of the model)."""
    targets = linear_targets(ckpt)
    renamed = {t.stored_as.removesuffix(".weight") for t in targets if t.stored_as}
    paths = {t.path for t in targets}
    for name in ckpt.tensors:
        parts = name.split(".")
        paths.update(".".join(parts[:k]) for k in range(1, len(parts)))
    return paths - renamed


def load_weight(ckpt: Checkpoint, target: Target) -> torch.Tensor:
    """A target's weight in nn.Linear layout (out × in), float32; NaN or Inf refused."""
    return linear_float32(ckpt.get_finite(target.source), target)


def linear_float32(stored: torch.Tensor, target: Target) -> torch.Tensor:
    """A target's weight as stored, in nn.Linear layout (out × in), float32."""
    w = stored.float()
    return w.T.contiguous() if target.conv1d else w


BATCH_BYTES = 2**26  # float32 weights read at once: memory follows the largest tensor, not the shard or the model


def in_batches(ckpt: Checkpoint, targets: Sequence[Target], budget: int = BATCH_BYTES) -> list[list[Target]]:
    """The targets in file order (shard by shard), in batches whose float32 weights stay within `budget` bytes
    (a larger weight alone); same-shape neighbours share a batch, so batched SVDs still batch."""
    by_shard: dict = {}
    for t in targets:
        by_shard.setdefault(ckpt.info(t.source).shard, []).append(t)
    ordered = [t for shard in by_shard.values() for t in shard]
    return split_by_size(ordered, lambda t: 4 * t.out_features * t.in_features, budget)
