"""Copies of the tiny models with the character tokenizer saved next to them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tiny_tokenizer import char_tokenizer


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
