"""lrs extract-lora with a rank per module (--energy, --threshold, --rank as the cap) and --distribute-scale,
on a fine-tune whose differences have planted singular values, against stock PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lowrank_surgery as ls
from lowrank_surgery.errors import LrsError

# ΔW = U·diag(σ)·Vᵀ per module (the others do not change); distinct gaps, one tied pair (down_proj's 5, 5).
SIGMAS = {
    "model.layers.0.self_attn.q_proj": [8.0, 4.0, 2.0, 1.0],
    "model.layers.0.mlp.down_proj": [5.0, 5.0, 0.5],
    "model.layers.1.self_attn.v_proj": [3.0],
    "model.layers.1.mlp.gate_proj": [6.0, 3.0, 1.5, 0.75, 0.3, 0.1],
}
UNCHANGED = 14 - len(SIGMAS)  # the tiny llama's 2 layers × 7 linear modules


def _orthonormal(rows: int, columns: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, columns, generator=gen, dtype=torch.float64)).Q


@pytest.fixture(scope="module")
def planted(llama, tmp_path_factory, edited_copy) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The tiny llama plus U·diag(σ)·Vᵀ in the SIGMAS modules, and those factors (U, Vᵀ) per module."""
    gen = torch.Generator().manual_seed(11)
    factors = {}

    def plant(name: str, t: torch.Tensor) -> torch.Tensor:
        module = name.removesuffix(".weight")
        if module not in SIGMAS:
            return t
        sigmas = torch.tensor(SIGMAS[module], dtype=torch.float64)
        u, v = (_orthonormal(size, len(sigmas), gen) for size in t.shape)
        factors[module] = u, v.T
        return (t.double() + u @ torch.diag(sigmas) @ v.T).float()

    ft = edited_copy(llama, tmp_path_factory.mktemp("planted") / "ft", plant)
    assert set(factors) == set(SIGMAS)
    return ft, factors


def _wanted(sigmas: list[float], energy: float | None, threshold: float | None) -> int:
    """The rank the definitions give for these singular values: the fewest keeping `energy` of Σσ², or the count
    above threshold·σ_max."""
    if energy is not None:
        total, kept, rank = sum(s * s for s in sigmas), 0.0, 0
        while kept < energy * total:
            kept += sigmas[rank] ** 2
            rank += 1
    else:
        rank = sum(s > threshold * sigmas[0] for s in sigmas)
    return rank


def _truncated(factors: tuple[torch.Tensor, torch.Tensor], sigmas: list[float], rank: int) -> torch.Tensor:
    u, vh = factors
    return (u[:, :rank] * torch.tensor(sigmas[:rank], dtype=torch.float64)) @ vh[:rank]


@pytest.fixture(scope="session")
def peft_layers(load_causal_lm):
    """peft_layers(base, adapter): stock PEFT's LoRA layers of the adapter on the base, by module path."""

    def layers(base: Path, adapter: Path) -> dict[str, torch.nn.Module]:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(base), adapter).eval()
        prefix = "base_model.model."
        return {name.removeprefix(prefix): m for name, m in model.named_modules() if hasattr(m, "get_delta_weight")}

    return layers


# (energy, threshold, cap, extra flags): every case keeps more than one distinct rank
RULES = {
    "energy 0.9": (0.9, None, None, []),
    "energy 0.99": (0.99, None, None, []),
    "energy 1 (lossless)": (1.0, None, None, []),
    "threshold 0.3": (None, 0.3, None, []),
    "threshold 0.04": (None, 0.04, None, []),
    "energy 0.999 capped at 3": (0.999, None, 3, []),
    "threshold 0.04 capped at 2": (None, 0.04, 2, []),
    "energy 0.99 randomized, cap 8": (0.99, None, 8, ["--algorithm", "randomized"]),
}


def _flags(energy: float | None, threshold: float | None, cap: int | None) -> list[str]:
    return [*(["--energy", str(energy)] if energy is not None else []),
            *(["--threshold", str(threshold)] if threshold is not None else []),
            *(["--rank", str(cap)] if cap is not None else [])]


@pytest.mark.parametrize("case", list(RULES))
def test_ranks_per_module_are_the_rules_and_stock_peft_reproduces_them(lrs, llama, planted, tmp_path, lrs_block,
                                                                       peft_layers, case):
    energy, threshold, cap, extra = RULES[case]
    ft, factors = planted
    wanted = {m: _wanted(s, energy, threshold) for m, s in SIGMAS.items()}
    ranks = {m: min(r, cap) if cap else r for m, r in wanted.items()}
    assert len(set(ranks.values())) > 1, "the case must exercise rank_pattern"
    res = lrs("extract-lora", ft, llama, tmp_path / "out", *_flags(energy, threshold, cap), *extra, "--json")
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["unchanged"] == UNCHANGED
    rows = {row["module"]: row for row in report["per_module"]}
    assert {m: row["rank"] for m, row in rows.items()} == ranks
    assert {m for m, row in rows.items() if row["capped"]} == {m for m in ranks if wanted[m] > ranks[m]}
    for m, row in rows.items():
        s = SIGMAS[m]
        assert row["energy"] == pytest.approx(sum(x * x for x in s[:ranks[m]]) / sum(x * x for x in s), rel=1e-5)

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    counts = {r: list(ranks.values()).count(r) for r in ranks.values()}
    common = max(counts, key=lambda r: (counts[r], r))
    assert config["r"] == common and config["lora_alpha"] == common
    assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r != common}
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert lrs_block(tmp_path / "out")["rank_rule"] == {"rank": cap, "energy": energy, "threshold": threshold}

    layers = peft_layers(llama, tmp_path / "out")
    assert set(layers) == set(SIGMAS)
    for m, layer in layers.items():
        assert layer.r["default"] == ranks[m]
        expected = _truncated(factors[m], SIGMAS[m], ranks[m])
        got = layer.get_delta_weight("default").double()
        assert float((got - expected).norm() / expected.norm()) < 1e-5, m


def test_energy_one_reproduces_the_finetuned_logits_in_peft_and_merge(llama, planted, tmp_path, load_causal_lm):
    from peft import PeftModel

    ft, _ = planted
    report = ls.extract_lora(ft, llama, tmp_path / "out", energy=1.0)
    assert {row["module"]: row["rank"] for row in report["per_module"]} == {m: len(s) for m, s in SIGMAS.items()}
    ls.merge_adapter(tmp_path / "out", llama, tmp_path / "merged")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_causal_lm(ft)(input_ids=ids).logits
        before = load_causal_lm(llama)(input_ids=ids).logits
        peft = PeftModel.from_pretrained(load_causal_lm(llama), tmp_path / "out").eval()(input_ids=ids).logits
        merged = load_causal_lm(tmp_path / "merged")(input_ids=ids).logits
    assert float((before - expected).norm() / expected.norm()) > 1e-2
    torch.testing.assert_close(peft, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)


def test_distribute_scale_balances_the_factors_with_the_same_product(llama, planted, tmp_path):
    ft, _ = planted
    ls.extract_lora(ft, llama, tmp_path / "plain", energy=0.99)
    ls.extract_lora(ft, llama, tmp_path / "balanced", energy=0.99, distribute_scale=True)
    plain, balanced = ls.load_adapter(tmp_path / "plain"), ls.load_adapter(tmp_path / "balanced")
    assert plain.config.provenance["split"] == "B=U*S, A=Vh"
    assert balanced.config.provenance["split"] == "B=U*sqrt(S), A=sqrt(S)*Vh"
    assert plain.config.rank_pattern == balanced.config.rank_pattern != {}
    for m, params in balanced.weights.items():
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        a0, b0 = plain.weights[m]["lora_A.weight"], plain.weights[m]["lora_B.weight"]
        sigmas = torch.tensor(SIGMAS[m][: a.shape[0]])
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-5, atol=0)
        torch.testing.assert_close(b.norm(dim=0), sigmas.sqrt(), rtol=1e-4, atol=0)
        torch.testing.assert_close(a0.norm(dim=1), torch.ones_like(sigmas), rtol=1e-5, atol=0)  # S all on B
        torch.testing.assert_close(b0.norm(dim=0), sigmas, rtol=1e-4, atol=0)
        torch.testing.assert_close(b @ a, b0 @ a0, rtol=0, atol=1e-5)


def test_fixed_rank_writes_no_pattern(llama, planted, tmp_path):
    ft, _ = planted
    report = ls.extract_lora(ft, llama, tmp_path / "out", 2)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (2, 2.0, {}, {})
    assert all(row["rank"] == 2 and not row["capped"] for row in report["per_module"])
    # v_proj changed at rank 1: a fixed rank 2 is not a cap, the second singular value is noise
    assert ls.load_adapter(tmp_path / "out").weights["model.layers.1.self_attn.v_proj"]["lora_A.weight"].shape[0] == 2


@pytest.mark.parametrize("flags", [["--energy", "0.99"], ["--threshold", "0.04", "--rank", "2"]], ids=" ".join)
def test_gram_gives_the_factors_of_exact(lrs, llama, planted, tmp_path, flags):
    """--algorithm gram (float64 Gram + eigh, then Rayleigh-Ritz) keeps exact's ranks and factors, all singular
    values (--energy) or the leading ones (a cap)."""
    ft, _ = planted
    for algorithm in ("exact", "gram"):
        res = lrs("extract-lora", ft, llama, tmp_path / algorithm, *flags, "--algorithm", algorithm)
        assert res.code == 0, res.stderr
    exact, gram = ls.load_adapter(tmp_path / "exact"), ls.load_adapter(tmp_path / "gram")
    assert (exact.config.provenance["algorithm"], gram.config.provenance["algorithm"]) == ("exact", "gram")
    assert gram.config.rank_pattern == exact.config.rank_pattern != {}
    for m, params in gram.weights.items():
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        a0, b0 = exact.weights[m]["lora_A.weight"], exact.weights[m]["lora_B.weight"]
        torch.testing.assert_close(b @ a, b0 @ a0, rtol=0, atol=1e-5)
        if len(set(SIGMAS[m])) == len(SIGMAS[m]):  # a tied pair's singular vectors are any basis of their plane
            torch.testing.assert_close(a, a0, rtol=0, atol=1e-5)
            torch.testing.assert_close(b, b0, rtol=0, atol=1e-5)


def test_summary_shows_ranks_and_what_the_cap_held_back(lrs, llama, planted, tmp_path):
    ft, _ = planted
    res = lrs("extract-lora", ft, llama, tmp_path / "out", "--threshold", "0.04", "--rank", "2")
    assert res.code == 0 and not res.stderr, res.stderr
    wanted = [_wanted(s, None, 0.04) for s in SIGMAS.values()]
    kept = [min(r, 2) for r in wanted]
    assert res.stdout.splitlines()[0].split() == ["module", "shape", "rank", "energy", "error"]
    assert f"wrote rank {min(kept)}-{max(kept)} (sigma > 0.04*sigma_max, at most 2) LoRA" in res.stdout
    capped = sum(r > 2 for r in wanted)
    assert f"--rank 2 kept fewer singular values than the rule asks in {capped} module(s)" in res.stdout


ENERGY_RANGE = "--energy must be in (0, 1] (the share of the squared Frobenius norm of the difference to keep), got"
THRESHOLD_RANGE = "--threshold must be in [0, 1) (a fraction of each module's largest singular value), got"
BAD_RULES = [  # (flags, the line's expected text)
    ([], "give --rank R, --energy F or --threshold T"),
    (["--energy", "0.9", "--threshold", "0.1"], "--energy and --threshold both choose"),
    (["--energy", "0"], f"{ENERGY_RANGE} 0.0"),
    (["--energy", "1.5"], f"{ENERGY_RANGE} 1.5"),
    (["--energy", "nan"], f"{ENERGY_RANGE} nan"),
    (["--energy", "-0.5"], f"{ENERGY_RANGE} -0.5"),
    (["--threshold", "-0.1"], f"{THRESHOLD_RANGE} -0.1"),
    (["--threshold", "1"], f"{THRESHOLD_RANGE} 1.0"),
    (["--threshold", "nan"], f"{THRESHOLD_RANGE} nan"),
    (["--energy", "0.9", "--rank", "0"], "--rank must be at least 1, got 0"),
    (["--energy", "0.9", "--algorithm", "randomized"], "--algorithm randomized computes at most --rank singular values"),
]


@pytest.mark.parametrize("flags, expected", BAD_RULES, ids=[" ".join(f) or "none" for f, _ in BAD_RULES])
def test_bad_rank_rule_exits_1_with_one_line_and_writes_nothing(lrs, llama, planted, tmp_path, assert_one_line_error,
                                                                flags, expected):
    res = lrs("extract-lora", planted[0], llama, tmp_path / "out", *flags)
    assert_one_line_error(res, expected)
    assert not (tmp_path / "out").exists()


def test_python_api_needs_a_rank_rule(llama, planted, tmp_path):
    with pytest.raises(LrsError, match="give --rank R, --energy F or --threshold T"):
        ls.extract_lora(planted[0], llama, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pattern_keys_match_one_module_in_peft():
    """A full path that another module's path ends with is escaped and anchored, so PEFT's first match is its own."""
    from peft.utils.other import get_pattern_key

    from lowrank_surgery.config import pattern_key

    modules = ["model.layers.0.self_attn.q_proj", "vision.model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"]
    keys = {m: pattern_key(m, modules) for m in modules}
    assert keys["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.up_proj"
    assert keys["model.layers.0.self_attn.q_proj"] != "model.layers.0.self_attn.q_proj"
    for m in modules:
        assert get_pattern_key(list(keys.values()), m) == keys[m], m
