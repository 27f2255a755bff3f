"""Generate a random Llama-shaped checkpoint (about 1B parameters by default) in several bf16 shards.

    python benchmarks/make_llama.py runs/llama-1b [--layers 16] [--max-shard-size 500MB]

Shapes follow Llama-3.2-1B (hidden 2048, MLP 8192, GQA 32/8 heads, vocab 128256, tied embeddings).
Weights are random (std 0.02), written tensor by tensor so generation needs little memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowrank_surgery.checkpoint import PlannedTensor, atomic_output, write_sharded


def llama_config(layers: int, hidden: int = 2048, mlp: int = 8192, heads: int = 32, kv_heads: int = 8,
                 vocab: int = 128256) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
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
    return plan + [PlannedTensor("model.norm.weight", dtype, (h,))]


def generate(out: Path, layers: int = 16, max_shard_size: str = "500MB", seed: int = 0, **shape) -> Path:
    """Write the checkpoint to `out` (reused if it already holds one)."""
    if (out / "config.json").is_file():
        return out
    cfg = llama_config(layers, **shape)
    gen = torch.Generator().manual_seed(seed)

    def weight(t: PlannedTensor) -> torch.Tensor:  # norms are ones; the writer casts to the planned dtype
        return torch.ones(t.shape) if len(t.shape) == 1 else torch.randn(t.shape, generator=gen) * 0.02

    with atomic_output(out) as tmp:
        write_sharded(tmp, tensor_plan(cfg, torch.bfloat16), weight, max_shard_size, always_index=True)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--max-shard-size", default="500MB")
    args = parser.parse_args()
    print(generate(args.out, args.layers, args.max_shard_size))


if __name__ == "__main__":
    main()
