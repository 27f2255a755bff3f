"""Streaming merge and unmerge: PEFT and the ΔW formula as oracles, logits, round trips, layout, ties, bad input."""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank_surgery as lrs
from lowrank_surgery.adapter import read_config, save_adapter
from lowrank_surgery.cards import peft_loadable
from lowrank_surgery.merge import WORKERS, merge, unmerge

# Adapters come from conftest's make_adapter: a METHOD_CASES case (every method and variant; a test taking
# `method_case` runs for each) on the method's default targets, alpha 2r, moved off its init (ΔW ≠ 0).
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def assert_same_logits(merged: torch.Tensor, attached: torch.Tensor) -> None:
    """Equal up to float32 noise: 1e-5 relative to the largest logit (PiSSA's ΔW cancels W-sized terms)."""
    torch.testing.assert_close(merged, attached, rtol=1e-5, atol=1e-5 * max(1.0, float(attached.abs().max())))


# ------------------------------------------------------------------------------------------------ correctness


def test_merge_formula_logits_and_roundtrip(llama, tmp_path, method_case, recipe, make_adapter, tensors,
                                            load_causal_lm):
    """W + ΔW per tensor, untouched tensors byte-identical, same logits as the attached adapter, exact unmerge."""
    method = recipe(method_case, llama)[0]
    adapter = make_adapter(method_case, llama)
    lrs.save_adapter(adapter, tmp_path / "ad")
    report = merge(tmp_path / "ad", llama, tmp_path / "merged")
    assert report.modules == len(adapter.weights) and report.method == method
    base, merged = tensors(llama), tensors(tmp_path / "merged")
    assert merged.keys() == base.keys()
    impl = adapter.method
    for name, w in base.items():
        path = name.removesuffix(".weight")
        if path in adapter.weights:
            expected = w + impl.delta(adapter.weights[path], path, tuple(w.shape), w)
            torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
            assert (merged[name] - w).abs().max() > 1e-3
        else:
            assert torch.equal(merged[name], w)

    attached = lrs.attach(load_causal_lm(llama), lrs.load_adapter(tmp_path / "ad")).eval()
    assert_same_logits(logits(load_causal_lm(tmp_path / "merged")), logits(attached))

    unmerge(tmp_path / "ad", tmp_path / "merged", tmp_path / "back")
    back = tensors(tmp_path / "back")
    for name, w in base.items():
        assert ((back[name] - w).norm() <= 1e-6 * w.norm()), name


def test_stock_peft_loads_every_adapter_without_a_warning(llama, tmp_path, method_case, recipe, make_adapter,
                                                           lrs_block, load_causal_lm):
    """What lrs writes for PEFT (the adapter itself, or its --to peft-lora export) loads with warnings as errors:
    PEFT warns on config keys it does not know, and users read that as a broken file."""
    from peft import PeftModel

    from lowrank_surgery.convert import convert

    method = recipe(method_case, llama)[0]
    adapter = make_adapter(method_case, llama)
    lrs.save_adapter(adapter, tmp_path / "ad")
    assert "lrs" not in json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert lrs_block(tmp_path / "ad")["method"] == lrs.load_adapter(tmp_path / "ad").config.method == method
    loadable = tmp_path / "ad"
    if not peft_loadable(adapter):
        convert(tmp_path / "ad", tmp_path / "lora", "peft-lora", base=llama, allow_lossy=True)
        loadable = tmp_path / "lora"
    model = load_causal_lm(llama)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for deprecation in (FutureWarning, DeprecationWarning):  # between transformers and PEFT, not about the file
            warnings.simplefilter("default", deprecation)
        PeftModel.from_pretrained(model, loadable)


def test_adapters_with_the_lrs_block_in_their_config_still_load(llama, tmp_path, make_adapter, lrs_block):
    """Adapters written before 0.2 keep the block in adapter_config.json; it still names the method (not peft_type)."""
    adapter = make_adapter("cora", llama)
    lrs.save_adapter(adapter, tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(tmp_path / "new" / "adapter_model.safetensors"), old / "adapter_model.safetensors")
    config = json.loads((tmp_path / "new" / "adapter_config.json").read_text()) | {"lrs": lrs_block(tmp_path / "new")}
    (old / "adapter_config.json").write_text(json.dumps(config))
    loaded = lrs.load_adapter(old)
    assert loaded.config.method == "cora" and loaded.method.frozen == {"lora_B.weight"}


@pytest.mark.parametrize("metadata, expected", [
    ("{not json", "the 'lrs' metadata is not JSON"),
    ('["cora"]', "the 'lrs' metadata must be a JSON object"),
    ('{"method": "cora", "alpha": "x"}', "lrs.alpha must be a finite number"),
])
def test_bad_lrs_metadata_is_one_line(lrs, llama, tmp_path, make_adapter, assert_one_line_error, metadata, expected):
    save_adapter(make_adapter("lora", llama), tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"lrs": metadata})
    assert_one_line_error(lrs("merge", str(tmp_path / "ad"), str(llama), str(tmp_path / "out")), expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_matches_peft_merge_and_unload(tiny_models, tmp_path, method_table, make_adapter, tensors,
                                            load_causal_lm, arch):
    """Every PEFT-loadable method (LoRA with non-zero B, FOSSIL) against PEFT, tensor by tensor; GPT-2 is Conv1D."""
    from peft import PeftModel

    base = tiny_models[arch]
    checked = 0
    for case in method_table if arch == "llama" else ["lora"]:  # GPT-2: Conv1D, LoRA only in PEFT
        adapter = make_adapter(case, base)
        if not peft_loadable(adapter):
            continue
        lrs.save_adapter(adapter, tmp_path / case)
        merge(tmp_path / case, base, tmp_path / f"m-{case}")
        ours = tensors(tmp_path / f"m-{case}")
        peft = PeftModel.from_pretrained(load_causal_lm(base), tmp_path / case).merge_and_unload()
        theirs = peft.state_dict()
        for name in ours:
            if name in theirs:
                torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)
        changed = [n for n in ours if n.removesuffix(".weight") in adapter.weights]
        assert changed and all(n in theirs for n in changed)
        checked += 1
    assert checked >= 1


@pytest.fixture(scope="session")
def bare_copy(tensors) -> Callable[[Path, Path], Path]:
    """bare_copy(model, out): the checkpoint's tensors as one bare .safetensors file, with no config.json next to it."""

    def write(model: Path, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors(model), out)
        return out

    return write


@pytest.fixture(scope="session")
def peft_gpt2_lora(load_causal_lm):
    """peft_gpt2_lora(base, out): a PEFT LoRA (random B) on GPT-2's Conv1D modules, saved in `out`; returns PEFT's
    merge_and_unload model."""

    def build(base: Path, out: Path):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False)
        model = get_peft_model(load_causal_lm(base), config)
        model.save_pretrained(out)
        return model.merge_and_unload()

    return build


def test_bare_gpt2_file_takes_the_layout_the_adapter_declares(tiny_models, tmp_path, bare_copy, peft_gpt2_lora,
                                                              tensors):
    """No config.json: GPT-2's square attn.c_proj (Conv1D, stored transposed) cannot be told from its shape, so
    the adapter's fan_in_fan_out decides; merge equals PEFT's on the real model and unmerge gives the base back."""
    bare = bare_copy(tiny_models["gpt2"], tmp_path / "bare" / "model.safetensors")
    theirs = peft_gpt2_lora(tiny_models["gpt2"], tmp_path / "ad").state_dict()
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    merge(tmp_path / "ad", bare, tmp_path / "merged.safetensors")
    ours, original = tensors(tmp_path / "merged.safetensors"), tensors(bare)
    square = "transformer.h.0.attn.c_proj.weight"
    assert ours[square].shape[0] == ours[square].shape[1] and (ours[square] - original[square]).abs().max() > 1e-3
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-5, msg=name)
    unmerge(tmp_path / "ad", tmp_path / "merged.safetensors", tmp_path / "back.safetensors")
    for name, t in tensors(tmp_path / "back.safetensors").items():
        torch.testing.assert_close(t, original[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("method,targets", [("pissa", "c_proj"), ("lora", "all-linear")])
def test_init_from_a_bare_gpt2_file_refuses_square_weights_it_cannot_orient(tiny_models, tmp_path, bare_copy,
                                                                            method, targets):
    """GPT-2's other weights show it stores them transposed; its square attn.c_proj could be either way round
    (PiSSA would decompose Wᵀ for W), so init refuses instead of taking it for nn.Linear."""
    bare = bare_copy(tiny_models["gpt2"], tmp_path / "bare" / "model.safetensors")
    with pytest.raises(lrs.LrsError, match=r"cannot tell whether .* stores transformer\.h\.0\.attn\.c_proj\.weight transposed"):
        lrs.init_adapter(method, bare, r=2, targets=targets)
    lrs.init_adapter(method, bare, r=2, targets="c_attn,c_fc")  # non-square: the bias tells the layout


PEFT_PATTERNS = {  # LoraConfig fields beyond r=4, lora_alpha=8 on q_proj and v_proj
    "rank_pattern": {"rank_pattern": {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6}},
    "alpha_pattern": {"alpha_pattern": {"v_proj": 3.0, "model.layers.0.self_attn.q_proj": 16}},
    "rslora": {"use_rslora": True},
    "rslora_with_patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 7}, "alpha_pattern": {"layers.1.self_attn.q_proj": 5}},
}


@pytest.mark.parametrize("case", PEFT_PATTERNS)
def test_peft_patterns_and_rslora_match_peft(llama, tmp_path, tensors, load_causal_lm, case):
    """An adapter PEFT itself builds with per-module ranks, alphas and rsLoRA: lrs reads the same scales, so the
    attached outputs and the merged weights equal PEFT's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        **PEFT_PATTERNS[case])
    peft_model = get_peft_model(load_causal_lm(llama), config).eval()
    peft_model.save_pretrained(tmp_path / "ad")
    adapter = lrs.load_adapter(tmp_path / "ad")
    layers = {path: peft_model.base_model.model.get_submodule(path) for path in adapter.weights}
    assert {p: adapter.config.rank(p) for p in layers} == {p: layer.r["default"] for p, layer in layers.items()}
    scales = {p: adapter.config.scale(p) for p in layers}
    assert scales == pytest.approx({p: layer.scaling["default"] for p, layer in layers.items()}, rel=1e-12)
    assert len(set(scales.values())) > 1 or case == "rslora"  # the patterns really differ between modules
    ours = lrs.attach(load_causal_lm(llama), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)
    merge(tmp_path / "ad", llama, tmp_path / "merged")
    merged, theirs = tensors(tmp_path / "merged"), peft_model.merge_and_unload().state_dict()
    for path in adapter.weights:
        torch.testing.assert_close(merged[f"{path}.weight"], theirs[f"{path}.weight"], rtol=1e-5, atol=1e-5, msg=path)


@pytest.mark.parametrize("method", [m for m, cls in lrs.METHODS.items() if cls.completable])
def test_adapter_lacking_completable_parameters(llama, tmp_path, make_adapter, tensors, method):
    """Parameters an imported adapter may lack are recomputed from the base at merge; unmerge refuses without them."""
    full = make_adapter(method, llama)  # the method's default case
    lacking = lambda: lrs.Adapter(full.config, {  # noqa: E731  (merge completes it in place: a fresh one each time)
        path: {n: t for n, t in params.items() if n not in full.method.completable} for path, params in full.weights.items()})
    merge(full, llama, tmp_path / "full")
    merge(lacking(), llama, tmp_path / "lacking")
    completed = tensors(tmp_path / "lacking")
    for name, t in tensors(tmp_path / "full").items():
        torch.testing.assert_close(completed[name], t, rtol=1e-6, atol=1e-6, msg=name)
    with pytest.raises(lrs.LrsError, match="recomputed from the original base"):
        unmerge(lacking(), tmp_path / "full", tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_bf16_unmerge_is_correctly_rounded_and_bounded(tmp_path, build_model, make_adapter, tensors):
    base = build_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    adapter = make_adapter("lora", base)
    lrs.save_adapter(adapter, tmp_path / "ad")
    merge(tmp_path / "ad", base, tmp_path / "merged")
    report = unmerge(tmp_path / "ad", tmp_path / "merged", tmp_path / "back")
    original, merged, back = tensors(base), tensors(tmp_path / "merged"), tensors(tmp_path / "back")
    impl, worst = adapter.method, 0.0
    for name, w in original.items():
        path = name.removesuffix(".weight")
        assert back[name].dtype == torch.bfloat16
        if path not in adapter.weights:
            assert torch.equal(back[name], w)
            continue
        delta = impl.delta(adapter.weights[path], path, tuple(w.shape), w.float()).double()
        exact = merged[name].double() - delta
        ulp = torch.ldexp(torch.full_like(exact, 2.0**-7), torch.frexp(exact)[1] - 1)
        assert ((back[name].double() - exact.to(torch.bfloat16).double()).abs() <= ulp).all(), name
        worst = max(worst, float((back[name].double() - w.double()).abs().max()))
    bound = report.error_bound
    assert bound["merged_dtype"] == "bfloat16" and bound["tensor"] in original
    assert 0 < worst <= bound["absolute"] and bound["relative"] <= 2**-6


def test_unmerge_bound_holds_for_ill_conditioned_bat(tmp_path, tensors):
    """FOSSIL bat amplifies the merged weights' rounding by (I + D_b)⁻¹: the reported bound is the largest over
    tensors and is not below the actual distance from the original base (one tensor badly conditioned with large
    weights, another milder with tiny ones, whose relative bound is the larger)."""
    gen = torch.Generator().manual_seed(0)
    original = {"a.proj.weight": 0.5 * torch.randn(16, 16, generator=gen),
                "b.proj.weight": 1e-3 * torch.randn(16, 16, generator=gen)}
    save_file(original, tmp_path / "base.safetensors")
    config = lrs.AdapterConfig(method="fossil", r=8, alpha=8.0, target_modules=["proj"], fan_in_fan_out=False,
                               options={"variant": "bat", "mini_r": None})
    blocks = {"a.proj": -torch.eye(8) + 0.02 * torch.randn(2, 8, 8, generator=gen),
              "b.proj": -torch.eye(8) + 0.2 * torch.randn(2, 8, 8, generator=gen)}
    adapter = lrs.Adapter(config, {path: {"miss_block": block} for path, block in blocks.items()})
    merge(adapter, tmp_path / "base.safetensors", tmp_path / "merged")
    report = unmerge(adapter, tmp_path / "merged", tmp_path / "back")
    back = tensors(tmp_path / "back")
    actual = {name: float((back[name].double() - w.double()).abs().max()) for name, w in original.items()}
    bound = report.error_bound
    assert actual["a.proj.weight"] > 1e-6  # the amplification is real: float32's 1e-6 does not hold here
    assert max(actual.values()) <= bound["absolute"] <= 50 * max(actual.values())
    assert bound["tensor"] == "a.proj.weight" and bound["merged_dtype"] == "float32"


def test_multishard_layout_kept_or_resharded(llama, tmp_path, make_adapter, tensors):
    adapter = make_adapter("lora", llama, targets="q_proj,v_proj")
    lrs.save_adapter(adapter, tmp_path / "ad")
    merge(tmp_path / "ad", llama, tmp_path / "same")
    files = lambda p: sorted(f.name for f in p.iterdir())  # noqa: E731
    assert files(tmp_path / "same") == sorted(files(llama) + ["README.md"])
    index = lambda p: json.loads((p / "model.safetensors.index.json").read_text())["weight_map"]  # noqa: E731
    assert index(tmp_path / "same") == index(llama)
    readme = (tmp_path / "same" / "README.md").read_text()
    assert "lora" in readme and str(llama) in readme and "q_proj" in readme

    report = merge(tmp_path / "ad", llama, tmp_path / "small", max_shard_size="30KB", dtype="bfloat16")
    shards = sorted((tmp_path / "small").glob("*.safetensors"))
    assert len(shards) == len(report.shards) > 3 and all(s.stat().st_size < 200_000 for s in shards)
    small = tensors(tmp_path / "small")
    assert set(index(tmp_path / "small")) == set(small) == set(index(llama))
    assert all(t.dtype == torch.bfloat16 for t in small.values())
    torch.testing.assert_close(small["lm_head.weight"], tensors(llama)["lm_head.weight"].bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_tied_output_layer_is_untied(tiny_models, tmp_path, tensors, load_causal_lm, arch):
    """An adapter on a tied lm_head (absent from the checkpoint) writes it separately and unties the config."""
    base = tiny_models[arch]
    gen = torch.Generator().manual_seed(0)
    config = lrs.AdapterConfig(method="lora", r=2, alpha=2.0, target_modules=["lm_head"])
    adapter = lrs.Adapter(config, {"lm_head": {"lora_A.weight": torch.randn(2, 64, generator=gen) * 0.1,
                                               "lora_B.weight": torch.randn(128, 2, generator=gen) * 0.1}})
    report = merge(adapter, base, tmp_path / "merged")
    assert report.untied == ["lm_head.weight"]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    merged, original = tensors(tmp_path / "merged"), tensors(base)
    embedding = next(n for n in original if n.endswith(("embed_tokens.weight", "wte.weight")))
    assert torch.equal(merged[embedding], original[embedding])
    assert (merged["lm_head.weight"] - original[embedding]).abs().max() > 1e-3
    attached = lrs.attach(load_causal_lm(base), adapter).eval()
    assert_same_logits(logits(load_causal_lm(tmp_path / "merged")), logits(attached))


# ------------------------------------------------------------------------------------------------ CLI and bad input


def test_cli_merge_unmerge_json_and_text(lrs, llama, tmp_path, make_adapter):
    adapter = make_adapter("lora", llama, targets="q_proj")
    save_adapter(adapter, tmp_path / "ad")
    res = lrs("merge", tmp_path / "ad", llama, tmp_path / "m", "--dtype", "bfloat16", "--json")
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["modules"] == 2
    res = lrs("unmerge", tmp_path / "ad", tmp_path / "m", tmp_path / "u")
    assert res.code == 0, res.stderr
    assert "unmerged lora adapter (2 modules)" in res.stdout and "distance from the original base: at most" in res.stdout
    assert "bfloat16" in res.stdout
    for command in ("merge", "unmerge"):
        assert f"Example: lrs {command}" in lrs(command, "--help").stdout


def _wrong_shape(adapter: lrs.Adapter, out: Path) -> Path:
    """The q_proj LoRA `adapter` saved in `out` with layer 1's lora_A of the wrong shape."""
    params = adapter.weights["model.layers.1.self_attn.q_proj"]
    params["lora_A.weight"] = torch.zeros(4, 32)
    save_adapter(adapter, out)
    return out


def _edited_config(good: Path, out: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the adapter `good` whose adapter_config.json went through `edit`."""
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    config = read_config(good)  # with the lrs block, as adapters before 0.2 stored it
    edit(config)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


CONFIG_EDITS: dict[str, Callable[[dict], object]] = {  # adapter_config.json edits of the good adapter, by name
    "r-text": lambda c: c.update(r="four"),
    "r-zero": lambda c: c.update(r=0),
    "r-fraction": lambda c: c.update(r=4.9),
    "alpha-text": lambda c: c.update(lora_alpha="8"),
    "dropout-text": lambda c: c.update(lora_dropout="0.1"),
    "rslora-text": lambda c: c.update(use_rslora="yes"),
    "bad-regex": lambda c: c.update(rank_pattern={"(": 2}),
    "rank-pattern-text": lambda c: c.update(rank_pattern={"q_proj": "2"}),
    "alpha-pattern-list": lambda c: c.update(alpha_pattern=[1]),
    "lrs-text": lambda c: c.update(lrs="lora"),
    "saved-int": lambda c: c.update(modules_to_save=5),
    "lrs-alpha-text": lambda c: c["lrs"].update(alpha="x"),
    "lrs-fan-in-fan-out-text": lambda c: c["lrs"].update(fan_in_fan_out="yes"),
    "bad-method": lambda c: c["lrs"].update(method="foobar"),
    "lrs-niter-text": lambda c: c["lrs"].update(niter="4"),
}


@pytest.fixture(scope="module")
def merge_inputs(tiny_models, tmp_path_factory, make_adapter, bare_copy, peft_gpt2_lora) -> Path:
    """Good and broken adapters and bases for the merge table below, built once."""
    root = tmp_path_factory.mktemp("merge-inputs")
    llama = tiny_models["llama"]
    save_adapter(make_adapter("lora", llama, targets="q_proj"), root / "good")
    save_adapter(make_adapter("lora", tiny_models["gpt2"]), root / "gpt2-adapter")
    infinite = make_adapter("lora", llama, targets="q_proj")
    infinite.weights["model.layers.0.self_attn.q_proj"]["lora_B.weight"][0, 0] = float("inf")
    save_adapter(infinite, root / "infinite")
    _wrong_shape(make_adapter("lora", llama, targets="q_proj"), root / "wrong-shape")
    (root / "corrupt").mkdir()
    for f in llama.iterdir():
        data = f.read_bytes()
        (root / "corrupt" / f.name).write_bytes(data[:-64] if f.name.endswith("00002-of-00003.safetensors") else data)
    shutil.copytree(llama, root / "exists" / "base")  # also an OUT that holds an input
    for name, edit in CONFIG_EDITS.items():
        _edited_config(root / "good", root / name, edit)
    small, _ = _small_base_and_adapter(root)
    _with_negative_dims(small, root / "negative.safetensors")
    peft_gpt2_lora(tiny_models["gpt2"], root / "gpt2-peft")
    _edited_config(root / "gpt2-peft", root / "undeclared", lambda c: c.pop("fan_in_fan_out"))
    bare_copy(tiny_models["gpt2"], root / "bare-gpt2" / "model.safetensors")
    return root


MERGE_BAD = {  # expected message -> ADAPTER BASE OUT [options]; OUT is a fresh path unless given
    "it has module transformer.h.0.attn.c_attn, which": ["{root}/gpt2-adapter", "{llama}", "OUT"],
    "model.layers.1.self_attn.q_proj.lora_A.weight has shape [4, 32]": ["{root}/wrong-shape", "{llama}", "OUT"],
    "truncated": ["{root}/good", "{root}/corrupt", "OUT"],
    "already exists; pass --force": ["{root}/good", "{llama}", "{root}/exists"],
    "would replace the input": ["{root}/good", "{root}/exists/base", "{root}/exists", "--force"],
    "NaN or Inf in model.layers.0.self_attn.q_proj.weight": ["{root}/infinite", "{llama}", "OUT"],
    "r-text/adapter_config.json: r must be a positive integer, got \"four\"": ["{root}/r-text", "{llama}", "OUT"],
    "r-zero/adapter_config.json: r must be a positive integer, got 0": ["{root}/r-zero", "{llama}", "OUT"],
    "r-fraction/adapter_config.json: r must be a positive integer, got 4.9": ["{root}/r-fraction", "{llama}", "OUT"],
    "lora_alpha must be a finite number, got \"8\"": ["{root}/alpha-text", "{llama}", "OUT"],
    "lora_dropout must be a number in [0, 1) or null, got \"0.1\"": ["{root}/dropout-text", "{llama}", "OUT"],
    "use_rslora must be true or false, got \"yes\"": ["{root}/rslora-text", "{llama}", "OUT"],
    "rank_pattern key '(' is not a regular expression": ["{root}/bad-regex", "{llama}", "OUT"],
    "rank_pattern must be an object of positive integers or null, got {\"q_proj\": \"2\"}": [
        "{root}/rank-pattern-text", "{llama}", "OUT"],
    "alpha_pattern must be an object of finite numbers or null, got [1]": ["{root}/alpha-pattern-list", "{llama}", "OUT"],
    "lrs must be an object, got \"lora\"": ["{root}/lrs-text", "{llama}", "OUT"],
    "modules_to_save must be a module name, a list of names or null, got 5": ["{root}/saved-int", "{llama}", "OUT"],
    "lrs.alpha must be a finite number, got \"x\"": ["{root}/lrs-alpha-text", "{llama}", "OUT"],
    "lrs.niter must be an integer >= 0 or null, got \"4\"": ["{root}/lrs-niter-text", "{llama}", "OUT"],
    "lrs.fan_in_fan_out must be true, false or null, got \"yes\"": ["{root}/lrs-fan-in-fan-out-text", "{llama}", "OUT"],
    "adapter declares lrs method 'foobar', which peft_type LORA does not support": ["{root}/bad-method", "{llama}", "OUT"],
    "size '0' is less than one byte": ["{root}/good", "{llama}", "OUT", "--max-shard-size", "0"],
    "model.safetensors stores transformer.h.0.attn.c_proj.weight transposed (as GPT-2's Conv1D does)": [
        "{root}/undeclared", "{root}/bare-gpt2/model.safetensors", "OUT"],
    "tensor big.weight holds 1e+05, beyond the range of float16": [
        "{root}/small-adapter", "{root}/small.safetensors", "OUT", "--dtype", "float16"],
    "tensor bad has shape [-1, -2], not a list of non-negative integers": [
        "{root}/small-adapter", "{root}/negative.safetensors", "OUT"],
}


@pytest.mark.parametrize("expected", MERGE_BAD)
def test_bad_input_exits_1_with_one_line_and_leaves_nothing(lrs, tiny_models, merge_inputs, tmp_path, fill,
                                                            assert_one_line_error, expected):
    adapter, base, out, *options = fill(MERGE_BAD[expected], root=merge_inputs, llama=tiny_models["llama"])
    out = tmp_path / "out" if out == "OUT" else Path(out)
    assert_one_line_error(lrs("merge", adapter, base, out, *options), expected)
    assert not out.exists() or out.name == "exists"
    assert not [p for p in [*tmp_path.iterdir(), *merge_inputs.iterdir()] if ".lrs-tmp" in p.name]


def test_null_patterns_are_no_patterns(llama, tmp_path, make_adapter):
    """PEFT writers that store null for an empty rank_pattern/alpha_pattern: the adapter loads with none."""
    save_adapter(make_adapter("lora", llama, targets="q_proj"), tmp_path / "good")
    edited = _edited_config(tmp_path / "good", tmp_path / "null", lambda c: c.update(rank_pattern=None, alpha_pattern=None))
    config = lrs.load_adapter(edited).config
    assert config.rank_pattern == {} and config.alpha_pattern == {}


def _small_base_and_adapter(tmp_path: Path) -> tuple[Path, Path]:
    """A bare safetensors base with a linear weight and an untouched tensor float16 cannot hold, and a LoRA on it."""
    base = tmp_path / "small.safetensors"
    save_file({"layer.proj.weight": torch.randn(8, 8), "big.weight": torch.tensor([1.0, -1e5])}, base)
    config = lrs.AdapterConfig(method="lora", r=2, alpha=2.0, target_modules=["proj"])
    params = {"lora_A.weight": torch.randn(2, 8), "lora_B.weight": torch.randn(8, 2)}
    adapter = lrs.Adapter(config, {"layer.proj": params})
    save_adapter(adapter, tmp_path / "small-adapter")
    return base, tmp_path / "small-adapter"


def _with_negative_dims(base: Path, out: Path) -> Path:
    """`base` plus a tensor whose shape [-1, -2] has a positive product (the old reader's check passed it)."""
    import struct

    raw = base.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    data = raw[8 + length:]
    header["bad"] = {"dtype": "F32", "shape": [-1, -2], "data_offsets": [len(data), len(data) + 8]}
    blob = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + data + bytes(8))
    return out


@pytest.mark.parametrize("command", ["merge", "unmerge"])
def test_cast_that_overflows_is_refused(lrs, tmp_path, assert_clean_failure, tensors, command):
    """--dtype float16 on a base holding an untouched tensor beyond float16's range: one line, no inf written."""
    base, adapter = _small_base_and_adapter(tmp_path)
    out = tmp_path / "out"
    res = lrs(command, adapter, base, out, "--dtype", "float16")
    assert_clean_failure(res, "tensor big.weight holds 1e+05, beyond the range of float16", tmp_path, out)
    assert lrs(command, adapter, base, out, "--dtype", "bfloat16").code == 0
    written = tensors(out)["big.weight"]
    assert written.dtype == torch.bfloat16 and torch.isfinite(written).all() and written[1] < -9e4


@pytest.fixture(scope="session")
def assert_clean_failure(assert_one_line_error):
    """assert_clean_failure(res, expected, tmp_path, out): a one-line error that left neither OUT nor a temporary."""

    def check(res, expected: str, tmp_path: Path, out: Path) -> None:
        assert_one_line_error(res, expected)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if ".lrs-tmp" in p.name]

    return check


def test_no_space_left_removes_the_temporary_output(lrs, llama, tmp_path, monkeypatch, make_adapter,
                                                    assert_clean_failure):
    save_adapter(make_adapter("lora", llama, targets="q_proj"), tmp_path / "ad")
    calls = []

    def full_disk(self, name, *data):
        calls.append(name)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("lowrank_surgery.merge.ShardedWriter.write", full_disk)
    monkeypatch.setattr("lowrank_surgery.merge.ShardedWriter.copy", full_disk)
    res = lrs("merge", tmp_path / "ad", llama, tmp_path / "out")
    assert_clean_failure(res, "no space left on device", tmp_path, tmp_path / "out")
    assert 4 <= len(calls) <= 4 + WORKERS  # workers already busy may finish their tensor; the rest never start
