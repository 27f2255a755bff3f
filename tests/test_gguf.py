"""`lrs convert --to gguf`: llama.cpp's LoRA adapter file, read back with `gguf` (llama.cpp's own package).

What llama.cpp computes from the file (src/llama-adapter.cpp) is rebuilt here independently: scale = alpha / r with
r = lora_b's ne[0], ΔW = scale·lora_b·lora_a in the base GGUF's row order, which for the Llama family has the q/k
rows of each head interleaved (convert_hf_to_gguf.py's LlamaModel.permute). benchmarks/check_llamacpp.py runs
llama.cpp itself on a real model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

import lowrank_surgery as ls
from lowrank_surgery.convert import convert
from lowrank_surgery.targets import linear_targets, load_weight

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _model(kind: str):
    import transformers as T

    head_dim = {"head_dim": 16}
    return {
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL)),
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**SMALL)),
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL)),
        "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, **head_dim)),
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**SMALL, **head_dim)),
        "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**SMALL, **head_dim)),
        "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**SMALL, **head_dim)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**{**SMALL, "num_key_value_heads": 4}, pad_token_id=0)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    }[kind]()


# family -> (general.architecture llama.cpp expects, whether its converter permutes q/k rows): written out here,
# not taken from lrs, so that a wrong entry in lrs's table fails.
EXPECTED = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
            "qwen3": ("qwen3", False), "gemma": ("gemma", False), "gemma2": ("gemma2", False),
            "gemma3": ("gemma3", False), "phi3": ("phi3", False)}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-bases")
    paths = {}
    for kind in [*EXPECTED, "gpt2"]:
        torch.manual_seed(0)
        model = _model(kind)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.2)
        model.save_pretrained(root / kind)
        paths[kind] = root / kind
    return paths


@pytest.fixture(scope="session")
def adapter_of(recipe, moved_off_init):
    """adapter_of(case, base): an adapter of a METHOD_CASES case (its method and options; rank 4 whatever the case's)
    on every linear module (lm_head left out) with trainable parameters off their init."""

    def build(case: str, base: Path) -> ls.Adapter:
        method, _, options = recipe(case, base)
        kinds = {t.path.rsplit(".", 1)[-1] for t in linear_targets(ls.Checkpoint(base))}
        targets = ",".join(sorted(kinds - {"lm_head"}))
        return moved_off_init(ls.init_adapter(method, base, r=4, alpha=8, targets=targets, seed=0, options=options),
                              scale=0.1)

    return build


def _unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of llama.cpp's q/k row order: GGUF row h·d + 2i + j holds Hugging Face row h·d + j·d/2 + i."""
    d = rows.shape[0] // heads
    order = [h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)]
    restored = torch.empty_like(rows)
    restored[order] = rows
    return restored


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        data = torch.from_numpy(t.data.copy())
        assert list(data.shape) == list(reversed(t.shape.tolist()))  # GGUF stores ne reversed from numpy
        tensors[t.name] = data
    return fields, tensors


def _llamacpp_deltas(path: Path, base: Path, permuted: bool) -> dict[str, torch.Tensor]:
    """ΔW per GGUF weight name as llama.cpp applies the file, in the Hugging Face row order."""
    fields, tensors = _read(path)
    config = ls.Checkpoint(base).config
    deltas = {}
    for name in {n.rsplit(".", 1)[0] for n in tensors}:
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        delta = (fields["adapter.lora.alpha"] / b.shape[1]) * (b @ a)
        if permuted and ".attn_q." in name:
            delta = _unpermute(delta, config["num_attention_heads"])
        if permuted and ".attn_k." in name:
            delta = _unpermute(delta, config["num_key_value_heads"])
        deltas[name] = delta
    return deltas


def _check(adapter: ls.Adapter, base: Path, path: Path, family: str) -> None:
    arch_name, permuted = EXPECTED[family]
    fields, tensors = _read(path)
    assert (fields["general.architecture"], fields["general.type"], fields["adapter.type"]) == (arch_name, "adapter", "lora")
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = gguf.get_tensor_name_map(arch, 2)
    targets = {t.path: t for t in linear_targets(ls.Checkpoint(base))}
    expected = {f"{names.get_name(path)}.weight": path for path in adapter.weights}
    assert set(tensors) == {f"{n}.{part}" for n in expected for part in ("lora_a", "lora_b")}
    got = _llamacpp_deltas(path, base, permuted)
    ckpt = ls.Checkpoint(base)
    for name, module in expected.items():
        weight = load_weight(ckpt, targets[module])
        want = adapter.method.delta(adapter.weights[module], module, tuple(weight.shape), weight)
        assert tensors[f"{name}.lora_a"].shape[1] == targets[module].in_features
        assert tensors[f"{name}.lora_b"].shape[0] == targets[module].out_features
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=module)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_every_family_is_written_as_llamacpp_reads_it(bases, tmp_path, adapter_of, family):
    adapter = adapter_of("lora", bases[family])
    ls.save_adapter(adapter, tmp_path / "ad")
    report = convert(tmp_path / "ad", tmp_path / "adapter.gguf", "gguf", base=bases[family])
    assert report["to"] == "gguf" and not report["lossy"] and (tmp_path / "adapter.gguf").is_file()
    _check(adapter, bases[family], tmp_path / "adapter.gguf", family)


@pytest.mark.method_cases(exclude=("lora", "fossil-bat"))  # LoRA: every family above; bat: refused below
def test_methods_with_an_exact_lora_form_reach_llamacpp(bases, tmp_path, adapter_of, method_case):
    adapter = adapter_of(method_case, bases["llama"])
    ls.save_adapter(adapter, tmp_path / "ad")
    convert(tmp_path / "ad", tmp_path / "adapter.gguf", "gguf", base=bases["llama"])
    _check(ls.load_adapter(tmp_path / "ad"), bases["llama"], tmp_path / "adapter.gguf", "llama")


def test_module_scales_llamacpp_cannot_express_are_folded_into_b(bases, tmp_path, lrs, adapter_of):
    """llama.cpp has one alpha and takes r from each tensor: rsLoRA and per-module ranks/alphas go into lora_b."""
    adapter = adapter_of("lora", bases["llama"])
    c = adapter.config
    c.rslora, c.alpha_pattern = True, {"model.layers.1.mlp.down_proj": 3.0}
    module = "model.layers.0.self_attn.q_proj"
    c.rank_pattern = {module: 2}
    params = adapter.weights[module]
    params["lora_A.weight"], params["lora_B.weight"] = params["lora_A.weight"][:2], params["lora_B.weight"][:, :2]
    ls.save_adapter(adapter, tmp_path / "ad")
    res = lrs("convert", tmp_path / "ad", tmp_path / "adapter.gguf", "--to", "gguf", "--base", bases["llama"])
    assert res.code == 0 and "wrote gguf adapter" in res.stdout, res.stderr
    _check(adapter, bases["llama"], tmp_path / "adapter.gguf", "llama")
    _, tensors = _read(tmp_path / "adapter.gguf")
    assert tensors["blk.0.attn_q.weight.lora_b"].shape[1] == 2


def test_untied_lm_head_is_the_output_tensor(bases, tmp_path):
    adapter = ls.init_adapter("lora", bases["llama"], r=4, alpha=8, targets="q_proj,lm_head", seed=0)
    for params in adapter.weights.values():
        params["lora_B.weight"] = params["lora_B.weight"] + 0.1
    ls.save_adapter(adapter, tmp_path / "ad")
    convert(tmp_path / "ad", tmp_path / "adapter.gguf", "gguf", base=bases["llama"])
    assert "output.weight.lora_b" in _read(tmp_path / "adapter.gguf")[1]


@pytest.mark.parametrize("case, expected", [
    ("gpt2", "--to gguf supports LlamaForCausalLM"),
    ("no-base", "--to gguf needs --base MODEL"),
    ("tied-lm-head", "lm_head is tied to the token embedding in llama.cpp's Gemma2ForCausalLM"),
    ("exists", "already exists; pass --force"),
    ("bat", "--allow-lossy"),
])
def test_what_llamacpp_cannot_load_is_refused_in_one_line(bases, tmp_path, lrs, adapter_of, assert_one_line_error,
                                                          case, expected):
    base = {"gpt2": "gpt2", "tied-lm-head": "gemma2"}.get(case, "llama")
    if case == "gpt2":
        adapter = ls.init_adapter("lora", bases["gpt2"], r=2, alpha=4, seed=0)
    elif case == "tied-lm-head":
        adapter = ls.init_adapter("lora", bases[base], r=2, alpha=4, targets="q_proj,lm_head", seed=0)
    else:
        adapter = adapter_of("fossil-bat" if case == "bat" else "lora", bases[base])
    ls.save_adapter(adapter, tmp_path / "ad")
    out = tmp_path / "adapter.gguf"
    if case == "exists":
        out.write_bytes(b"keep")
    args = ["convert", tmp_path / "ad", out, "--to", "gguf"] + ([] if case == "no-base" else ["--base", bases[base]])
    assert_one_line_error(lrs(*args), expected)
    assert (out.read_bytes() == b"keep") if case == "exists" else not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".lrs-" in p.name]


@pytest.mark.method_cases("lora", "cola", "fossil-bat")
def test_the_cards_convert_commands_run_as_written(bases, tmp_path, lrs, monkeypatch, adapter_of, recipe, method_case):
    """Every `lrs convert` line the model card shows runs as it stands, ADAPTER being the directory itself."""
    import re
    import shlex

    method = recipe(method_case, bases["llama"])[0]
    adapter = adapter_of(method_case, bases["llama"])
    ls.save_adapter(adapter, tmp_path / "ad")
    card = (tmp_path / "ad" / "README.md").read_text()
    commands = re.findall(r"`(lrs convert [^`]+)`", card)
    assert any("--to gguf" in c for c in commands) and (method == "cola") == any("peft-lora" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = [str(tmp_path / "ad") if a == "ADAPTER" else a for a in shlex.split(command)[1:]]
        res = lrs(*args)
        assert res.code == 0, (command, res.stderr)
        assert (tmp_path / args[2]).exists()
