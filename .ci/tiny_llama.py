"""Write a tiny random Llama with a character tokenizer, and a little prompt/completion data, for `.ci/run`'s
check that a plain install (no extras) runs the CLI: python .ci/tiny_llama.py BASE_DIR DATA_FILE"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_tokenizer import char_tokenizer  # noqa: E402  (tests/ is not a package)


def main(base: Path, data: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
