"""PiSSA factors and CoLA's strategies against plain references, original-layout import, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import save_file

import lowrank_surgery as lrs
from lowrank_surgery.errors import LrsError
from lowrank_surgery.methods.pissa import pissa_factors
from lowrank_surgery.targets import load_weight

R, ALPHA = 4, 8.0
S = ALPHA / R


def _targets(base, spec="all-linear"):
    return lrs.select_targets(lrs.Checkpoint(base), spec)


def _truncation(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def test_pissa_factors_are_the_rank_r_truncation(llama):
    ckpt = lrs.Checkpoint(llama)
    weights = [load_weight(ckpt, t) for t in _targets(llama)]
    exact = pissa_factors(weights, R, S)
    randomized = pissa_factors(weights, R, S, "randomized", niter=6, generator=torch.Generator().manual_seed(0))
    for w, (a0, b0), (ra0, rb0) in zip(weights, exact, randomized):
        best = _truncation(w, R)
        assert a0.shape == (R, w.shape[1]) and b0.shape == (w.shape[0], R)
        torch.testing.assert_close((S * b0 @ a0).double(), best, rtol=0, atol=1e-4)
        torch.testing.assert_close(b0.T @ b0, a0 @ a0.T, rtol=1e-4, atol=1e-4)  # both diag(S_r/s)
        optimal = (w.double() - best).norm()
        assert (w.double() - S * rb0.double() @ ra0.double()).norm() <= 1.05 * optimal


@pytest.mark.parametrize("svd", ["exact", "gram"])
def test_pissa_factors_match_peft_pissa_init(llama, load_causal_lm, svd):
    """PEFT's init_lora_weights="pissa" is the oracle: same rank-r part (exact: the same float32 SVD)."""
    from peft import LoraConfig, get_peft_model

    adapter = lrs.init_adapter("pissa", llama, r=R, alpha=ALPHA, targets="q_proj,down_proj", options={"init_svd": svd})
    model = get_peft_model(load_causal_lm(llama), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "down_proj"],
                                                             init_lora_weights="pissa"))
    modules = dict(model.base_model.model.named_modules())
    for path, params in adapter.weights.items():
        layer = modules[path]
        peft_part = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        ours = S * params["pissa_B0.weight"] @ params["pissa_A0.weight"]
        torch.testing.assert_close(ours, peft_part.detach(), rtol=0, atol=0 if svd == "exact" else 1e-5)


def test_pissa_init_is_identity_and_pair_has_rank_2r(llama):
    adapter = lrs.init_adapter("pissa", llama, r=R, alpha=ALPHA, targets="all-linear")
    method = adapter.method
    assert method.frozen == {"pissa_A0.weight", "pissa_B0.weight"}
    for t in _targets(llama):
        params = adapter.weights[t.path]
        assert torch.equal(params["lora_A.weight"], params["pissa_A0.weight"])
        assert method.delta(params, t.path, t.shape).abs().max() < 1e-6
        params["lora_B.weight"] = params["lora_B.weight"] + 0.1
        b, a = method.pair(params)
        assert b.shape == (t.out_features, 2 * R) and a.shape == (2 * R, t.in_features)
        expected = S * (params["lora_B.weight"] @ params["lora_A.weight"] - params["pissa_B0.weight"] @ params["pissa_A0.weight"])
        torch.testing.assert_close(method.delta(params, t.path, t.shape), expected)


# ------------------------------------------------------------------------------------------------ CoLA


def _reference_delta(strategy: str, a: list[torch.Tensor], b: list[torch.Tensor], a0, b0) -> torch.Tensor:
    """ΔW/s by explicit loops over the pairs each strategy sums (random: the average over its draws)."""
    m, n = len(a), len(b)
    total = torch.zeros(b[0].shape[0], a[0].shape[1])
    if strategy == "fully":
        for i in range(m):
            for j in range(n):
                total += b[j] @ a[i]
    elif strategy == "heuristic":
        k, used = n // m, 0
        for i in range(m):
            for _ in range(k):
                total += b[used] @ a[i]
                used += 1
        for t, j in enumerate(range(used, n)):
            total += b[j] @ a[t]
    else:
        for i in range(m):
            for j in range(n):
                total += b[j] @ a[i] / n
    return total - b0 @ a0


def _cola(base, strategy, num_a=2, num_b=5, targets="q_proj,k_proj,down_proj", **kw) -> lrs.Adapter:
    return lrs.init_adapter("cola", base, r=R, alpha=ALPHA, targets=targets, seed=7,
                            options={"num_a": num_a, "num_b": num_b, "strategy": strategy, **kw})


def _perturb(adapter: lrs.Adapter, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for params in adapter.weights.values():
        for name in [n for n in params if n.startswith("lora_")]:
            params[name] = params[name] + 0.05 * torch.randn(params[name].shape, generator=gen)


def _factors(method, params):
    return ([params[n] for n in method.a_names], [params[n] for n in method.b_names],
            params["pissa_A0.weight"], params["pissa_B0.weight"])


def _shape(params) -> tuple[int, int]:
    """(out, in) of a PiSSA-initialised module, from its frozen factors."""
    return params["pissa_B0.weight"].shape[0], params["pissa_A0.weight"].shape[1]


@pytest.mark.method_cases(method="cola")  # every CoLA strategy the shared table tests, here with 2 A's and 5 B's
def test_cola_strategies_match_reference(llama, recipe, method_case):
    strategy = recipe(method_case, llama)[2]["strategy"]
    adapter = _cola(llama, strategy)
    method = adapter.method
    for path, params in adapter.weights.items():
        assert method.delta(params, path, _shape(params)).abs().max() < 1e-6  # ΔW = 0 at init
    _perturb(adapter)
    for path, params in adapter.weights.items():
        expected = S * _reference_delta(strategy, *_factors(method, params))
        torch.testing.assert_close(method.delta(params, path, _shape(params)), expected, rtol=1e-5, atol=1e-6)
        b, a = method.pair(params)
        assert b.shape[1] == a.shape[0] <= (method.num_a + 1) * R


def test_cola_init_scaling_and_default_sizes(llama):
    adapter = _cola(llama, "fully", num_a=2, num_b=3)
    params = adapter.weights["model.layers.0.self_attn.q_proj"]
    assert sorted(params) == ["lora_A.0.weight", "lora_A.1.weight", "lora_B.0.weight", "lora_B.1.weight",
                              "lora_B.2.weight", "pissa_A0.weight", "pissa_B0.weight"]
    torch.testing.assert_close(params["lora_B.2.weight"], params["pissa_B0.weight"] / 3)  # the original code's B0/N
    torch.testing.assert_close(params["lora_A.1.weight"], params["pissa_A0.weight"] / 2)
    heuristic = _cola(llama, "heuristic", num_a=2, num_b=5).weights["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(heuristic["lora_B.0.weight"], heuristic["pissa_B0.weight"] * 2 / 5)


def _residual_linear(layer, x, delta):
    return x @ (layer.weight + delta).T + (0 if layer.bias is None else layer.bias)


def test_cola_random_draws_are_seeded_and_eval_is_the_expectation(llama, load_causal_lm):
    adapter = _cola(llama, "random", num_a=2, num_b=3, targets="q_proj")
    _perturb(adapter)
    path = "model.layers.0.self_attn.q_proj"
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))

    def run(n: int, training: bool):
        model = lrs.attach(load_causal_lm(llama), adapter).train(training)
        layer = model.get_submodule(path)
        with torch.no_grad():
            return layer, [layer(x) for _ in range(n)]

    layer, outs = run(6, True)
    _, again = run(6, True)
    assert all(torch.equal(o, p) for o, p in zip(outs, again))  # reproducible
    assert len({tuple(o.flatten()[:4].tolist()) for o in outs}) > 1  # the draws vary between forwards
    a, b, a0, b0 = _factors(adapter.method, adapter.weights[path])
    pairings = list(itertools.product(range(3), repeat=2))  # the B each of the 2 A's is paired with
    candidates = [_residual_linear(layer, x, S * (sum(b[j] @ a[i] for i, j in enumerate(p)) - b0 @ a0))
                  for p in pairings]
    drawn = []
    for out in outs:  # each training forward is the original code's forward for one pairing
        matches = [p for p, y in zip(pairings, candidates) if torch.allclose(out, y, rtol=1e-5, atol=1e-5)]
        assert len(matches) == 1, matches
        drawn.append(matches[0])
    assert len(set(drawn)) > 1
    layer, evals = run(2, False)
    assert torch.equal(evals[0], evals[1])
    expected = _residual_linear(layer, x, S * _reference_delta("random", a, b, a0, b0))
    torch.testing.assert_close(evals[0], expected, rtol=1e-5, atol=1e-5)


def test_original_cola_layout_imports_with_recomputed_residual(llama, tmp_path, load_causal_lm):
    """An adapter as the original code saves it: no frozen factors, residual recomputed by PiSSA."""
    directory = tmp_path / "orig"
    directory.mkdir()
    config = {"peft_type": "COLA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
              "num_A": 2, "num_B": 3, "target_modules": ["q_proj", "v_proj"], "fan_in_fan_out": False,
              "bias": "none", "init_lora_weights": True, "base_model_name_or_path": str(llama)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(5)
    ckpt = lrs.Checkpoint(llama)
    targets = _targets(llama, "q_proj,v_proj")
    tensors = {}
    for t in targets:
        for i in range(2):
            tensors[f"base_model.model.{t.path}.lora_A.{i}.weight"] = 0.1 * torch.randn(R, t.in_features, generator=gen)
        for j in range(3):
            tensors[f"base_model.model.{t.path}.lora_B.{j}.weight"] = 0.1 * torch.randn(t.out_features, R, generator=gen)
    save_file(tensors, directory / "adapter_model.safetensors")

    adapter = lrs.load_adapter(directory)
    assert adapter.config.method == "cola" and adapter.config.options["strategy"] == "fully"
    by_path = {t.path: t for t in targets}
    adapter.method.complete(adapter.weights, lambda path: load_weight(ckpt, by_path[path]))

    expected_model = load_causal_lm(llama)
    with torch.no_grad():
        for t in targets:
            w = expected_model.get_submodule(t.path).weight
            a = [tensors[f"base_model.model.{t.path}.lora_A.{i}.weight"] for i in range(2)]
            b = [tensors[f"base_model.model.{t.path}.lora_B.{j}.weight"] for j in range(3)]
            residual = w.double() - _truncation(w, R)
            w.copy_(residual + S * sum(bj.double() @ ai.double() for ai in a for bj in b))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = lrs.attach(load_causal_lm(llama), adapter)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, expected_model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    lrs.save_adapter(adapter, tmp_path / "lrs")
    saved = json.loads((tmp_path / "lrs" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["num_A"], saved["num_B"]) == ("COLA", 2, 3)


def test_cola_adapter_with_foreign_keys_is_refused(llama, tmp_path):
    lrs.save_adapter(_cola(llama, "fully", targets="q_proj"), tmp_path / "ad")
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(R, 64)}
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(LrsError, match="declares method cola but has key .*q_proj.lora_A.weight"):
        lrs.load_adapter(tmp_path / "ad")


PISSA_COLA_BAD = {  # (method, expected message) -> init options
    ("cola", "CoLA heuristic needs --num-a <= --num-b, got 4 A's and 3 B's"):
        ["--strategy", "heuristic", "--num-a", "4", "--num-b", "3"],
    ("cola", "unknown CoLA strategy 'greedy'"): ["--strategy", "greedy"],
    ("cola", "rank 40 is larger than model.layers.0.self_attn.k_proj allows (shape 32x64)"): ["--rank", "40"],
    ("pissa", "--niter 3 needs --init-svd randomized"): ["--niter", "3"],
    ("pissa", "unknown --init-svd 'qr'"): ["--init-svd", "qr"],
}


@pytest.mark.parametrize("method, expected", PISSA_COLA_BAD)
def test_bad_pissa_cola_input_exits_1(lrs, llama, tmp_path, assert_one_line_error, method, expected):
    out = tmp_path / "out"
    res = lrs("init", "--method", method, "--base", llama, "--out", out, "--targets", "k_proj",
              *PISSA_COLA_BAD[method, expected])
    assert_one_line_error(res, expected)
    assert not list(tmp_path.iterdir())
