"""GGUF LoRA adapters for llama.cpp's `--lora` (and Ollama, LM Studio): the file llama.cpp's own
convert_lora_to_gguf.py writes, from any adapter `lrs` can express exactly as a LoRA.

What llama.cpp reads (src/llama-adapter.cpp): `general.type` "adapter", `adapter.type` "lora", `adapter.lora.alpha`,
`general.architecture` equal to the base GGUF's, and per adapted weight `<gguf name>.weight.lora_a` (numpy shape
r × in) and `.lora_b` (out × r), applied as y += (alpha / r)·B·A·x with r read from lora_b. So a module's own scale
(rsLoRA, rank and alpha patterns) is folded into its B where it differs from alpha / r. The converter also applies to
lora_b every reordering of output rows llama.cpp's convert_hf_to_gguf.py applies to the base weight: the q/k rotary
permutation of the Llama family.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint import Checkpoint
from ..errors import LrsError

if TYPE_CHECKING:
    from ..adapter import Adapter

LORA_KEYS = ("lora_A.weight", "lora_B.weight")


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter treats one Hugging Face architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    permutes_qk: bool = False  # Llama's converter reorders q/k rows for its rotary layout (LlamaModel.permute)
    drops_lm_head: bool = False  # Gemma's converter skips lm_head: llama.cpp uses the tied embedding


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("LLAMA", permutes_qk=True),
    "MistralForCausalLM": Family("LLAMA", permutes_qk=True),  # llama.cpp converts Mistral as Llama
    "Qwen2ForCausalLM": Family("QWEN2"),
    "Qwen3ForCausalLM": Family("QWEN3"),
    "GemmaForCausalLM": Family("GEMMA", drops_lm_head=True),
    "Gemma2ForCausalLM": Family("GEMMA2", drops_lm_head=True),
    "Gemma3ForCausalLM": Family("GEMMA3", drops_lm_head=True),
    "Phi3ForCausalLM": Family("PHI3"),
}


def family_of(base: Checkpoint) -> tuple[str, Family]:
    """(architecture, Family) from the base's config.json, or a one-line refusal naming what is supported."""
    names = base.config.get("architectures") or []
    name = names[0] if names else None
    if name not in FAMILIES:
        raise LrsError(f"--to gguf supports {', '.join(FAMILIES)}; {base.source.id} is "
                       f"{name or 'an unknown architecture (config.json has no architectures)'}")
    return name, FAMILIES[name]


def write_gguf(adapter: Adapter, path: Path, base: Checkpoint) -> dict[str, str]:
    """Write the LoRA `adapter` (lora_A/lora_B per module) as llama.cpp's GGUF adapter; returns module -> GGUF name."""
    import gguf

    name, family = family_of(base)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    c = adapter.config
    alpha = c.alpha if c.alpha else float(c.r)  # llama.cpp reads alpha 0 as "scale 1", not as 0
    names = gguf_names(adapter, base, arch, family, name)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, gguf_name in names.items():
        a, b = (adapter.weights[module][k].float() for k in LORA_KEYS)
        b = b * (c.scale(module) * a.shape[0] / alpha)  # llama.cpp's scale is alpha / r: the rest goes into B
        if family.permutes_qk and module.endswith(("q_proj", "k_proj")):
            b = permute_rows(b, _heads(base, module))
        writer.add_tensor(f"{gguf_name}.lora_a", a.contiguous().numpy())
        writer.add_tensor(f"{gguf_name}.lora_b", b.contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return names


def gguf_names(adapter: Adapter, base: Checkpoint, arch, family: Family, architecture: str) -> dict[str, str]:
    """llama.cpp's tensor name (`blk.0.attn_q.weight`) for every adapted module, from gguf's own name map."""
    import gguf

    tensor_map = gguf.get_tensor_name_map(arch, int(base.config.get("num_hidden_layers", 0)))
    tied = base.config.get("tie_word_embeddings", False) or family.drops_lm_head
    names = {}
    for module in adapter.weights:
        if tied and module in gguf.TensorNameMap.mappings_cfg[gguf.MODEL_TENSOR.OUTPUT]:
            raise LrsError(f"{module} is tied to the token embedding in llama.cpp's {architecture}, which has no "
                           f"separate output tensor for a LoRA to adapt; leave {module} out of the adapter")
        mapped = tensor_map.get_name(module)
        if mapped is None:
            raise LrsError(f"llama.cpp has no tensor for {module} in {architecture}; leave it out of the adapter")
        names[module] = f"{mapped}.weight"
    return names


def _heads(base: Checkpoint, module: str) -> int:
    """Heads whose rows llama.cpp's converter permutes: attention heads for q, key-value heads for k."""
    heads = base.config["num_attention_heads"]
    if module.endswith("k_proj"):
        return base.config.get("num_key_value_heads") or heads
    return heads


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's rows from (first halves, second halves) interleaved as llama.cpp's rotary kernel reads them:
    convert_hf_to_gguf.py's LlamaModel.permute, applied to what ends up as a weight's output rows."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)
