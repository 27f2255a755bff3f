"""Other architectures against PEFT: target selection, adapters, merges, tied and renamed weights, conversion, training.

Tiny random models of real transformers classes: encoder-decoders whose embeddings are not linear (T5's `shared` and
`relative_attention_bias`, BART's `shared`), fused projections (Phi-3), a classification head narrower than the rank
(RoBERTa), a masked LM whose tied decoder has a tied bias (BERT), and checkpoints whose tensor names transformers v5
renames on load (GPT-NeoX's `embed_out` -> `lm_head`, LLaVA's `language_model.model.*` -> `model.language_model.*`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_surgery as lrs
from lowrank_surgery.cards import peft_loadable
from lowrank_surgery.convert import convert
from lowrank_surgery.merge import merge
from lowrank_surgery.targets import guessed_targets

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _configs() -> dict:
    import transformers as T

    vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                image_size=32, patch_size=8, projection_dim=32)
    return {
        "t5": T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                         decoder_start_token_id=0, architectures=["T5ForConditionalGeneration"]),
        "bart": T.BartConfig(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                             max_position_embeddings=64, architectures=["BartForConditionalGeneration"]),
        "bert_mlm": T.BertConfig(**SMALL, architectures=["BertForMaskedLM"]),
        "roberta_cls": T.RobertaConfig(**{**SMALL, "max_position_embeddings": 70}, num_labels=3,
                                       architectures=["RobertaForSequenceClassification"]),
        "phi3": T.Phi3Config(**SMALL, num_key_value_heads=4, pad_token_id=0, tie_word_embeddings=False,
                             architectures=["Phi3ForCausalLM"]),
        "gpt_neox": T.GPTNeoXConfig(**SMALL, architectures=["GPTNeoXForCausalLM"]),
        "llava": T.LlavaConfig(vision_config=vision, text_config=T.LlamaConfig(**{**SMALL, "vocab_size": 160},
                                                                               num_key_value_heads=2),
                               image_token_id=150, architectures=["LlavaForConditionalGeneration"]),
    }


ARCHS = ["t5", "bart", "bert_mlm", "roberta_cls", "phi3", "gpt_neox", "llava"]
IDS = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def cli(lrs):
    """The in-process `lrs` CLI runner under a name that leaves the `lrs` module usable."""
    return lrs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> a function building (once) that tiny model, saved in several shards."""
    import transformers

    root, built, configs = tmp_path_factory.mktemp("archs"), {}, _configs()

    def get(arch: str) -> Path:
        if arch not in built:
            config = configs[arch]
            torch.manual_seed(0)
            model = getattr(transformers, config.architectures[0])(config).eval()
            with torch.no_grad():  # larger weights than the default init, so that adapters make a visible difference
                for p in model.parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.2)
            model.save_pretrained(root / arch, max_shard_size="120KB")
            built[arch] = root / arch
        return built[arch]

    return get


def load(path: Path):
    import transformers

    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()


def output(model) -> torch.Tensor:
    kwargs = {"decoder_input_ids": IDS[:, :4]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        out = model(input_ids=IDS, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())), msg=msg)


def peft_selection(model, config) -> set[str]:
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = get_peft_model(model, config)
    return {name.removeprefix("base_model.model.") for name, m in wrapped.named_modules()
            if isinstance(m, BaseTunerLayer) and not name.endswith(".base_layer")}


# ------------------------------------------------------------------------------------------------ target selection


@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_and_default_targets_are_peft_all_linear(models, arch):
    """The linear modules, not embeddings; the output layer left out; paths as the model names its modules."""
    from peft import LoraConfig

    base = models(arch)
    ours = {t.path for t in lrs.select_targets(lrs.Checkpoint(base), "all-linear")}
    assert ours == peft_selection(load(base), LoraConfig(r=2, target_modules="all-linear"))
    assert set(lrs.init_adapter("lora", base, r=2).weights) == ours


# ------------------------------------------------------------------------------------------------ adapters and merges


def _merged_state(path: Path) -> dict[str, torch.Tensor]:
    return load(path).state_dict()


@pytest.mark.parametrize("arch,case", [  # case: of METHOD_CASES (conftest), at rank 4 whatever its own
    ("t5", "lora"), ("phi3", "fossil-bat"), ("gpt_neox", "lora"), ("llava", "fossil"), ("roberta_cls", "lora"),
    ("bart", "fossil-mini"),
])
def test_adapter_and_merge_match_peft(models, cli, tmp_path, recipe, moved_off_init, arch, case):
    """`lrs init` (CLI for LoRA) loads in PEFT with the outputs of lrs.attach; `lrs merge` keeps the base's tensor names,
    dtypes and shards, loads with the architecture's class with the attached logits, and equals merge_and_unload."""
    from peft import PeftModel

    base, ad = models(arch), tmp_path / "ad"
    method, _, options = recipe(case, base)
    if method == "lora":
        assert cli("init", "--method", "lora", "--base", base, "--out", tmp_path / "init", "--rank", "4",
                   "--targets", "all-linear").code == 0
        adapter = lrs.load_adapter(tmp_path / "init")
    else:
        adapter = lrs.init_adapter(method, base, r=4, options=options)
    lrs.save_adapter(moved_off_init(adapter), ad)
    attached = output(lrs.attach(load(base), lrs.load_adapter(ad)))
    peft = PeftModel.from_pretrained(load(base), ad).eval()
    assert_close(output(peft), attached)
    assert (attached - output(load(base))).abs().max() > 1e-2

    assert cli("merge", ad, base, tmp_path / "merged").code == 0
    before, after = lrs.Checkpoint(base), lrs.Checkpoint(tmp_path / "merged")
    assert {n: (i.dtype, i.shard.name) for n, i in after.tensors.items()} == \
        {n: (i.dtype, i.shard.name) for n, i in before.tensors.items()}
    assert_close(output(load(tmp_path / "merged")), attached)
    theirs, ours = peft.merge_and_unload().state_dict(), _merged_state(tmp_path / "merged")
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert_close(ours[name], t, msg=name)


@pytest.mark.parametrize("arch,output_layer", [("bart", "lm_head"), ("bert_mlm", "cls.predictions.decoder"),
                                               ("gpt_neox", "lm_head"), ("t5", "lm_head")])
def test_output_layer_adapter_merges_untied(models, tmp_path, moved_off_init, arch, output_layer):
    """A tied output layer is written on its own with the input embedding untouched, plus whatever untying separates
    (BART's encoder/decoder embed_tokens, BERT's decoder bias); GPT-NeoX's lm_head is stored as embed_out."""
    from peft import PeftModel

    base = models(arch)
    adapter = moved_off_init(lrs.init_adapter("lora", base, r=2, targets=output_layer))
    assert list(adapter.weights) == [output_layer]
    lrs.save_adapter(adapter, tmp_path / "ad")
    attached = output(lrs.attach(load(base), lrs.load_adapter(tmp_path / "ad")))
    assert_close(output(PeftModel.from_pretrained(load(base), tmp_path / "ad").eval()), attached)
    merge(tmp_path / "ad", base, tmp_path / "merged")
    assert_close(output(load(tmp_path / "merged")), attached)
    before, after = lrs.Checkpoint(base), lrs.Checkpoint(tmp_path / "merged")
    for name in before.tensors:
        assert torch.equal(after.get(name), before.get(name)) or name == "embed_out.weight", name


# ------------------------------------------------------------------------------------------------ PiSSA / CoLA / convert


@pytest.mark.parametrize("arch,method", [("phi3", "pissa"), ("bart", "cola"), ("llava", "pissa")])
def test_pissa_cola_export_to_peft_lora_is_exact(models, tmp_path, moved_off_init, arch, method):
    from peft import PeftModel

    base = models(arch)
    lrs.save_adapter(moved_off_init(lrs.init_adapter(method, base, r=4)), tmp_path / "ad")
    convert(tmp_path / "ad", tmp_path / "lora", "peft-lora", base=base)
    attached = output(lrs.attach(load(base), lrs.load_adapter(tmp_path / "ad")))
    assert_close(output(PeftModel.from_pretrained(load(base), tmp_path / "lora").eval()), attached)
    merge(tmp_path / "ad", base, tmp_path / "m1")
    merge(tmp_path / "lora", base, tmp_path / "m2")
    first, second = lrs.Checkpoint(tmp_path / "m1"), lrs.Checkpoint(tmp_path / "m2")
    for name in first.tensors:
        assert_close(second.get(name), first.get(name), msg=name)


def test_pissa_rank_limit_and_lora_rank_above_a_small_head(models):
    """LoRA takes r above min(out, in) as PEFT does (a 3-label head); PiSSA's SVD cannot."""
    base = models("roberta_cls")
    assert lrs.init_adapter("lora", base, r=4).weights["classifier.out_proj"]["lora_A.weight"].shape == (4, 64)
    with pytest.raises(lrs.LrsError, match="rank 4 is larger than classifier.out_proj allows"):
        lrs.init_adapter("pissa", base, r=4)


def test_fossil_on_conv1d_is_not_announced_as_peft_loadable(tiny_models):
    """PEFT's MiSS wraps nn.Linear only: a FOSSIL adapter on GPT-2's Conv1D needs lrs (LoRA on Conv1D loads in PEFT)."""
    assert not peft_loadable(lrs.init_adapter("fossil", tiny_models["gpt2"], r=4))
    assert peft_loadable(lrs.init_adapter("lora", tiny_models["gpt2"], r=4))
    assert peft_loadable(lrs.init_adapter("fossil", tiny_models["llama"], r=4))


def test_bare_safetensors_file_falls_back_to_names(tmp_path, models):
    """Without config.json there is no architecture to build: linear weights are guessed from names and shapes."""
    from safetensors.torch import save_file

    ckpt = lrs.Checkpoint(models("phi3"))
    save_file({n: ckpt.get(n) for n in ckpt.names()}, tmp_path / "bare.safetensors")
    guessed = lrs.select_targets(lrs.Checkpoint(tmp_path / "bare.safetensors"), "all-linear")
    assert {t.path for t in guessed} == {t.path for t in lrs.select_targets(ckpt, "all-linear")}


# ------------------------------------------------------------------------------------------------ training


def test_cli_trains_a_fused_projection_decoder(models, cli, tmp_path, char_tokenizer):
    """`lrs train` on Phi-3 (fused qkv_proj and gate_up_proj) moves every trainable parameter."""
    import shutil

    base = Path(shutil.copytree(models("phi3"), tmp_path / "phi3"))
    char_tokenizer().save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i}: the quick brown fox."}) + "\n" for i in range(8)))
    assert cli("init", "--method", "lora", "--base", base, "--out", tmp_path / "ad", "--rank", "2").code == 0
    res = cli("train", tmp_path / "ad", "--base", base, "--data", data, "--out", tmp_path / "out", "--steps", "2",
              "--batch-size", "2", "--seq-len", "24", "--lr", "1e-2", "--quiet")
    assert res.code == 0, res.stderr
    before, after = lrs.load_adapter(tmp_path / "ad").weights, lrs.load_adapter(tmp_path / "out").weights
    assert before.keys() == after.keys()
    assert {"model.layers.0.self_attn.qkv_proj", "model.layers.1.mlp.gate_up_proj"} <= set(after)
    assert all(not torch.equal(after[p]["lora_B.weight"], before[p]["lora_B.weight"]) for p in before)


def test_shared_tiny_models_select_as_their_names_say(tiny_models):
    """On the conftest models the architecture and the name guesses agree (LLaMA untied, Qwen2 tied, GPT-2, BERT)."""
    for arch, count in {"llama": 14, "qwen2": 14, "gpt2": 8, "bert": 13}.items():
        ckpt = lrs.Checkpoint(tiny_models[arch])
        chosen = [t.path for t in lrs.select_targets(ckpt, "all-linear")]
        assert chosen == [t.path for t in guessed_targets(ckpt) if not t.output] and len(chosen) == count


LAYOUT_IN_A_FRESH_PROCESS = """
import json, sys
from lowrank_surgery.architecture import layout, _to_json
found = layout(json.load(open(sys.argv[1])))
print(json.dumps({"layout": _to_json(found), "built": "transformers.models.gpt2.modeling_gpt2" in sys.modules}))
"""


def test_layouts_are_cached_on_disk_and_rebuilt_when_unreadable(tiny_models, tmp_path, monkeypatch):
    """The second process reads the layout from $LRS_CACHE without importing the model's transformers module; a
    corrupt entry is rebuilt; another transformers version is another entry."""
    from lowrank_surgery import architecture

    cache = tmp_path / "cache"
    config = tiny_models["gpt2"] / "config.json"

    def fresh() -> dict:
        res = subprocess.run([sys.executable, "-c", LAYOUT_IN_A_FRESH_PROCESS, str(config)], capture_output=True,
                             text=True, env={**os.environ, "LRS_CACHE": str(cache)})
        assert res.returncode == 0, res.stderr[-2000:]
        return json.loads(res.stdout)

    first, second = fresh(), fresh()
    assert first["built"] and not second["built"]
    assert first["layout"] == second["layout"] and any(lin[1] for lin in first["layout"]["linears"])  # Conv1D kept
    entries = list((cache / "layouts").glob("*.json"))
    assert len(entries) == 1
    entries[0].write_text('{"layout": {"linears": [["x"]]')
    rebuilt = fresh()
    assert rebuilt["built"] and rebuilt["layout"] == first["layout"]
    monkeypatch.setenv("LRS_CACHE", str(cache))
    text = json.loads(config.read_text())
    key = architecture._cache_key(json.dumps(text, sort_keys=True))
    monkeypatch.setattr(architecture.metadata, "version", lambda name: "0.0.1")
    assert architecture._cache_key(json.dumps(text, sort_keys=True)) != key
