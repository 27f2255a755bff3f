"""Generate a random Llama-shaped checkpoint in bf16 shards, tensor by tensor.

    python benchmarks/make_llama.py runs/llama-1b [--preset llama3.2-1b] [--layers N] [--max-shard-size 500MB]
    python benchmarks/make_llama.py runs/llama-8b --preset llama3-8b

Presets follow the real models' shapes: llama3.2-1b (the default; hidden 2048, MLP 8192, 16 layers, GQA 32/8,
vocab 128256, tied embeddings, 500 MB shards: 1.24B parameters) and llama3-8b (hidden 4096, MLP 14336, 32 layers,
GQA 32/8, vocab 128256, untied lm_head, 5 GB shards: 8.03B parameters, 16 GB). Weights are random (std 0.02,
norms ones). Only one tensor is in memory at a time (float32 while drawn: 2.1 GB for the 8B's embedding).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowrank_surgery.checkpoint import PlannedTensor, atomic_output, write_sharded

PRESETS = {
    "llama3.2-1b": {"layers": 16, "hidden": 2048, "mlp": 8192, "tied": True, "max_shard_size": "500MB"},
    "llama3-8b": {"layers": 32, "hidden": 4096, "mlp": 14336, "tied": False, "max_shard_size": "5GB"},
}
DEFAULT_PRESET = "llama3.2-1b"


def llama_config(layers: int, hidden: int = 2048, mlp: int = 8192, heads: int = 32, kv_heads: int = 8,
                 vocab: int = 128256, tied: bool = True) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": tied,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def tensor_plan(cfg: dict, dtype: torch.dtype) -> list[PlannedTensor]:
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    plan = [PlannedTensor("model.embed_tokens.weight", dtype, (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                  "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}
        plan += [PlannedTensor(p + name + ".weight", dtype, shape) for name, shape in shapes.items()]
        plan += [PlannedTensor(p + "input_layernorm.weight", dtype, (h,)),
                 PlannedTensor(p + "post_attention_layernorm.weight", dtype, (h,))]
    plan.append(PlannedTensor("model.norm.weight", dtype, (h,)))
    return plan if cfg["tie_word_embeddings"] else plan + [PlannedTensor("lm_head.weight", dtype, (v, h))]


def generate(out: Path, preset: str = DEFAULT_PRESET, layers: int | None = None, max_shard_size: str | None = None,
             seed: int = 0, **shape) -> Path:
    """Write the preset's checkpoint to `out` (reused if it already holds one); `layers`, `max_shard_size` and
    `shape` (llama_config's hidden, mlp, vocab, ...) override the preset's."""
    if (out / "config.json").is_file():
        return out
    preset_shape = {k: v for k, v in PRESETS[preset].items() if k != "max_shard_size"}
    shard_size = max_shard_size or PRESETS[preset]["max_shard_size"]
    cfg = llama_config(**{**preset_shape, **shape, **({} if layers is None else {"layers": layers})})
    gen = torch.Generator().manual_seed(seed)

    def weight(t: PlannedTensor) -> torch.Tensor:  # norms are ones; the writer casts to the planned dtype
        return torch.ones(t.shape) if len(t.shape) == 1 else torch.randn(t.shape, generator=gen) * 0.02

    with atomic_output(out) as tmp:
        write_sharded(tmp, tensor_plan(cfg, torch.bfloat16), weight, shard_size, always_index=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET)
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--max-shard-size", help="override the preset's shard size (e.g. 500MB)")
    args = parser.parse_args()
    print(generate(args.out, args.preset, args.layers, args.max_shard_size))


if __name__ == "__main__":
    main()
