"""lowrank-surgery: surgery on low-rank adapters of large language models.

The whole command line is available as functions:

    import lowrank_surgery as lrs
    adapter = lrs.init_adapter("lora", "path/to/model", r=8, targets="all-linear")
    lrs.save_adapter(adapter, "my-adapter")
    model = lrs.attach(AutoModelForCausalLM.from_pretrained("path/to/model"), lrs.load_adapter("my-adapter"))
"""

from .adapter import Adapter, AdapterConfig, load_adapter, save_adapter
from .attach import AdapterLayer, attach, detach, trained_weights
from .checkpoint import Checkpoint, resolve_model
from .errors import LrsError
from .initialize import init_adapter
from .inspect import inspect_path
from .methods import METHODS, get_method
from .targets import Target, select_targets

__all__ = [
    "Adapter", "AdapterConfig", "AdapterLayer", "Checkpoint", "LrsError", "METHODS", "Target", "attach", "detach",
    "get_method", "init_adapter", "inspect_path", "load_adapter", "resolve_model", "save_adapter", "select_targets",
    "trained_weights",
]
