"""Shared fixtures: tiny models of real architectures, saved in several shards, an in-process CLI runner, the helpers
the test files share, and METHOD_CASES, the one table of the adapters every method and variant is tested with.

tests/ is not a package and no test file imports another (or this one): what they share is a fixture here. A helper
is a session fixture that hands out the function (`@helper`); a table a test is parametrized with is data here, and
reaches a test through `pytest_generate_tests` (a test taking `method_case`, see below).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["LRS_CACHE"] = tempfile.mkdtemp(prefix="lrs-test-cache-")  # architecture layouts: never the user's cache

import lowrank_surgery  # noqa: E402  (after the settings above, which huggingface_hub reads on import)
from tiny_tokenizer import char_tokenizer as _char_tokenizer  # noqa: E402  (a module: .ci/tiny_llama.py uses it too)

SHARD = "120KB"


def helper(fn: Callable) -> Callable:
    """`fn` as a session fixture of the same name that hands it out, for tests and fixtures to call."""

    def fixture() -> Callable:
        return fn

    fixture.__doc__ = fn.__doc__
    return pytest.fixture(scope="session", name=fn.__name__)(fixture)


# ------------------------------------------------------------------------------------------------ methods and variants

SUBSPACE = "{subspace}"  # an option value the `recipe` fixture replaces with a CoRA subspace of the adapter's base

# The variants a method is tested in, each with its rank: method -> {variant: (rank, options)}, the variant its
# options default to first. A registered method not listed here is tested once, at rank 4 with its defaults.
VARIANTS: dict[str, dict[str, tuple[int, dict]]] = {
    "cora": {"frozen": (4, {"subspace": SUBSPACE, "cora_mode": "frozen"}),  # CoRA's B is a subspace of the base
             "init": (4, {"subspace": SUBSPACE, "cora_mode": "init"})},
    "cola": {"fully": (4, {"strategy": "fully"}), "heuristic": (4, {"strategy": "heuristic"}),
             "random": (4, {"strategy": "random"})},
    # balance with r=5: in_features 64 and 96 are not multiples of r, so the fold pads x
    "fossil": {"balance": (5, {"variant": "balance"}), "mini": (4, {"variant": "mini", "mini_r": 8}),
               "bat": (8, {"variant": "bat"})},
}

# case name -> (method, rank, options). A method's default case is named after the method (lora, cora, ...), so
# that every registered method has one and new methods join automatically; its other variants are named
# "<method>-<variant>" (cora-init, cola-heuristic, fossil-bat, ...).
METHOD_CASES: dict[str, tuple[str, int, dict]] = {
    method if i == 0 else f"{method}-{variant}": (method, r, options)
    for method in lowrank_surgery.METHODS
    for i, (variant, (r, options)) in enumerate(VARIANTS.get(method, {"default": (4, {})}).items())
}


def _selected_cases(*names: str, method: str | None = None, exclude: tuple[str, ...] = ()) -> list[str]:
    """The cases `@pytest.mark.method_cases(...)` selects: `names`, else every case (of `method`), less `exclude`."""
    unknown = sorted({*names, *exclude} - set(METHOD_CASES))
    if unknown:
        raise ValueError(f"method_cases: no such case {unknown} (known: {', '.join(METHOD_CASES)})")
    cases = list(names) or [case for case, (m, _, _) in METHOD_CASES.items() if method in (None, m)]
    return [case for case in cases if case not in exclude]


def pytest_generate_tests(metafunc) -> None:
    """A test taking `method_case` runs once per METHOD_CASES entry, or per those its method_cases mark selects."""
    if "method_case" in metafunc.fixturenames:
        mark = metafunc.definition.get_closest_marker("method_cases")
        metafunc.parametrize("method_case", _selected_cases(*mark.args, **mark.kwargs) if mark else list(METHOD_CASES))


@pytest.fixture(scope="session")
def method_table() -> dict[str, tuple[str, int, dict]]:
    """METHOD_CASES, for a test that goes through the cases itself."""
    return METHOD_CASES


@pytest.fixture(scope="session")
def subspace(tmp_path_factory) -> Callable[[Path], Path]:
    """subspace(base): an all-linear, scope-layer, rank-8 CoRA subspace of `base`, extracted once per base."""
    from lowrank_surgery.subspace import extract_subspace

    built: dict[Path, Path] = {}

    def get(base: Path) -> Path:
        if base not in built:
            built[base] = tmp_path_factory.mktemp(f"{Path(base).name}-subspace") / "subspace"
            extract_subspace([base], built[base], rank=8, targets="all-linear", device="cpu")
        return built[base]

    return get


@pytest.fixture(scope="session")
def recipe(subspace) -> Callable[[str, Path], tuple[str, int, dict]]:
    """recipe(case, base) -> (method, rank, options) of a METHOD_CASES case, its subspace one of `base`."""

    def get(case: str, base: Path) -> tuple[str, int, dict]:
        method, r, options = METHOD_CASES[case]
        return method, r, {k: str(subspace(base)) if v == SUBSPACE else v for k, v in options.items()}

    return get


@pytest.fixture(scope="session")
def make_adapter(recipe, moved_off_init):
    """make_adapter(case, base, targets=..., ...): an adapter of a METHOD_CASES case whose trainable parameters are
    moved off their init (ΔW ≠ 0), as after training. alpha (a number, or a function of the case's rank) and seed
    (of the init, and of the move unless moved_seed is given) have defaults; the rest goes to init_adapter."""

    def make(case: str, base: Path, *, alpha: float | Callable[[int], float] = lambda r: 2.0 * r, seed: int = 1,
             moved_seed: int | None = None, **init) -> lowrank_surgery.Adapter:
        method, r, options = recipe(case, base)
        adapter = lowrank_surgery.init_adapter(method, base, r=r, alpha=alpha(r) if callable(alpha) else alpha,
                                               options=options, seed=seed, **init)
        return moved_off_init(adapter, seed=seed if moved_seed is None else moved_seed)

    return make


# ------------------------------------------------------------------------------------------------ tiny models


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


@helper
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
def tiny_models(tmp_path_factory, build_model) -> dict[str, Path]:
    """llama (untied, GQA), qwen2 (tied, biases), gpt2 (Conv1D, tied) and bert, each in several shards."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in BUILDERS}


@pytest.fixture(scope="session")
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


@helper
def char_tokenizer():
    """A fresh character-level tokenizer (one token per printable ASCII character) for the 128-entry vocab."""
    return _char_tokenizer()


@pytest.fixture(scope="session")
def chat_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Copies of the causal tiny models with the character tokenizer saved alongside."""
    root = tmp_path_factory.mktemp("chat-models")
    tokenizer = _char_tokenizer()
    copies = {}
    for arch in ("llama", "qwen2", "gpt2"):
        copies[arch] = Path(shutil.copytree(tiny_models[arch], root / arch))
        tokenizer.save_pretrained(copies[arch])
    return copies


# ------------------------------------------------------------------------------------------------ the CLI


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


@helper
def fill(args, **paths) -> list[str]:
    """A bad-input table's arguments as strings, with placeholders such as {root} or {llama} filled in."""
    return [str(a).format(**paths) for a in args]


@helper
def assert_one_line_error(res: Result, expected: str) -> None:
    """Exit 1 with `expected` in a single line on stderr, no traceback."""
    assert res.code == 1, (expected, res)
    assert expected in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr


# ------------------------------------------------------------------------------------------------ checkpoints


@helper
def load_causal_lm(path: Path):
    """The causal LM at `path` in float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@helper
def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at `path`, read with lrs's reader."""
    ckpt = lowrank_surgery.Checkpoint(path)
    return {name: ckpt.get(name) for name in ckpt.names()}


@helper
def edited_copy(model: Path, path: Path, edit: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of `model` (same shards) in which every tensor is what `edit(name, tensor)` returns."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, path)
    for shard in sorted(path.glob("*.safetensors")):
        stored = load_file(shard)
        save_file({name: edit(name, t) for name, t in stored.items()}, shard, metadata={"format": "pt"})
    return path


@helper
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


@pytest.fixture
def cache_on_hub(monkeypatch) -> Callable[[Path, str, Path], str]:
    """cache_on_hub(model, repo_id, cache): serve `model` as Hub repository `repo_id` from an offline
    huggingface_hub cache at `cache` for this test; returns its commit."""

    def serve(model: Path, repo_id: str, cache: Path) -> str:
        commit = "a" * 40
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(model, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        return commit

    return serve


# ------------------------------------------------------------------------------------------------ adapters


@helper
def lrs_block(adapter_dir: Path) -> dict:
    """The `lrs` block as stored: JSON in adapter_model.safetensors' metadata, read with safetensors itself."""
    import json

    from safetensors import safe_open

    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        return json.loads(f.metadata()["lrs"])


@helper
def moved_off_init(adapter, scale: float = 0.05, seed: int = 1):
    """The adapter with every trainable parameter moved by scale·N(0, 1) (ΔW ≠ 0 for every method); in place."""
    gen = torch.Generator().manual_seed(seed)
    frozen = adapter.method.frozen
    for params in adapter.weights.values():
        for name, t in params.items():
            if name not in frozen:
                params[name] = t + scale * torch.randn(t.shape, generator=gen)
    return adapter


@helper
def shape_of(params) -> tuple[int, int]:
    """(out, in) of a module from its LoRA-type factors (B out × r, A r × in): what Method.delta takes as shape."""
    b = next(t for n, t in sorted(params.items()) if "_B" in n)
    a = next(t for n, t in sorted(params.items()) if "_A" in n)
    return b.shape[0], a.shape[1]
