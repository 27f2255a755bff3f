"""CoRA: common subspaces against numpy, planted subspaces, the CoRA adapter against stock PEFT, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file

import lowrank_surgery as lrs
from lowrank_surgery.subspace import extract_subspace, load_subspace
from lowrank_surgery.targets import load_weight, select_targets

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory, llama, build_model) -> list[Path]:
    """Two tiny llamas (GQA: k_proj, v_proj are 32x64) with different weights."""
    return [llama, build_model("llama", tmp_path_factory.mktemp("second") / "llama", seed=1)]


def concatenations(models: list[Path], targets: str, scope: str) -> dict[str, np.ndarray]:
    """M = [W_1 | W_2 | …] per subspace name, built independently of lrs's streaming."""
    blocks: dict[str, list[np.ndarray]] = {}
    for model in models:
        ckpt = lrs.Checkpoint(model)
        for t in select_targets(ckpt, targets):
            blocks.setdefault(t.path if scope == "layer" else t.kind, []).append(load_weight(ckpt, t).double().numpy())
    return {name: np.concatenate(mats, axis=1) for name, mats in blocks.items()}


def projector(u: np.ndarray) -> np.ndarray:
    return u @ u.T


@pytest.mark.parametrize("algorithm", ["exact", "gram"])
@pytest.mark.parametrize("scope", ["layer", "model"])
def test_bases_equal_numpy_svd_of_the_concatenation(llama_pair, tmp_path, scope, algorithm):
    r = 8
    info = extract_subspace(llama_pair, tmp_path / "sub", rank=r, scope=scope, algorithm=algorithm, device="cpu")
    stored = load_file(tmp_path / "sub" / "subspace.safetensors")
    expected = concatenations(llama_pair, "q_proj,k_proj,v_proj", scope)
    assert set(info["energy"]) == set(expected) and len(expected) == (6 if scope == "layer" else 3)
    assert json.loads((tmp_path / "sub" / "subspace.json").read_text()) == info
    assert [m["hash"] for m in info["models"]] == [lrs.Checkpoint(m).fingerprint() for m in llama_pair]
    for name, m in expected.items():
        u_ref, s_ref, _ = np.linalg.svd(m, full_matrices=False)
        u, s = stored[f"{name}.basis"].double().numpy(), stored[f"{name}.singular_values"].double().numpy()
        assert u.shape == (m.shape[0], r) and stored[f"{name}.basis"].dtype == torch.float32
        assert info["shapes"][name] == list(m.shape)
        np.testing.assert_allclose(u.T @ u, np.eye(r), atol=1e-5)
        np.testing.assert_allclose(projector(u), projector(u_ref[:, :r]), atol=1e-5)
        np.testing.assert_allclose(s, s_ref[:r], rtol=1e-5)
        assert info["energy"][name] == pytest.approx((s_ref[:r] ** 2).sum() / (s_ref ** 2).sum(), rel=1e-5)
    shapes = {name: m.shape for name, m in expected.items()}
    assert shapes.get("model.layers.0.self_attn.k_proj", shapes.get("k_proj"))[0] == 32  # GQA: out < in


def test_conv1d_weights_are_transposed_to_linear_layout(tiny_models, tmp_path):
    gpt2 = tiny_models["gpt2"]
    extract_subspace([gpt2], tmp_path / "sub", rank=4, targets="c_attn", algorithm="exact", device="cpu")
    stored = load_file(tmp_path / "sub" / "subspace.safetensors")
    for name, m in concatenations([gpt2], "c_attn", "layer").items():
        assert m.shape == (192, 64)
        u_ref = np.linalg.svd(m, full_matrices=False)[0][:, :4]
        np.testing.assert_allclose(projector(stored[f"{name}.basis"].double().numpy()), projector(u_ref), atol=1e-5)


def test_randomized_recovers_a_planted_subspace(tmp_path):
    gen = torch.Generator().manual_seed(3)
    planted = torch.linalg.qr(torch.randn(96, 6, generator=gen)).Q
    weights = {f"model.layers.{i}.self_attn.q_proj.weight":
               planted @ torch.randn(6, 80, generator=gen) * 3 + 0.01 * torch.randn(96, 80, generator=gen)
               for i in range(2)}
    save_file(weights, tmp_path / "planted.safetensors")
    info = extract_subspace([tmp_path / "planted.safetensors"], tmp_path / "sub", rank=6, targets="q_proj",
                            scope="model", algorithm="randomized", niter=2, device="cpu")
    basis = load_file(tmp_path / "sub" / "subspace.safetensors")["q_proj.basis"]
    assert info["parameters"] == {"niter": 2, "oversample": 8}
    exact = np.linalg.svd(np.concatenate([w.double().numpy() for w in weights.values()], 1))[0][:, :6]
    assert max(scipy.linalg.subspace_angles(basis.double().numpy(), planted.double().numpy())) < 1e-2  # noise: ~5e-3
    assert max(scipy.linalg.subspace_angles(basis.double().numpy(), exact)) < 1e-4
    assert info["energy"]["q_proj"] > 0.999


# ------------------------------------------------------------------------------------------------ the adapter


def test_cora_adapter_is_a_peft_lora_matching_attach(llama, tmp_path, subspace, lrs_block, load_causal_lm):
    from peft import PeftModel

    sub = subspace(llama)
    adapter = lrs.init_adapter("cora", llama, r=4, alpha=8, options={"subspace": str(sub), "a_init": "kaiming"}, seed=3)
    bases = load_subspace(sub).bases
    assert set(adapter.weights) == set(bases) and len(bases) == 14  # default targets: the subspace's (all-linear)
    for path, params in adapter.weights.items():
        assert torch.equal(params["lora_B.weight"], bases[path][:, :4]) and params["lora_A.weight"].abs().min() > 0
    lrs.save_adapter(adapter, tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    block = lrs_block(tmp_path / "ad")
    assert config["peft_type"] == "LORA" and "lrs" not in config and block["method"] == "cora"
    assert block["cora_mode"] == "frozen" and block["subspace_hash"] == load_subspace(sub).hash
    assert lrs.load_adapter(tmp_path / "ad").method.frozen == {"lora_B.weight"}

    with torch.no_grad():
        expected = lrs.attach(load_causal_lm(llama), lrs.load_adapter(tmp_path / "ad")).eval()(input_ids=IDS).logits
        peft = PeftModel.from_pretrained(load_causal_lm(llama), tmp_path / "ad").eval()
        base = load_causal_lm(llama)(input_ids=IDS).logits
        got = peft(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3


@pytest.mark.method_cases(method="cora")
def test_modes_decide_what_trains(llama, recipe, load_causal_lm, method_case):
    _, _, options = recipe(method_case, llama)
    mode = options["cora_mode"]
    adapter = lrs.init_adapter("cora", llama, r=4, options=options, targets="q_proj")
    assert all(not p["lora_A.weight"].any() for p in adapter.weights.values())  # A = 0: the model is unchanged
    model = lrs.attach(load_causal_lm(llama), adapter)
    grads = {name.rsplit(".", 1)[-1]: p.requires_grad for name, p in model.named_parameters() if "lora" in name}
    assert grads == {"lora_A__weight": True, "lora_B__weight": mode == "init"}
    per_module = 4 * 64 + (64 * 4 if mode == "init" else 0)
    assert adapter.num_parameters(trainable_only=True) == 2 * per_module


def test_scope_model_shares_one_basis_and_rank_takes_leading_columns(llama, tmp_path):
    extract_subspace([llama], tmp_path / "sub", rank=8, scope="model", device="cpu")
    adapter = lrs.init_adapter("cora", llama, r=3, options={"subspace": str(tmp_path / "sub")})
    basis = load_subspace(tmp_path / "sub").bases["k_proj"]
    for i in range(2):
        assert torch.equal(adapter.weights[f"model.layers.{i}.self_attn.k_proj"]["lora_B.weight"], basis[:, :3])
    assert adapter.config.target_modules == ["k_proj", "q_proj", "v_proj"]


def test_cli_extracts_prints_the_summary_and_inspects(lrs, llama_pair, tmp_path):
    res = lrs("extract-subspace", *llama_pair, "--out", tmp_path / "sub", "--rank", "4", "--scope", "model",
              "--targets", "k_proj,v_proj")
    assert res.code == 0, res.stderr
    assert "k_proj" in res.stdout and "energy" in res.stdout and "wrote 2 bases" in res.stdout
    shown = lrs("inspect", tmp_path / "sub")
    assert shown.code == 0 and "v_proj" in shown.stdout and "energy" in shown.stdout
    res = lrs("init", "--method", "cora", "--base", llama_pair[0], "--out", tmp_path / "ad", "--subspace",
              tmp_path / "sub", "--rank", "4", "--a-init", "kaiming")
    assert res.code == 0, res.stderr
    assert lrs("inspect", tmp_path / "ad", "--json").code == 0


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def subspaces(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A good partial subspace (q_proj, rank 4) and broken copies of it."""
    root = tmp_path_factory.mktemp("subspaces")
    partial = root / "partial"
    extract_subspace([tiny_models["llama"]], partial, rank=4, targets="q_proj", device="cpu")
    q0 = "model.layers.0.self_attn.q_proj.basis"

    def broken(name: str, info=None, basis: torch.Tensor | None = None) -> Path:
        directory = root / name
        directory.mkdir()
        data = json.loads((partial / "subspace.json").read_text())
        (directory / "subspace.json").write_text(json.dumps(info(data) if info else data))
        tensors = load_file(partial / "subspace.safetensors")
        if basis is not None:
            tensors[q0] = basis
        save_file(tensors, directory / "subspace.safetensors")
        return directory

    return {
        "partial": partial,
        "misfit": broken("misfit", basis=torch.linalg.qr(torch.randn(48, 4)).Q.contiguous()),
        "no-targets": broken("no-targets", info=lambda d: {k: v for k, v in d.items() if k != "targets"}),
        "rank-string": broken("rank-string", info=lambda d: d | {"rank": "4"}),
        "targets-int": broken("targets-int", info=lambda d: d | {"targets": 3}),
        "empty-basis": broken("empty-basis", basis=torch.zeros(64, 0)),
        "nan-basis": broken("nan-basis", basis=torch.full((64, 4), float("nan"))),
    }


def _cora(s: dict, subspace: str, *args) -> list:
    return ["init", "--method", "cora", "--base", s["llama"], "--subspace", s[subspace], "--rank", "4", *args]


BAD_CORA = {  # expected message: command line without --out
    "do not share the architecture": lambda s: ["extract-subspace", s["llama"], s["qwen2"]],
    "is larger than model.layers.0.self_attn.k_proj allows (shape 32x64": lambda s: ["extract-subspace", s["llama"],
                                                                                     "--rank", "33"],
    "matched no linear module; this model has: gate_proj, k_proj": lambda s: ["extract-subspace", s["llama"],
                                                                              "--targets", "nothing_proj"],
    "basis model.layers.0.self_attn.q_proj has 48 rows": lambda s: _cora(s, "misfit"),
    "has no basis for model.layers.0.self_attn.v_proj": lambda s: _cora(s, "partial", "--targets", "q_proj,v_proj"),
    "exceeds the subspace's rank 4": lambda s: _cora(s, "partial", "--rank", "5"),
    "needs --subspace": lambda s: ["init", "--method", "cora", "--base", s["llama"]],
    "subspace.json: 'targets' must be a non-empty list of module names, got None": lambda s: _cora(s, "no-targets"),
    "subspace.json: 'rank' must be a positive integer, got '4'": lambda s: _cora(s, "rank-string", "--targets", "q_proj"),
    "subspace.json: 'targets' must be a non-empty list of module names, got 3": lambda s: _cora(s, "targets-int"),
    "basis model.layers.0.self_attn.q_proj has 0 columns but its subspace.json says rank 4":
        lambda s: _cora(s, "empty-basis"),
    "tensor model.layers.0.self_attn.q_proj.basis in": lambda s: _cora(s, "nan-basis"),
}


@pytest.mark.parametrize("expected", list(BAD_CORA))
def test_bad_input_exits_1_with_one_line_and_writes_nothing(lrs, tiny_models, subspaces, tmp_path, expected):
    out = tmp_path / "out"
    res = lrs(*BAD_CORA[expected]({**tiny_models, **subspaces}), "--out", out)
    assert res.code == 1 and expected in res.stderr, (expected, res.stderr)
    assert res.stderr.count("\n") == 1 and not out.exists() and not list(tmp_path.iterdir())
