"""A character-level tokenizer (vocab < 128, with a ChatML template) saved next to copies of the tiny models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer():
    """One token per printable ASCII character, newline included; fits the tiny models' 128-entry vocab."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIALS)
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def chat_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Copies of the causal tiny models with the character tokenizer saved alongside."""
    root = tmp_path_factory.mktemp("chat-models")
    tokenizer = char_tokenizer()
    copies = {}
    for arch in ("llama", "qwen2", "gpt2"):
        copies[arch] = Path(shutil.copytree(tiny_models[arch], root / arch))
        tokenizer.save_pretrained(copies[arch])
    return copies
