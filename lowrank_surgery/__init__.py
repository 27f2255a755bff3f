"""lowrank-surgery: surgery on low-rank adapters of large language models.

The whole command line is available as functions:

    import lowrank_surgery as lrs
    adapter = lrs.init_adapter("lora", "path/to/model", r=8, targets="all-linear")
    lrs.save_adapter(adapter, "my-adapter")
    model = lrs.attach(AutoModelForCausalLM.from_pretrained("path/to/model"), lrs.load_adapter("my-adapter"))
    lrs.merge_adapter("my-adapter", "path/to/model", "merged")
"""

from .adapter import Adapter, default_adapter_out, load_adapter, save_adapter
from .attach import AdapterLayer, attach, detach, trained_weights
from .checkpoint import Checkpoint, resolve_model
from .config import AdapterConfig
from .convert import convert as convert_adapter
from .errors import LrsError, LrsWarning
from .extract import extract_lora
from .hub import push as push_to_hub
from .initialize import init_adapter
from .inspect import inspect_path
from .merge import merge as merge_adapter, unmerge as unmerge_adapter
from .methods import METHODS, get_method
from .subspace import default_subspace_out, extract_subspace
from .targets import Target, select_targets
from .train import train as train_adapter

__all__ = [
    "Adapter", "AdapterConfig", "AdapterLayer", "Checkpoint", "LrsError", "LrsWarning", "METHODS", "Target", "attach",
    "convert_adapter", "default_adapter_out", "default_subspace_out", "detach", "extract_lora", "extract_subspace",
    "get_method", "init_adapter", "inspect_path", "load_adapter", "merge_adapter", "push_to_hub", "resolve_model",
    "save_adapter", "select_targets", "trained_weights", "train_adapter", "unmerge_adapter",
]
