"""FOSSIL against PEFT's MiSS (the oracle): outputs, merged weights, bat's exact inverse, Bone import, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import lowrank_surgery as lrs
from lowrank_surgery.convert import convert
from lowrank_surgery.errors import LrsError

# The variants are METHOD_CASES' fossil cases (conftest: fossil = balance with r=5, which pads the input fold;
# fossil-mini; fossil-bat), each at its rank there; a test taking `method_case` runs for them.


@pytest.fixture(scope="session")
def fossil_adapter(recipe):
    """fossil_adapter(base, case, seed=1, scale=0.05): a FOSSIL adapter of a METHOD_CASES case on every linear of
    `base` with random non-zero blocks."""

    def build(base, case: str, seed: int = 1, scale: float = 0.05) -> lrs.Adapter:
        _, r, options = recipe(case, base)
        adapter = lrs.init_adapter("fossil", base, r=r, alpha=3.0, targets="all-linear", options=options)
        gen = torch.Generator().manual_seed(seed)
        for params in adapter.weights.values():
            assert not params["miss_block"].any()  # zeros at init
            params["miss_block"] = torch.randn(params["miss_block"].shape, generator=gen) * scale
        return adapter

    return build


def _weights(model) -> dict[str, torch.Tensor]:
    return {n[: -len(".weight")]: p.detach() for n, p in model.named_parameters() if n.endswith("_proj.weight")}


@pytest.fixture(scope="session")
def peft_gives_lrs_outputs(load_causal_lm):
    """peft_gives_lrs_outputs(base, adapter_dir, peft_dir): PEFT's model loaded from `peft_dir`, after checking it
    gives lrs's outputs with `adapter_dir` (not the base's)."""

    def check(base, adapter_dir, peft_dir):
        from peft import PeftModel

        ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
        ours = lrs.attach(load_causal_lm(base), lrs.load_adapter(adapter_dir))
        theirs = PeftModel.from_pretrained(load_causal_lm(base), peft_dir).eval()
        with torch.no_grad():
            out_ours, out_theirs, out_base = (m(input_ids=ids).logits for m in (ours, theirs, load_causal_lm(base)))
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
        assert (out_ours - out_base).abs().max() > 1e-3
        return theirs

    return check


@pytest.mark.method_cases(method="fossil")
def test_fossil_matches_peft_miss(llama, tmp_path, fossil_adapter, recipe, peft_gives_lrs_outputs,
                                  load_causal_lm, method_case):
    variant = recipe(method_case, llama)[2]["variant"]
    adapter = fossil_adapter(llama, method_case)
    lrs.save_adapter(adapter, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["init_weights"] == {"balance": True}.get(variant, variant)
    theirs = peft_gives_lrs_outputs(llama, tmp_path / "ad", tmp_path / "ad")

    base_w = _weights(load_causal_lm(llama))
    merged = _weights(theirs.merge_and_unload())
    method = adapter.method
    for path, params in adapter.weights.items():
        w = base_w[path]
        torch.testing.assert_close(merged[path], w + method.delta(params, path, tuple(w.shape), w), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(method.merge(w, params, path).float(), merged[path], rtol=1e-5, atol=1e-5)


@pytest.mark.method_cases("fossil", "fossil-mini")
def test_fold_pair_is_exact_and_alpha_free(llama, fossil_adapter, recipe, method_case):
    _, r, _ = recipe(method_case, llama)
    adapter = fossil_adapter(llama, method_case)
    method = adapter.method
    for t in lrs.select_targets(lrs.Checkpoint(llama), "all-linear"):
        params = adapter.weights[t.path]
        b, a = method.pair(params, shape=t.shape)
        assert b.shape == (t.out_features, r) and set(a.unique().tolist()) == {0.0, 1.0}
        torch.testing.assert_close(b @ a, method.delta(params, t.path, t.shape))  # s = 1, alpha is 3
    d = torch.randn(3, 6)
    mini = lrs.get_method(lrs.AdapterConfig("fossil", 3, 9.0, [], options={"variant": "mini", "mini_r": 6}))
    full = mini.delta({"miss_block": d}, "x", (12, 7))
    assert full.shape == (12, 7)
    assert all(full[o, i] == d[i % 3, o % 6] for o in range(12) for i in range(7))


def test_bat_unmerge_inverts_merge_and_refuses_singular(llama, fossil_adapter, load_causal_lm):
    adapter = fossil_adapter(llama, "fossil-bat", scale=0.2)
    method = adapter.method
    base_w = _weights(load_causal_lm(llama))
    for path, params in adapter.weights.items():
        merged = method.merge(base_w[path], params, path)
        assert merged.dtype == torch.float64
        assert (merged - base_w[path].double()).abs().max() > 1e-2
        torch.testing.assert_close(method.unmerge(merged, params, path), base_w[path].double(), rtol=0, atol=1e-10)
    path, params = next(iter(adapter.weights.items()))
    block = params["miss_block"].clone()
    block[1] = -torch.eye(8)
    block[1, 0, 3] = 0.5  # I + D_1 has a zero row: singular
    with pytest.raises(LrsError, match=rf"{path}.*singular.*b=1"):
        method.unmerge(base_w[path], {"miss_block": block}, path)


def test_bone_adapter_imports_as_fossil(llama, tmp_path, fossil_adapter):
    adapter = fossil_adapter(llama, "fossil-bat")
    (tmp_path / "bone").mkdir()
    config = {"peft_type": "BONE", "r": 8, "init_weights": "bat", "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": str(llama), "bias": "none"}
    (tmp_path / "bone" / "adapter_config.json").write_text(json.dumps(config))
    tensors = {k.replace("miss_block", "bone_block"): v for k, v in adapter.state_dict().items()
               if "q_proj" in k or "v_proj" in k}
    save_file(tensors, tmp_path / "bone" / "adapter_model.safetensors")
    loaded = lrs.load_adapter(tmp_path / "bone")
    assert loaded.config.method == "fossil" and loaded.config.options["variant"] == "bat"
    assert len(loaded.weights) == 4
    for path, params in loaded.weights.items():
        assert torch.equal(params["miss_block"], adapter.weights[path]["miss_block"])
    lrs.save_adapter(loaded, tmp_path / "miss")
    assert json.loads((tmp_path / "miss" / "adapter_config.json").read_text())["peft_type"] == "MISS"


CONV1D_WARNING = "warning: stock PEFT cannot load MiSS (FOSSIL) adapters on Conv1D layers (GPT-2)"


@pytest.mark.method_cases("fossil", "fossil-mini")
def test_fossil_on_gpt2_loads_in_peft_as_its_exact_lora(tiny_models, tmp_path, fossil_adapter,
                                                        peft_gives_lrs_outputs, load_causal_lm, method_case):
    """PEFT's MiSS wraps nn.Linear only and refuses GPT-2's Conv1D; the exact LoRA export loads in PEFT's LoRA
    (fan_in_fan_out) with lrs's outputs."""
    from peft import PeftModel

    gpt2 = tiny_models["gpt2"]
    with pytest.warns(lrs.LrsWarning, match="--to peft-lora --base MODEL` for an exact LoRA, which PEFT loads on Conv1D"):
        lrs.save_adapter(fossil_adapter(gpt2, method_case), tmp_path / "miss")
    with pytest.raises(TypeError, match="Conv1D"):
        PeftModel.from_pretrained(load_causal_lm(gpt2), tmp_path / "miss")
    assert not convert(tmp_path / "miss", tmp_path / "lora", "peft-lora", base=gpt2)["lossy"]
    peft_gives_lrs_outputs(gpt2, tmp_path / "miss", tmp_path / "lora")


def test_fossil_on_conv1d_warns_in_one_line_naming_the_route(lrs, tiny_models, llama, tmp_path):
    gpt2 = tiny_models["gpt2"]
    for variant, route in [("balance", "--base MODEL` for an exact LoRA"),
                           ("bat", "--allow-lossy` for a truncated-SVD LoRA")]:
        res = lrs("init", "--method", "fossil", "--variant", variant, "--rank", "8", "--base", gpt2, "--out",
                  tmp_path / variant)
        assert res.code == 0 and res.stderr.startswith(CONV1D_WARNING) and route in res.stderr, res
        assert res.stderr.count("\n") == 1
    res = lrs("convert", tmp_path / "balance", tmp_path / "miss", "--to", "peft-miss")
    assert res.code == 0 and res.stderr.startswith(CONV1D_WARNING) and res.stderr.count("\n") == 1, res
    res = lrs("init", "--method", "fossil", "--base", llama, "--out", tmp_path / "llama")
    assert res.code == 0 and res.stderr == "", res


FOSSIL_BAD = {  # expected message -> init options
    "FOSSIL bat needs both dimensions divisible by r=5, but model.layers.0.self_attn.q_proj (shape 64x64)":
        ["--variant", "bat", "--rank", "5"],
    "mini_r=7 to divide out_features of model.layers.0.self_attn.q_proj (shape 64x64)": ["--variant", "mini", "--mini-r", "7"],
    "rank 65 is larger than model.layers.0.self_attn.q_proj (shape 64x64)": ["--rank", "65"],
    "unknown FOSSIL variant 'wide'": ["--variant", "wide"],
}


@pytest.mark.parametrize("expected", FOSSIL_BAD)
def test_bad_fossil_input_exits_1(lrs, llama, tmp_path, assert_one_line_error, expected):
    out = tmp_path / "out"
    res = lrs("init", "--method", "fossil", "--base", llama, "--out", out, "--targets", "q_proj", *FOSSIL_BAD[expected])
    assert_one_line_error(res, expected)
    assert not list(tmp_path.iterdir())
