"""Model cards (README.md with YAML metadata) for the directories lrs writes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .adapter import Adapter


def front_matter(meta: dict) -> str:
    """YAML front matter; values are JSON scalars/lists, which YAML reads as they are."""
    lines = ["---"]
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(v)}" for v in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def adapter_card(adapter: Adapter) -> str:
    """A card for an adapter directory: metadata PEFT and the Hub understand, the recipe, a loading snippet."""
    c = adapter.config
    meta = {"base_model": c.base_model, "library_name": "peft", "tags": ["lowrank-surgery", c.method, "lora"]}
    options = "".join(f"| {k} | {v} |\n" for k, v in sorted(c.options.items()))
    return (
        front_matter(meta)
        + f"\n# {c.method} adapter for {c.base_model}\n\n"
        + f"Made with [lowrank-surgery](https://github.com/lowrank-surgery/lowrank-surgery) (`lrs`).\n\n"
        + "| setting | value |\n|---|---|\n"
        + f"| method | {c.method} |\n| rank | {c.r} |\n| alpha | {c.alpha} |\n| dropout | {c.dropout} |\n"
        + f"| modules | {len(adapter.weights)} |\n| parameters | {adapter.num_parameters():,} |\n"
        + options
        + "\n## Load\n\n```python\nimport lowrank_surgery as lrs\nfrom transformers import AutoModelForCausalLM\n\n"
        + f"model = AutoModelForCausalLM.from_pretrained({json.dumps(c.base_model)})\n"
        + "model = lrs.attach(model, lrs.load_adapter(\"path/to/adapter\"))\n```\n"
    )
