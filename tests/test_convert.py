"""lrs convert (every method -> PEFT LoRA, kohya, mlx-lm, MiSS, CoLA) and lrs extract-lora, against stock PEFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowrank_surgery as ls
from lowrank_surgery.convert import convert, lora_adapter, read_adapter
from lowrank_surgery.errors import LrsError
from lowrank_surgery.extract import extract_lora
from lowrank_surgery.targets import linear_targets, load_weight


@pytest.fixture(scope="session")
def trained(make_adapter):
    """trained(base, case): an adapter of a METHOD_CASES case on every linear module, alpha 2r + 1, whose trainable
    parameters moved away from their init, as after training."""
    return lambda base, case: make_adapter(case, base, alpha=lambda r: 2.0 * r + 1, targets="all-linear", seed=0,
                                           moved_seed=1)


def _deltas(adapter: ls.Adapter, base) -> dict[str, torch.Tensor]:
    ckpt = ls.Checkpoint(base)
    targets = {t.path: t for t in linear_targets(ckpt)}
    method = adapter.method
    return {p: method.delta(params, p, targets[p].shape, load_weight(ckpt, targets[p])).float()
            for p, params in adapter.weights.items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _projections(model) -> dict[str, torch.Tensor]:
    return {n[: -len(".weight")]: p.detach() for n, p in model.named_parameters() if n.endswith("_proj.weight")}


# method_case: every case of conftest's METHOD_CASES, each method and variant
def test_every_method_to_peft_lora(llama, tmp_path, method_case, trained, lrs_block, load_causal_lm):
    """ΔW survives (exactly where low-rank, else with the reported SVD error); stock PEFT loads and merges it."""
    from peft import PeftModel

    adapter = trained(llama, method_case)
    ls.save_adapter(adapter, tmp_path / "src")
    expected = _deltas(adapter, llama)
    shapes = {t.path: t.shape for t in linear_targets(ls.Checkpoint(llama))}
    exact = all(adapter.method.pair(p, shape=shapes[path]) is not None for path, p in adapter.weights.items())
    report = convert(tmp_path / "src", tmp_path / "out", "peft-lora", base=llama, allow_lossy=not exact)
    assert report["lossy"] is not exact and report["modules"] == len(adapter.weights)
    converted = ls.load_adapter(tmp_path / "out")
    assert converted.config.method == "lora"
    got = _deltas(converted, llama)
    if exact:
        assert all(_rel(got[path], delta) < 1e-5 for path, delta in expected.items())
    else:
        stored = lrs_block(tmp_path / "out")["conversion_error"]
        for path, delta in expected.items():
            assert stored[path] == pytest.approx(_rel(got[path], delta), rel=1e-3, abs=1e-6) and stored[path] > 1e-3

    peft = PeftModel.from_pretrained(load_causal_lm(llama), tmp_path / "out").eval()
    merged = _projections(peft.merge_and_unload())
    base_w = _projections(load_causal_lm(llama))
    for path, w in base_w.items():
        reference = w + got[path] if path in got else w
        assert _rel(merged[path], reference) < 1e-5
        if exact and path in expected:
            assert _rel(merged[path] - w, expected[path]) < 1e-5


def _mixed_lora(llama) -> ls.Adapter:
    """A plain LoRA with per-module ranks and scales (rank_pattern, alpha_pattern)."""
    gen = torch.Generator().manual_seed(7)
    pairs = {}
    for k, t in enumerate(linear_targets(ls.Checkpoint(llama))[:9]):
        r = 2 + k % 3
        pairs[t.path] = (torch.randn(t.out_features, r, generator=gen), torch.randn(r, t.in_features, generator=gen),
                         0.5 + k)
    adapter = lora_adapter(pairs, {"base_model": str(llama)})
    assert adapter.config.rank_pattern and adapter.config.alpha_pattern
    return adapter


@pytest.mark.parametrize("fmt", ["kohya", "mlx"])
def test_round_trip_keeps_delta(llama, tmp_path, fmt):
    adapter = _mixed_lora(llama)
    ls.save_adapter(adapter, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / fmt, fmt)
    convert(tmp_path / fmt, tmp_path / "back", "peft-lora")
    back = ls.load_adapter(tmp_path / "back")
    assert set(back.weights) == set(adapter.weights)
    before, after = _deltas(adapter, llama), _deltas(back, llama)
    for path in before:
        assert _rel(after[path], before[path]) < 1e-6
    info = ls.inspect_path(tmp_path / fmt)
    assert info["format"] == fmt and info["modules"] == 9


def test_kohya_layout_and_name_resolution(llama, tmp_path):
    adapter = _mixed_lora(llama)
    ls.save_adapter(adapter, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "k", "kohya")
    tensors = load_file(tmp_path / "k" / "adapter_model.safetensors")
    name = "lora_te_model_layers_0_self_attn_q_proj"
    assert tensors[f"{name}.lora_down.weight"].shape[1] == 64 and tensors[f"{name}.alpha"].dim() == 0
    a = adapter.weights["model.layers.0.self_attn.q_proj"]["lora_A.weight"]
    alpha = adapter.config.scale("model.layers.0.self_attn.q_proj") * a.shape[0]
    assert alpha != a.shape[0] and tensors[f"{name}.alpha"] == pytest.approx(alpha)
    # A foreign kohya file: no lrs metadata, another prefix, no alpha for one module.
    foreign = {k.replace("lora_te_", "lora_transformer_"): v for k, v in tensors.items() if k != f"{name}.alpha"}
    save_file(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(LrsError, match="--base"):
        read_adapter(tmp_path / "foreign.safetensors")
    with pytest.warns(ls.LrsWarning) as warned:
        back, fmt = read_adapter(tmp_path / "foreign.safetensors", ls.Checkpoint(llama))
    assert fmt == "kohya" and set(back.weights) == set(adapter.weights)
    assert "alpha = r" in str(warned[0].message)
    assert back.config.scale("model.layers.0.self_attn.q_proj") == 1.0


def test_mlx_layout(llama, tmp_path, trained):
    adapter = trained(llama, "lora")
    ls.save_adapter(adapter, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "m", "mlx", base=llama)
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    params = config["lora_parameters"]
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert params["rank"] == 4 and params["scale"] == pytest.approx(9 / 4) and "self_attn.q_proj" in params["keys"]
    tensors = load_file(tmp_path / "m" / "adapters.safetensors")
    q = adapter.weights["model.layers.1.self_attn.q_proj"]
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.lora_a"], q["lora_A.weight"].T)  # in × r
    assert torch.equal(tensors["model.layers.1.self_attn.q_proj.lora_b"], q["lora_B.weight"].T)  # r × out


def test_peft_miss_rewrites_fossil_and_bone(llama, tmp_path, trained):
    adapter = trained(llama, "fossil")
    ls.save_adapter(adapter, tmp_path / "src")
    config = json.loads((tmp_path / "src" / "adapter_config.json").read_text())
    bone = tmp_path / "bone"
    bone.mkdir()
    (bone / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "BONE"}))
    tensors = load_file(tmp_path / "src" / "adapter_model.safetensors")
    save_file({k.replace("miss_block", "bone_block"): v for k, v in tensors.items()}, bone / "adapter_model.safetensors")
    convert(bone, tmp_path / "miss", "peft-miss")
    out = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    assert out["peft_type"] == "MISS"
    back = load_file(tmp_path / "miss" / "adapter_model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_extract_lora_recovers_planted_change(llama, tmp_path, lrs, edited_copy):
    r = 3
    gen = torch.Generator().manual_seed(5)
    planted = {}

    def plant(name: str, t: torch.Tensor) -> torch.Tensor:
        if not name.endswith(("q_proj.weight", "down_proj.weight")):
            return t
        planted[name[: -len(".weight")]] = d = torch.randn(t.shape[0], r, generator=gen) @ torch.randn(
            r, t.shape[1], generator=gen) * 0.1
        return t + d

    ft = edited_copy(llama, tmp_path / "ft", plant)
    res = lrs("extract-lora", ft, llama, tmp_path / "out", "--rank", r, "--json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["modules"] == len(planted) == 4 and report["unchanged"] == 10
    assert all(row["energy"] > 1 - 1e-6 for row in report["per_module"])
    adapter = ls.load_adapter(tmp_path / "out")
    for path, delta in _deltas(adapter, llama).items():
        assert _rel(delta, planted[path]) < 1e-5
    table = lrs("extract-lora", ft, llama, tmp_path / "out", "--rank", 2, "--force", "--algorithm", "randomized")
    assert table.code == 0 and "energy" in table.stdout and "model.layers.0.self_attn.q_proj" in table.stdout


def test_extract_lora_needs_same_layout(tiny_models, tmp_path):
    with pytest.raises(LrsError, match="is in .* but not in"):
        extract_lora(tiny_models["qwen2"], tiny_models["llama"], tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()


CHANGED_WHOLE = {"model.norm.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"}


@pytest.fixture(scope="module")
def finetuned(llama, tmp_path_factory, edited_copy):
    """The tiny llama with rank-2 changes to q_proj and down_proj, and changes a LoRA cannot hold (CHANGED_WHOLE)."""
    gen = torch.Generator().manual_seed(7)

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.endswith(("q_proj.weight", "down_proj.weight")):
            return t + torch.randn(t.shape[0], 2, generator=gen) @ torch.randn(2, t.shape[1], generator=gen)
        return t + 0.1 * torch.randn(t.shape, generator=gen) if name in CHANGED_WHOLE else t

    return edited_copy(llama, tmp_path_factory.mktemp("finetuned") / "ft", change)


def test_extract_lora_reports_and_warns_what_a_lora_cannot_hold(lrs, llama, finetuned, tmp_path):
    res = lrs("extract-lora", finetuned, llama, tmp_path / "out", "--rank", 2, "--json")
    assert res.code == 0, res.stderr
    assert res.stderr.startswith("warning: 3 changed tensor(s)") and res.stderr.count("\n") == 1, res.stderr
    assert "--save-changed" in res.stderr
    report = json.loads(res.stdout)
    assert set(report["dropped"]["tensors"]) == CHANGED_WHOLE and report["modules_to_save"] == []
    base, ft = ls.Checkpoint(llama), ls.Checkpoint(finetuned)
    expected = max(float((ft.get(n) - base.get(n)).norm() / base.get(n).norm()) for n in CHANGED_WHOLE)
    assert report["dropped"]["max_relative_change"] == pytest.approx(expected, rel=1e-6)
    assert report["min_energy"] > 1 - 1e-6 and report["total_energy"] < 0.999  # the LoRA is exact, the whole is not
    lost = sum(float((ft.get(n).double() - base.get(n).double()).square().sum()) for n in CHANGED_WHOLE)
    total = lost + sum(row["squared"] for row in report["per_module"])
    assert report["total_energy"] == pytest.approx(1 - lost / total, rel=1e-6)


def test_extract_lora_save_changed_reproduces_the_finetuned_model_in_peft(lrs, llama, finetuned, tmp_path,
                                                                        load_causal_lm):
    from peft import PeftModel

    res = lrs("extract-lora", finetuned, llama, tmp_path / "out", "--rank", 2, "--save-changed")
    assert res.code == 0 and not res.stderr, res.stderr
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == sorted(n.removesuffix(".weight") for n in CHANGED_WHOLE)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_causal_lm(finetuned)(input_ids=ids).logits
        before = load_causal_lm(llama)(input_ids=ids).logits
        peft = PeftModel.from_pretrained(load_causal_lm(llama), tmp_path / "out").eval()(input_ids=ids).logits
    assert _rel(before, expected) > 1e-2
    torch.testing.assert_close(peft, expected, rtol=1e-4, atol=1e-4)
    assert lrs("merge", tmp_path / "out", llama, tmp_path / "merged").code == 0
    with torch.no_grad():
        merged = load_causal_lm(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)
    assert ls.inspect_path(tmp_path / "out")["modules_to_save"] == config["modules_to_save"]


def test_extract_lora_save_module_keeps_only_the_named(lrs, llama, finetuned, tmp_path):
    res = lrs("extract-lora", finetuned, llama, tmp_path / "out", "--rank", 2, "--save-module", "norm", "--json")
    assert res.code == 0 and res.stderr.startswith("warning: 2 changed tensor(s)"), res.stderr
    report = json.loads(res.stdout)
    assert report["modules_to_save"] == ["model.norm"]
    assert set(report["dropped"]["tensors"]) == CHANGED_WHOLE - {"model.norm.weight"}
    assert set(ls.load_adapter(tmp_path / "out").saved) == {"model.norm.weight"}


def test_extract_lora_warns_that_peft_unties_a_saved_tied_embedding(lrs, tiny_models, tmp_path, edited_copy,
                                                                   load_causal_lm):
    """qwen2 ties lm_head to embed_tokens: PEFT's modules_to_save copy breaks the tie, lrs merge keeps it."""
    base = tiny_models["qwen2"]
    gen = torch.Generator().manual_seed(3)

    def change(name: str, t: torch.Tensor) -> torch.Tensor:
        if name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
            return t + torch.outer(torch.randn(t.shape[0], generator=gen), torch.randn(t.shape[1], generator=gen))
        return t

    ft = edited_copy(base, tmp_path / "ft", change)
    res = lrs("extract-lora", ft, base, tmp_path / "out", "--rank", 1, "--save-changed")
    assert res.code == 0 and res.stderr.startswith("warning: model.embed_tokens.weight is tied to lm_head.weight"), res.stderr
    assert lrs("merge", tmp_path / "out", base, tmp_path / "merged").code == 0
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(tmp_path / "merged")(input_ids=ids).logits,
                                   load_causal_lm(ft)(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


BAD_EXTRACT = {  # expected message: command line but OUT (placed third, or after the adapter for convert)
    "--niter must be at least 0, got -1": lambda f: ["extract-lora", f["ft"], f["llama"], "--rank", "2",
                                                     "--algorithm", "randomized", "--niter", "-1"],
    "--save-module nothing matches no module of": lambda f: ["extract-lora", f["ft"], f["llama"], "--rank", "2",
                                                             "--save-module", "nothing"],
    "a module the LoRA targets": lambda f: ["extract-lora", f["ft"], f["llama"], "--rank", "2",
                                            "--save-module", "q_proj"],
    "unmerge cannot recover the values they replaced": lambda f: ["unmerge", f["saved"], f["llama"]],
    "which --to kohya cannot carry": lambda f: ["convert", f["saved"], "--to", "kohya"],
}


@pytest.mark.parametrize("expected", list(BAD_EXTRACT))
def test_bad_extract_input_exits_1_with_one_line(lrs, llama, finetuned, tmp_path_factory, expected):
    saved = tmp_path_factory.getbasetemp() / "saved-modules-adapter"
    if not saved.exists():
        extract_lora(finetuned, llama, saved, 2, save_changed=True)
    args = BAD_EXTRACT[expected]({"ft": finetuned, "llama": llama, "saved": saved})
    out = tmp_path_factory.mktemp("bad-extract") / "out"
    at = 2 if args[0] == "convert" else 3
    res = lrs(*args[:at], out, *args[at:])
    assert res.code == 1 and expected in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def convert_inputs(llama, tmp_path_factory, trained) -> Path:
    """Adapters lrs cannot convert, or not without help, built once for the table below."""
    root = tmp_path_factory.mktemp("convert-inputs")
    ls.save_adapter(trained(llama, "lora"), root / "lora")
    convert(root / "lora", root / "k", "kohya")
    convert(root / "lora", root / "mlx", "mlx")
    kohya = load_file(root / "k" / "adapter_model.safetensors")
    metadata = safe_open(root / "k" / "adapter_model.safetensors", "pt").metadata()
    (root / "unknown").mkdir()
    save_file({"layers.0.weight": torch.zeros(2, 2)}, root / "unknown" / "x.safetensors")
    save_file({**kohya, "model.layers.0.mlp.up_proj.lora_a": torch.zeros(64, 2)}, root / "mixed.safetensors")
    save_file(kohya, root / "bare.safetensors")
    alpha = next(k for k in kohya if k.endswith(".alpha"))
    for name, tensors, meta in [("modules-not-json", kohya, {**metadata, "lrs_modules": "{oops"}),
                                ("modules-list", kohya, {**metadata, "lrs_modules": "[1]"}),
                                ("alpha-pair", {**kohya, alpha: torch.tensor([1.0, 2.0])}, metadata),
                                ("alpha-nan", {**kohya, alpha: torch.tensor(float("nan"))}, metadata)]:
        save_file(tensors, root / f"{name}.safetensors", metadata=meta)
    for name, scale, dropout in [("mlx-scale-text", "2", 0.0), ("mlx-scale-null", None, 0.0), ("mlx-dropout-text", 2.0, "x")]:
        shutil.copytree(root / "mlx", root / name)
        config = json.loads((root / name / "adapter_config.json").read_text())
        config["lora_parameters"].update(scale=scale, dropout=dropout)
        (root / name / "adapter_config.json").write_text(json.dumps(config))
    (root / "bad-config").mkdir()
    (root / "bad-config" / "adapter_config.json").write_text("{not json")
    ls.save_adapter(trained(llama, "fossil-bat"), root / "bat")
    return root


CONVERT_BAD = {  # expected message -> ADAPTER [options]
    "unrecognised adapter key layout: 1 unknown key(s), e.g. layers.0.weight": ["{root}/unknown", "--to", "mlx"],
    "mixed adapter key layout": ["{root}/mixed.safetensors", "--to", "peft-lora"],
    "loses information (--rank 2 truncates": ["{root}/lora", "--to", "peft-lora", "--rank", "2"],
    "needs the base model (--base MODEL)": ["{root}/bare.safetensors", "--to", "peft-lora"],
    "cannot be expressed as MISS": ["{root}/lora", "--to", "peft-miss"],
    "bad-config/adapter_config.json: not valid JSON": ["{root}/bad-config", "--to", "mlx"],
    "modules-not-json.safetensors: metadata lrs_modules is not a JSON object": ["{root}/modules-not-json.safetensors",
                                                                                "--to", "peft-lora"],
    "modules-list.safetensors: metadata lrs_modules is not a JSON object": ["{root}/modules-list.safetensors",
                                                                            "--to", "peft-lora"],
    "has .alpha [1.0, 2.0], not one finite number": ["{root}/alpha-pair.safetensors", "--to", "peft-lora"],
    "has .alpha nan, not one finite number": ["{root}/alpha-nan.safetensors", "--to", "peft-lora"],
    "lora_parameters.scale must be a finite number, got \"2\"": ["{root}/mlx-scale-text", "--to", "peft-lora"],
    "lora_parameters.scale must be a finite number, got null": ["{root}/mlx-scale-null", "--to", "peft-lora"],
    "lora_parameters.dropout must be a number in [0, 1) or null, got \"x\"": ["{root}/mlx-dropout-text",
                                                                             "--to", "peft-lora"],
    "pass --base MODEL": ["{root}/bat", "--to", "kohya"],
    "ΔW is not low-rank, e.g.": ["{root}/bat", "--to", "peft-lora", "--base", "{llama}"],
}


@pytest.mark.parametrize("expected", CONVERT_BAD)
def test_bad_input_exits_1_with_one_line(lrs, llama, convert_inputs, tmp_path, fill, assert_one_line_error, expected):
    adapter, *options = fill(CONVERT_BAD[expected], root=convert_inputs, llama=llama)
    assert_one_line_error(lrs("convert", adapter, tmp_path / "out", *options), expected)
    assert not (tmp_path / "out").exists()


def test_unknown_format_is_a_usage_error(lrs, llama, tmp_path, trained):
    ls.save_adapter(trained(llama, "lora"), tmp_path / "lora")
    assert lrs("convert", tmp_path / "lora", tmp_path / "out", "--to", "onnx").code == 2


def test_cli_convert_prints_summary(lrs, llama, tmp_path, trained):
    ls.save_adapter(trained(llama, "lora"), tmp_path / "src")
    res = lrs("convert", tmp_path / "src", tmp_path / "out", "--to", "mlx")
    assert res.code == 0, res.stderr
    assert "exact" in res.stdout and "14 modules" in res.stdout
    assert lrs("convert", "--help").stdout.count("Example: lrs convert") == 1
