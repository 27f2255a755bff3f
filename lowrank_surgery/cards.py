"""Model cards (README.md with YAML metadata) for adapters, merged checkpoints and subspaces.

A card is YAML metadata the Hub reads (base_model, library_name, tags, pipeline_tag) and a
body. The part of the body lrs writes sits between two HTML comments, so that a later push
refreshes it and the metadata while keeping whatever the user wrote around it.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import LrsError
from .formats.gguf import FAMILIES

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from .adapter import Adapter

TAG = "lowrank-surgery"
HOMEPAGE = "https://github.com/lowrank-surgery/lowrank-surgery"
BEGIN, END = "<!-- lrs:begin -->", "<!-- lrs:end -->"
CORA_PAPER = ("CoRA", "https://arxiv.org/abs/2409.02119")  # the subspaces' card links it too
# PEFT's tuner prefix per peft_type: an adapter loads in stock PEFT when all its tensors carry it.
PEFT_PREFIXES = {"LORA": "lora_", "MISS": "miss_"}
# peft_types whose PEFT layers also wrap transformers' Conv1D (GPT-2): MiSS takes nn.Linear only.
PEFT_CONV1D = {"LORA"}
# (architecture suffix, pipeline tag, transformers auto class), first match wins.
PIPELINES = (
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("Model", "feature-extraction", "AutoModel"),
)


# ------------------------------------------------------------------------------------ metadata helpers
def hub_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub model id (namespace/name), None for local paths and the unknown."""
    from huggingface_hub.utils import validate_repo_id
    from huggingface_hub.errors import HFValidationError

    if not name or name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _pipeline(config: dict | None) -> tuple[str, str] | None:
    """(pipeline tag, auto class) from config.json's architectures."""
    for arch in (config or {}).get("architectures") or []:
        for suffix, tag, auto in PIPELINES:
            if str(arch).endswith(suffix):
                return tag, auto
    return None


def base_config(base: str | None) -> dict | None:
    """config.json of a base model from its local directory or the Hub cache; never the network."""
    if not base:
        return None
    path = Path(base).expanduser() / "config.json"
    if not path.is_file() and hub_id(base):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base, "config.json")
        path = Path(cached) if isinstance(cached, str) else path
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_metrics(directory: Path) -> dict[str, Any] | None:
    """Summary of metrics.jsonl (written by `lrs train`): steps, last loss, last eval loss."""
    path = Path(directory) / "metrics.jsonl"
    if not path.is_file():
        return None
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise LrsError(f"{path}:{number}: not valid JSON") from None
    last = lambda key: next((r[key] for r in reversed(records) if r.get(key) is not None), None)  # noqa: E731
    summary = {"steps": last("step"), "loss": last("loss"), "eval_loss": last("eval_loss")}
    return {k: v for k, v in summary.items() if v is not None} or None


def peft_loadable(adapter: Adapter) -> bool:
    """True when stock PEFT loads the adapter: a PEFT type whose tensors all carry its prefix, on layers it wraps."""
    peft_type = adapter.method.peft_type
    prefix = PEFT_PREFIXES.get(peft_type)
    return prefix is not None and all(n.startswith(prefix) for n in adapter.method.param_names) and (
        not adapter.config.fan_in_fan_out or peft_type in PEFT_CONV1D)


def _tags(*tags: str | None) -> list[str]:
    return list(dict.fromkeys(t for t in (TAG, *tags) if t))


# ------------------------------------------------------------------------------------ card assembly
def front_matter(meta: dict) -> str:
    """The YAML block of a card, written by huggingface_hub so the Hub reads it as intended."""
    from huggingface_hub import ModelCardData

    return f"---\n{ModelCardData(**meta).to_yaml()}\n---\n"


def parse_card(text: str, source: str = "README.md") -> ModelCard:
    """A ModelCard from README text; malformed metadata is a one-line LrsError naming the file."""
    from huggingface_hub import ModelCard

    if not text.startswith("---"):  # no metadata block: all body (and no warning from huggingface_hub)
        return ModelCard("---\n\n---\n" + text)
    try:
        return ModelCard(text)
    except Exception as exc:  # yaml raises several kinds; the message is what matters
        raise LrsError(f"{source}: invalid YAML metadata: {str(exc).splitlines()[0]}") from None


def update_card(existing: str | None, meta: dict, section: str | None, source: str = "README.md") -> str:
    """A card with `meta` refreshed over the existing metadata and the lrs section replaced.

    The user's metadata keys and tags stay; None values in `meta` keep what is there. With
    `section` None the existing body is kept as it is.
    """
    card = parse_card(existing or "", source)
    data = card.data.to_dict()
    for key, value in meta.items():
        if key == "tags":
            data["tags"] = list(dict.fromkeys([*value, *(data.get("tags") or [])]))
        elif value is not None:
            data[key] = value
    body = card.text if existing else ""
    if section is not None:
        block = f"{BEGIN}\n{section.strip()}\n{END}\n"
        pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
        if pattern.search(body):
            body = pattern.sub(lambda _: block, body, count=1)
        else:
            body = f"{body.rstrip()}\n\n{block}" if body.strip() else f"\n{block}"
    return front_matter(data) + body


def _table(rows: Sequence[tuple[str, Any]], header: str = "setting") -> str:
    lines = [f"| {header} | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows if v is not None]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value).replace("|", "\\|")


def _method_line(name: str, paper: tuple[str, str] | None) -> str:
    """The method's name, linked to its paper (the method's `paper`)."""
    return f"[{paper[0]}]({paper[1]})" if paper else f"`{name}`"


def _code(language: str, lines: Sequence[str]) -> str:
    return f"```{language}\n" + "\n".join(lines) + "\n```\n"


# ------------------------------------------------------------------------------------ adapters
def adapter_metadata(adapter: Adapter) -> dict[str, Any]:
    c = adapter.config
    pipeline = _pipeline(base_config(c.base_model))
    peft_tag = adapter.method.peft_type.lower() if peft_loadable(adapter) else None
    return {"base_model": hub_id(c.base_model), "library_name": "peft", "tags": _tags(c.method, peft_tag),
            "pipeline_tag": pipeline[0] if pipeline else None}


def adapter_section(adapter: Adapter, repo_id: str | None = None, metrics: dict | None = None,
                    images: Sequence[str] = ()) -> str:
    """The body lrs writes for an adapter: recipe, training metrics, how to load it."""
    c = adapter.config
    base = c.base_model or "an unnamed base model"
    rows = [("method", c.method), ("peft_type", adapter.method.peft_type), ("rank r", c.r), ("alpha", c.alpha),
            ("rsLoRA", c.rslora or None), ("dropout", c.dropout), ("target modules", c.target_modules),
            ("adapted modules", len(adapter.weights)), ("parameters", adapter.num_parameters()),
            ("trainable parameters", adapter.num_parameters(trainable_only=True)),
            *sorted(c.options.items()), ("rank pattern", c.rank_pattern or None),
            ("alpha pattern", c.alpha_pattern or None), *sorted(c.provenance.items())]
    text = (f"# {c.method} adapter for {base}\n\n"
            f"A {_method_line(c.method, adapter.method.paper)} adapter made with [lowrank-surgery]({HOMEPAGE}) (`lrs`).\n\n"
            f"## Method and hyperparameters\n\n{_table(rows)}\n")
    if metrics:
        rows = [("steps", metrics.get("steps")), ("final training loss", metrics.get("loss")),
                ("final eval loss", metrics.get("eval_loss"))]
        plots = "".join(f"\n![{Path(i).stem}]({i})\n" for i in images)
        text += f"## Training\n\n{_table(rows, 'metric')}{plots}\n"
    return text + "## Usage\n\n" + _adapter_snippet(adapter, repo_id)


def _adapter_snippet(adapter: Adapter, repo_id: str | None) -> str:
    c = adapter.config
    base = json.dumps(hub_id(c.base_model) or "path/to/base-model")
    pipeline = _pipeline(base_config(c.base_model))
    auto = pipeline[1] if pipeline else "AutoModelForCausalLM"
    if peft_loadable(adapter):
        where = json.dumps(repo_id or "path/to/adapter")
        return _code("python", ["from peft import PeftModel", f"from transformers import {auto}", "",
                                f"base = {auto}.from_pretrained({base})",
                                f"model = PeftModel.from_pretrained(base, {where})"]) + _gguf_hint(adapter)
    load = f"snapshot_download({json.dumps(repo_id)})" if repo_id else '"path/to/adapter"'
    imports = ["from huggingface_hub import snapshot_download"] if repo_id else []
    return (_code("python", ["import lowrank_surgery as lrs", *imports, f"from transformers import {auto}", "",
                             f"model = {auto}.from_pretrained({base})",
                             f"model = lrs.attach(model, lrs.load_adapter({load}))"])
            + f"\nThis method needs `lrs` to load; {_export_hint(adapter, 'peft-lora', 'adapter-lora')} exports it to "
              f"a PEFT LoRA{'' if adapter.method.low_rank else ' (a truncated SVD: its update is not low-rank)'}.\n"
            + _gguf_hint(adapter))


def _export_hint(adapter: Adapter, to: str, out: str) -> str:
    """The `lrs convert` command line that exports the adapter, as it runs."""
    lossy = "" if adapter.method.low_rank else " --allow-lossy"
    base = shlex.quote(adapter.config.base_model) if adapter.config.base_model else "BASE"
    return f"`lrs convert ADAPTER {out} --to {to} --base {base}{lossy}` (ADAPTER: this directory)"


def _gguf_hint(adapter: Adapter) -> str:
    """For bases llama.cpp's layout is known for: the command that makes its --lora file."""
    architectures = (base_config(adapter.config.base_model) or {}).get("architectures") or [None]
    if architectures[0] not in FAMILIES:
        return ""
    return (f"\nFor llama.cpp, Ollama or LM Studio, {_export_hint(adapter, 'gguf', 'adapter.gguf')} writes the "
            f"file `llama-cli -m BASE.gguf --lora adapter.gguf` loads.\n")


def adapter_card(adapter: Adapter, repo_id: str | None = None, metrics: dict | None = None,
                 images: Sequence[str] = (), existing: str | None = None) -> str:
    """A card for an adapter directory (updating `existing` README text when given)."""
    return update_card(existing, adapter_metadata(adapter), adapter_section(adapter, repo_id, metrics, images))


# ------------------------------------------------------------------------------------ merged checkpoints
def merged_metadata(config: dict, base_model: str | None = None, adapter: Adapter | None = None,
                    operation: str | None = "merge") -> dict[str, Any]:
    """Metadata of a full checkpoint; operation None for one lrs did not write (no `merge` tag)."""
    pipeline = _pipeline(config)
    return {"base_model": hub_id(base_model), "library_name": "transformers",
            "tags": _tags(operation, adapter.config.method if adapter else None),
            "pipeline_tag": pipeline[0] if pipeline else None}


def merged_section(config: dict, base_model: str | None = None, adapter: Adapter | None = None, *,
                   adapter_source: str | None = None, base_revision: str | None = None,
                   operation: str | None = "merge", dtype: str | None = None, repo_id: str | None = None) -> str:
    pipeline = _pipeline(config)
    auto = pipeline[1] if pipeline else "AutoModel"
    verb = {"merge": "merged into", "unmerge": "removed from"}.get(operation or "")
    title = f"{base_model or 'A model'} with an adapter {verb} it" if verb else (base_model or "Checkpoint")
    made = f"written by `lrs {operation}`" if operation else "pushed"
    rows = [("operation", operation), ("base model", base_model), ("base revision", base_revision),
            ("adapter", adapter_source), ("architecture", config.get("architectures")), ("dtype", dtype)]
    if adapter is not None:
        c = adapter.config
        rows += [("method", c.method), ("rank r", c.r), ("alpha", c.alpha), ("target modules", c.target_modules),
                 *sorted(c.options.items())]
    where = json.dumps(repo_id or "path/to/checkpoint")
    return (f"# {title}\n\nA full checkpoint {made} with [lowrank-surgery]({HOMEPAGE}); "
            f"it loads like any transformers model.\n\n{_table(rows)}\n## Usage\n\n"
            + _code("python", [f"from transformers import {auto}", "", f"model = {auto}.from_pretrained({where})"]))


def merged_card(config: dict, base_model: str | None = None, adapter: Adapter | None = None, *,
                adapter_source: str | None = None, base_revision: str | None = None,
                operation: str | None = "merge", dtype: str | None = None, repo_id: str | None = None,
                existing: str | None = None) -> str:
    """A card for a checkpoint written by `lrs merge` / `lrs unmerge` (`config` is its config.json)."""
    section = merged_section(config, base_model, adapter, adapter_source=adapter_source,
                             base_revision=base_revision, operation=operation, dtype=dtype, repo_id=repo_id)
    return update_card(existing, merged_metadata(config, base_model, adapter, operation), section)


# ------------------------------------------------------------------------------------ subspaces
def _model_ids(info: dict) -> list[str]:
    models = info.get("models") or []
    return [m.get("id") if isinstance(m, dict) else str(m) for m in models]


def subspace_metadata(info: dict) -> dict[str, Any]:
    bases = [m for m in map(hub_id, _model_ids(info)) if m]
    return {"base_model": bases or None, "tags": _tags("cora", "subspace")}


def subspace_section(info: dict, repo_id: str | None = None) -> str:
    """The body for a subspace directory: how it was computed, captured energy, how to use it."""
    rows = []
    for key, value in info.items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            values = list(value.values())
            value = f"{len(values)} entries, min {min(values):.4g}, mean {sum(values) / len(values):.4g}, " \
                    f"max {max(values):.4g}"
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            value = [" @ ".join(str(v) for v in item.values() if v) for item in value]
        rows.append((key, value))
    models = _model_ids(info)
    fetch = ["from huggingface_hub import snapshot_download", "",
             f"path = snapshot_download({json.dumps(repo_id)})"] if repo_id else ["", 'path = "path/to/subspace"']
    base = json.dumps(models[0] if models else "path/to/base-model")
    return (f"# CoRA common subspace{' of ' + ', '.join(models) if models else ''}\n\n"
            f"Orthonormal bases (`<name>.basis`, out × r) and singular values for {_method_line('cora', CORA_PAPER)} "
            f"adapters, computed by `lrs extract-subspace` ([lowrank-surgery]({HOMEPAGE})).\n\n"
            f"{_table(rows)}\n## Usage\n\n"
            + _code("python", ["import lowrank_surgery as lrs", *fetch,
                               f'adapter = lrs.init_adapter("cora", {base}, r={info.get("rank", 8)}, '
                               'options={"subspace": path})']))


def subspace_card(info: dict, repo_id: str | None = None, existing: str | None = None) -> str:
    """A card for a subspace directory (`info` is its subspace.json)."""
    return update_card(existing, subspace_metadata(info), subspace_section(info, repo_id))
