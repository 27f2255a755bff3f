"""The interface every method implements: its parameters, init, ΔW and training forward.

Merge, unmerge, export, the training layer and the kernels are all derived from these few
functions, so nothing downstream ever needs to know a method's name. Most methods are a
low-rank pair: ΔW = s·B_eff·A_eff, given by `pair`; the rest override `delta` (and `forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import torch

from ..config import AdapterConfig, Options, split_key
from ..errors import LrsError
from ..targets import Target

Params = Mapping[str, torch.Tensor]


class Layer(Protocol):
    """What a method's forward reads from the layer it runs in (attach.AdapterLayer)."""

    path: str
    training: bool

    @property
    def weight(self) -> torch.Tensor:
        """The base weight in nn.Linear layout (out × in)."""

    @property
    def bias(self) -> torch.Tensor | None: ...

    def params(self) -> dict[str, torch.Tensor]:
        """The method's tensors, by their on-disk names."""


Weights = dict[str, dict[str, torch.Tensor]]  # per module path, the method's named tensors


class Method:
    """One adapter method, bound to its config."""

    name: ClassVar[str]
    peft_type: ClassVar[str]
    needs_base_weight: ClassVar[bool] = False  # init (or ΔW) reads the base weight W
    Options: ClassVar[type[Options]] = Options  # the method's own settings (AdapterConfig.options), typed
    paper: ClassVar[tuple[str, str] | None] = None  # (name, link) for model cards
    completable: ClassVar[frozenset[str]] = frozenset()  # parameters an imported adapter may lack: see `complete`

    def __init__(self, config: AdapterConfig):
        if not isinstance(config.options, self.Options):  # given as a mapping (init, files): typed and checked here
            config.options = self.Options.build(config.options, self.name)
        self.config = config

    @classmethod
    def peft_types(cls) -> tuple[str, ...]:
        """peft_type values this method reads (the first is the one it writes)."""
        return (cls.peft_type,)

    @classmethod
    def default_targets(cls, options: Options) -> str:
        """--targets when the user gives none."""
        return "all-linear"

    @classmethod
    def config_from_json(cls, data: dict[str, Any], declared: Mapping[str, Any]) -> AdapterConfig:
        """An AdapterConfig from adapter_config.json contents; `declared`: options the user states because the
        file cannot (only names of this method's Options)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ parameters
    @property
    def param_names(self) -> tuple[str, ...]:
        """Tensor names under each module path, as stored on disk."""
        raise NotImplementedError

    @property
    def frozen(self) -> set[str]:
        """Parameter names that never train."""
        return set()

    @property
    def draws_in_forward(self) -> bool:
        """The training forward draws at random (CoLA random), so a recomputed forward is not the same one."""
        return False

    @property
    def low_rank(self) -> bool:
        """ΔW is s·B·A for the pair `pair` gives: the adapter exports to LoRA exactly."""
        return True

    def param_shapes(self, target: Target) -> dict[str, tuple[int, ...]]:
        """Expected shape of every parameter for a module of this shape."""
        raise NotImplementedError

    def validate(self, target: Target) -> None:
        """Raise LrsError (naming module and shapes) if the method cannot adapt this module."""
        r = self.config.rank(target.path)
        if r < 1:
            raise LrsError(f"rank {r} for {target.path} must be at least 1")
        if r > self.max_rank(target):
            raise LrsError(f"rank {r} is larger than {target.path} allows (shape {target.out_features}x{target.in_features})")

    def max_rank(self, target: Target) -> int:
        """The largest rank `validate` accepts. A pair B·A takes any rank, as PEFT does (r above min(out, in),
        e.g. on a 2-label classifier head, only wastes parameters); a rank above both dimensions is refused as a slip."""
        return max(target.out_features, target.in_features)

    def init(self, targets: Sequence[Target], weights: Sequence[torch.Tensor] | None,
             generator: torch.Generator, device: str | torch.device = "auto") -> list[dict[str, torch.Tensor]]:
        """Initial parameters for a batch of modules (weights given, float32, when needs_base_weight); `device` is
        where the method computes (PiSSA's and CoLA's SVDs), the parameters are on the CPU."""
        raise NotImplementedError

    def complete(self, weights: dict[str, dict[str, torch.Tensor]], base_weight: Callable[[str], torch.Tensor]) -> None:
        """Fill in, in place, the `completable` parameters an adapter lacks from the base weights.

        `base_weight(path)` gives W (float32, nn.Linear layout). Callers that hold the base (attach,
        merge, convert with --base) call this before using an adapter; it is a no-op when nothing is missing.
        """

    # ------------------------------------------------------------------ maths
    def scale(self, path: str) -> float:
        """s in ΔW = s·B·A for the module at `path`: α/r (rsLoRA, patterns) unless the method has its own."""
        return self.config.scale(path)

    def pair(self, params: Params, shape: tuple[int, int] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B_eff, A_eff) with ΔW = scale·B_eff·A_eff, or None when ΔW is not low-rank.

        `shape` is the module's (out, in): methods whose parameters do not carry it (FOSSIL's fold) need it.
        """
        return None

    def delta(self, params: Params, path: str, shape: tuple[int, int], weight: torch.Tensor | None = None
              ) -> torch.Tensor:
        """ΔW in nn.Linear layout (out × in = `shape`), float32; `weight` W for methods whose ΔW depends on it."""
        pair = self.pair(params, shape)
        if pair is None:
            raise NotImplementedError(f"{self.name} must override delta()")
        b, a = (t.float() for t in pair)
        return (b @ a) * self.scale(path)

    def merge(self, weight: torch.Tensor, params: Params, path: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """W' = W + ΔW, in float32 (or float64 where a method needs it).

        `out` is a float32 buffer of W's shape (it may be `weight` itself) that the method may write its result
        into and return, sparing a fresh allocation; callers use the returned tensor either way.
        """
        return self._shift(weight.float(), params, path, 1.0, out)

    def unmerge(self, merged: torch.Tensor, params: Params, path: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The W with merge(W) = merged (`out` as in `merge`)."""
        return self._shift(merged.float(), params, path, -1.0, out)

    def unmerge_error(self, error: torch.Tensor, params: Params) -> torch.Tensor:
        """An entrywise bound on how far unmerge's result moves when its input moves by at most `error` (entrywise,
        non-negative): as far as its input here, unmerge being W' − ΔW with ΔW independent of W'."""
        return error

    def _shift(self, w: torch.Tensor, params: Params, path: str, sign: float, out: torch.Tensor | None) -> torch.Tensor:
        """w ± ΔW: for a low-rank ΔW = s·B·A one fused addmm with no ΔW temporary, else through `delta`."""
        shape = tuple(w.shape)
        pair = self.pair(params, shape)
        if pair is None:
            return torch.add(w, self.delta(params, path, shape, w if sign > 0 else None), alpha=sign, out=out)
        b, a = (t.to(w.dtype) for t in pair)
        return torch.addmm(w, b, a, alpha=sign * self.scale(path), out=out)

    # ------------------------------------------------------------------ training
    def forward(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        """The adapted layer's output; low-rank methods go through the fused low-rank kernel."""
        from .. import kernels

        b, a = self.pair(layer.params(), tuple(layer.weight.shape))
        dropout = self.config.dropout if layer.training else 0.0
        return kernels.lowrank_linear(x, layer.weight, layer.bias, a, b, self.scale(layer.path), dropout)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        """adapter_config.json contents: the PEFT fields plus the `lrs` block."""
        raise NotImplementedError

    def export_native(self, weights: Weights) -> tuple[Weights, AdapterConfig, dict[str, Any]]:
        """(weights, config, adapter_config.json contents) as the reference code of this method's on-disk format
        loads them (`lrs convert --to` that format), warning where it will not. By default lrs's own files, which
        that code reads as they are."""
        self.warn_native()
        return weights, self.config, self.to_json()

    def warn_native(self) -> None:
        """Warn where the reference code of lrs's own on-disk format for this method cannot load this adapter,
        naming the route that works instead; whenever lrs writes such files (init, convert)."""

    def split_keys(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Group state-dict keys by module path; keys that do not fit the method are an error."""
        weights: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            parts = split_key(key, self.param_names)
            if parts is None:
                raise LrsError(f"adapter declares method {self.name} but has key {key} "
                               f"(expected names ending in {', '.join(self.param_names)})")
            weights.setdefault(parts[0], {})[parts[1]] = tensor
        if not weights:
            raise LrsError(f"adapter declares method {self.name} but holds no tensors")
        return weights

    def check_weights(self, weights: Mapping[str, Params]) -> None:
        """Every module has exactly this method's parameters."""
        for path, params in weights.items():
            missing = set(self.param_names) - set(params) - self.completable
            if missing:
                raise LrsError(f"adapter module {path} lacks {', '.join(sorted(missing))} for method {self.name}")

    def check_fits(self, target: Target, params: Params) -> None:
        """The parameters have the shapes this method needs for the base module `target`."""
        for name, shape in self.param_shapes(target).items():
            if name in params and tuple(params[name].shape) != shape:
                raise LrsError(f"adapter does not fit the base: {target.path}.{name} has shape {list(params[name].shape)}, "
                               f"but base module {target.path} ({target.out_features}x{target.in_features}) needs {list(shape)}")
