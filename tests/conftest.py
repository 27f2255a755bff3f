"""Shared fixtures: tiny models of real architectures, saved in several shards, and an in-process CLI runner."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SHARD = "120KB"


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64)
    return BertModel(cfg, add_pooling_layer=True)


BUILDERS = {"llama": _llama, "qwen2": _qwen2, "gpt2": _gpt2, "bert": _bert}


def build_model(arch: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny randomly initialised model of a real architecture in several safetensors shards."""
    torch.manual_seed(seed)
    model = BUILDERS[arch]().to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so adapters and SVDs see real structure
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(path, max_shard_size=SHARD)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """llama (untied, GQA), qwen2 (tied, biases), gpt2 (Conv1D, tied) and bert, each in several shards."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in BUILDERS}


@pytest.fixture(scope="session")
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def lrs(capsys):
    """Run the `lrs` CLI in-process: lrs("init", "--method", ...) -> Result(code, stdout, stderr)."""
    from lowrank_surgery.cli.app import main

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


def load_causal_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def edited_copy(model: Path, path: Path, edit: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of `model` (same shards) in which every tensor is what `edit(name, tensor)` returns."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, path)
    for shard in sorted(path.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({name: edit(name, t) for name, t in tensors.items()}, shard, metadata={"format": "pt"})
    return path


def fill(args, **paths) -> list[str]:
    """A bad-input table's arguments as strings, with placeholders such as {root} or {llama} filled in."""
    return [str(a).format(**paths) for a in args]


def assert_one_line_error(res: Result, expected: str) -> None:
    """Exit 1 with `expected` in a single line on stderr, no traceback."""
    assert res.code == 1, (expected, res)
    assert expected in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr


def pickled_copy(model: Path, path: Path, **extra) -> Path:
    """`model`'s config and tokenizer files with its tensors (plus `extra` entries) in one pytorch_model.bin."""
    from safetensors.torch import load_file

    path.mkdir(parents=True)
    state = {}
    for f in model.iterdir():
        if f.suffix == ".safetensors":
            state.update(load_file(f))
        elif f.suffix != ".json" or f.name != "model.safetensors.index.json":
            (path / f.name).write_bytes(f.read_bytes())
    torch.save({**state, **extra}, path / "pytorch_model.bin")
    return path


def lrs_block(adapter_dir: Path) -> dict:
    """The `lrs` block as stored: JSON in adapter_model.safetensors' metadata, read with safetensors itself."""
    import json

    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        return json.loads(f.metadata()["lrs"])


def cache_on_hub(model: Path, repo_id: str, cache: Path, monkeypatch) -> str:
    """Serve `model` as Hub repository `repo_id` from an offline huggingface_hub cache at `cache`; its commit."""
    commit = "a" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    return commit


def moved_off_init(adapter, scale: float = 0.05, seed: int = 1):
    """The adapter with every trainable parameter moved by scale·N(0, 1) (ΔW ≠ 0 for every method); in place."""
    gen = torch.Generator().manual_seed(seed)
    frozen = adapter.method.frozen
    for params in adapter.weights.values():
        for name, t in params.items():
            if name not in frozen:
                params[name] = t + scale * torch.randn(t.shape, generator=gen)
    return adapter


def shape_of(params) -> tuple[int, int]:
    """(out, in) of a module from its LoRA-type factors (B out × r, A r × in): what Method.delta takes as shape."""
    b = next(t for n, t in sorted(params.items()) if "_B" in n)
    a = next(t for n, t in sorted(params.items()) if "_A" in n)
    return b.shape[0], a.shape[1]
