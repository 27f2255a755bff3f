"""Attach an adapter to a transformers model: each targeted linear is wrapped in an AdapterLayer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapter import Adapter
from .checkpoint import check_finite
from .device import whole
from .errors import LrsError
from .methods import Method, get_method
from .targets import Target, linear_float32


class AdapterLayer(nn.Module):
    """A frozen base linear plus one method's parameters; the method computes the forward."""

    def __init__(self, base: nn.Module, method: Method, path: str, params: dict[str, torch.Tensor], conv1d: bool):
        super().__init__()
        self.base_layer = base
        self.method = method
        self.path = path
        self.conv1d = conv1d
        self.names = list(params)
        self.adapter = nn.ParameterDict({
            _slot(name): nn.Parameter(t.detach().clone().float(), requires_grad=name not in method.frozen)
            for name, t in params.items()
        })

    @property
    def weight(self) -> torch.Tensor:
        """The base weight in nn.Linear layout (out × in), a transposed view for Conv1D."""
        w = self.base_layer.weight
        return w.T if self.conv1d else w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def params(self) -> dict[str, torch.Tensor]:
        """The adapter parameters under their on-disk names."""
        return {name: self.adapter[_slot(name)] for name in self.names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.forward(self, x)

    def extra_repr(self) -> str:
        return f"method={self.method.name}, path={self.path}"


def _slot(name: str) -> str:
    """ParameterDict keys cannot hold dots."""
    return name.replace(".", "__")


def attach(model: nn.Module, adapter: Adapter,
           stored_weight: Callable[[nn.Module], torch.Tensor] | None = None) -> nn.Module:
    """Wrap every module the adapter targets (in place); base parameters are frozen. Returns the model.

    stored_weight(module): a targeted module's weight as its checkpoint stores it, read where the model's own weights
    are not loaded yet (on the meta device) and an imported adapter needs W to complete its parameters."""
    method = get_method(adapter.config)  # the model's own: training state (CoLA's random draws) starts afresh
    if adapter.saved:
        raise LrsError(f"attach does not take whole modules (modules_to_save: {', '.join(adapter.config.modules_to_save)}); "
                       "use PEFT, or lrs merge")
    for p in model.parameters():
        p.requires_grad_(False)
    located = {path: _find_module(model, path) for path in adapter.weights}
    targets = {path: module_target(path, module) for path, (_, _, module) in located.items()}
    weight_of = stored_weight or (lambda module: module.weight.detach())
    method.complete(adapter.weights, lambda path: linear_float32(
        check_finite(weight_of(located[path][2]), f"{path}.weight", "the model"), targets[path]))
    for path, params in adapter.weights.items():
        parent, child_name, module = located[path]
        target = targets[path]
        method.validate(target)
        method.check_fits(target, params)
        layer = AdapterLayer(module, method, path, params, target.conv1d).to(module.weight.device)
        setattr(parent, child_name, layer)
    return model


def module_target(path: str, module: nn.Module) -> Target:
    """The Target of a live nn.Linear or transformers Conv1D."""
    if isinstance(module, nn.Linear):
        return Target(path, module.out_features, module.in_features)
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:
        return Target(path, module.weight.shape[1], module.weight.shape[0], conv1d=True)
    raise LrsError(f"adapter targets {path}, which is a {type(module).__name__}, not a linear layer")


def _find_module(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """Locate a module by checkpoint path, tolerating a base-model prefix present on one side only."""
    prefix = getattr(model, "base_model_prefix", "")
    tries = [path]
    if prefix and path.startswith(prefix + "."):
        tries.append(path[len(prefix) + 1:])
    elif prefix:
        tries.append(f"{prefix}.{path}")
    for candidate in tries:
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        parent_path, _, child = candidate.rpartition(".")
        return model.get_submodule(parent_path), child, module
    raise LrsError(f"adapter does not fit the model: it has no module {path}")


def adapter_layers(model: nn.Module) -> list[AdapterLayer]:
    return [m for m in model.modules() if isinstance(m, AdapterLayer)]


def trained_weights(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The current adapter parameters of an attached model, detached on the CPU in float32; sharded ones gathered
    (under `lrs train --shard` every process must call this)."""
    return {layer.path: {n: whole(t.detach()).float().cpu().clone() for n, t in layer.params().items()}
            for layer in adapter_layers(model)}


def detach(model: nn.Module) -> nn.Module:
    """Put the base layers back (in place), dropping the adapter."""
    for name, module in list(model.named_modules()):
        if isinstance(module, AdapterLayer):
            parent_path, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_path), child, module.base_layer)
    return model
