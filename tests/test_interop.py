"""External formats exactly as their reference code writes and reads them, against that code's own formula.

Facts checked here were read in the reference sources: the original CoLA code (zyy-2001/CoLA, a vendored
PEFT 0.12: peft/tuners/cola/{config,layer,model}.py, peft/utils/save_and_load.py), PEFT's MiSS
(peft/tuners/miss) and Bone (peft/tuners/bone), kohya-ss sd-scripts (networks/lora.py) and mlx-lm
(mlx_lm/tuner/lora.py, mlx_lm/tuner/utils.py). The reference formulas below restate that code; the
adapters are laid out the way it saves them.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from itertools import chain
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowrank_surgery as ls
import lowrank_surgery.formats.kohya as kohya_format
from lowrank_surgery.convert import convert, lora_adapter, read_adapter
from lowrank_surgery.errors import LrsError
from lowrank_surgery.targets import linear_targets, load_weight

R, ALPHA = 4, 8.0
COLA_TARGETS = "q_proj,v_proj,down_proj"

# Every field the original ColaConfig accepts (its own + PEFT 0.12's PeftConfig): PEFT 0.12 builds the config
# with ColaConfig(**adapter_config.json) and raises TypeError on any other key.
COLA_CONFIG_FIELDS = {
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "r", "target_modules", "lora_alpha", "lora_dropout", "num_A", "num_B", "fan_in_fan_out", "bias",
    "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern",
    "alpha_pattern", "megatron_config", "megatron_core", "layer_replication",
}


def _targets(base, spec="all-linear"):
    return {t.path: t for t in ls.select_targets(ls.Checkpoint(base), spec)}


def _base_weights(base) -> dict[str, torch.Tensor]:
    ckpt = ls.Checkpoint(base)
    return {t.path: load_weight(ckpt, t) for t in linear_targets(ckpt)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ------------------------------------------------------------------------------------------------ CoLA


def _original_residual(w: torch.Tensor, r: int) -> torch.Tensor:
    """The original's pissa_init: W − scaling·(lora_B·N)(lora_A·M) = W − U_r S_r V_rᵀ, from an SVD of W."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return w.double() - (u[:, :r] * s[:r]) @ vh[:r]


def _original_sum(strategy: str, a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ B·A over the pairs the original forward sums (its commented-out strategies; random: the expectation)."""
    m, n = len(a), len(b)
    total = torch.zeros(b[0].shape[0], a[0].shape[1], dtype=torch.float64)
    if strategy == "fully":
        for i in range(m):
            for j in range(n):
                total += b[j].double() @ a[i].double()
    elif strategy == "heuristic":
        lora_num, b_i = n // m, 0
        for i in range(m):
            for _ in range(lora_num):
                total += b[b_i].double() @ a[i].double()
                b_i += 1
        for i in range(b_i, n):
            total += b[i].double() @ a[i - b_i].double()
    else:  # random.choice(lora_B) for every A_i: its mean over the draws
        for i in range(m):
            total += sum(bj.double() for bj in b) @ a[i].double() / n
    return total


def _original_config(llama, num_a: int, num_b: int, **extra) -> dict:
    """adapter_config.json as the original code's save_pretrained writes it (every ColaConfig field)."""
    return {"alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": str(llama), "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
            "layers_pattern": None, "layers_to_transform": None, "lora_alpha": ALPHA, "lora_dropout": 0.0,
            "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "num_A": num_a,
            "num_B": num_b, "peft_type": "COLA", "r": R, "rank_pattern": {}, "revision": None,
            "target_modules": ["v_proj", "q_proj", "down_proj"], "task_type": "CAUSAL_LM", **extra}


def _original_cola(llama, directory, num_a: int, num_b: int) -> dict:
    """An adapter as the original code saves it (keys lora_A.{i}.weight / lora_B.{j}.weight, no frozen factors,
    no strategy in its config); returns its factors per module path."""
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(_original_config(llama, num_a, num_b)))
    gen = torch.Generator().manual_seed(11)
    factors = {path: ([0.1 * torch.randn(R, t.in_features, generator=gen) for _ in range(num_a)],
                      [0.1 * torch.randn(t.out_features, R, generator=gen) for _ in range(num_b)])
               for path, t in _targets(llama, COLA_TARGETS).items()}
    tensors = {f"base_model.model.{path}.lora_{kind}.{k}.weight": m for path, (a, b) in factors.items()
               for kind, ms in (("A", a), ("B", b)) for k, m in enumerate(ms)}
    save_file(tensors, directory / "adapter_model.safetensors")
    return factors


@pytest.mark.parametrize("strategy, num_a, num_b", [("fully", 2, 3), ("heuristic", 2, 5), ("random", 2, 3)])
def test_original_cola_adapter_gives_the_original_forward(llama, tmp_path, strategy, num_a, num_b):
    """The strategy it ran is declared (its config cannot say). Merged weight = its residual + s·Σ B_j A_i."""
    factors = _original_cola(llama, tmp_path / "orig", num_a, num_b)
    adapter = ls.load_adapter(tmp_path / "orig", cola_strategy=strategy)
    method = adapter.method
    assert (method.strategy, method.num_a, method.num_b) == (strategy, num_a, num_b)
    weights = _base_weights(llama)
    method.complete(adapter.weights, lambda path: weights[path])
    for path, (a, b) in factors.items():
        expected = _original_residual(weights[path], R) + (ALPHA / R) * _original_sum(strategy, a, b)
        assert _rel(method.merge(weights[path], adapter.weights[path], path), expected) < 1e-5


def test_original_cola_adapter_without_a_declared_strategy_warns(lrs, llama, tmp_path):
    """Every import of an original-layout CoLA adapter says it assumes `fully`; --cola-strategy declares another."""
    factors = _original_cola(llama, tmp_path / "orig", 2, 5)
    with pytest.warns(ls.LrsWarning, match="does not record the strategy .* reading it as fully"):
        assert ls.load_adapter(tmp_path / "orig").method.strategy == "fully"
    for command in (["inspect", tmp_path / "orig"], ["merge", tmp_path / "orig", llama, tmp_path / "fully"]):
        res = lrs(*command)
        assert res.code == 0 and res.stderr.startswith("warning: CoLA adapter in the original code's layout")
        assert res.stderr.count("\n") == 1, res.stderr
    res = lrs("merge", tmp_path / "orig", llama, tmp_path / "heuristic", "--cola-strategy", "heuristic")
    assert res.code == 0 and "warning" not in res.stderr, res.stderr
    weights = _base_weights(llama)
    merged = _base_weights(tmp_path / "heuristic")
    for path, (a, b) in factors.items():
        expected = _original_residual(weights[path], R) + (ALPHA / R) * _original_sum("heuristic", a, b)
        assert _rel(merged[path], expected) < 1e-5
        assert _rel(_base_weights(tmp_path / "fully")[path], expected) > 1e-2  # what the undeclared merge wrote
    res = lrs("inspect", tmp_path / "heuristic", "--cola-strategy", "random")
    assert res.code == 1 and "--cola-strategy applies to CoLA adapters" in res.stderr


def test_cola_init_is_the_original_pissa_split(llama):
    """lora_A[i] = diag(√(S_r/s))·V_rᵀ / M and lora_B[j] = U_r·diag(√(S_r/s)) / N, as the original's pissa_init
    (up to the sign of each singular pair, which an SVD does not fix)."""
    adapter = ls.init_adapter("cola", llama, r=R, alpha=ALPHA, targets="q_proj",
                              options={"num_a": 2, "num_b": 3, "strategy": "fully"})
    weights = _base_weights(llama)
    s = ALPHA / R
    for path, params in adapter.weights.items():
        u, sv, vh = torch.linalg.svd(weights[path], full_matrices=False)
        root = (sv[:R] / s).sqrt()
        sign = torch.sign((params["lora_A.0.weight"] * vh[:R]).sum(1))  # ±1 per singular pair
        for i in range(2):
            torch.testing.assert_close(params[f"lora_A.{i}.weight"], sign[:, None] * root[:, None] * vh[:R] / 2,
                                       rtol=1e-4, atol=1e-5)
        for j in range(3):
            torch.testing.assert_close(params[f"lora_B.{j}.weight"], u[:, :R] * root * sign / 3, rtol=1e-4, atol=1e-5)


def _original_lookup(config: dict, key: str) -> tuple[int, float]:
    """(r, lora_alpha) the original ColaModel._create_and_replace gives module `key` (its pattern rule)."""
    pattern_keys = list(chain(config["rank_pattern"], config["alpha_pattern"]))
    name = next(filter(lambda k: re.match(rf".*\.{k}$", key), pattern_keys), key)
    return config["rank_pattern"].get(name, config["r"]), config["alpha_pattern"].get(name, config["lora_alpha"])


def _trained_cola(base, strategy: str, num_a: int, num_b: int, rslora: bool = False, **options) -> ls.Adapter:
    adapter = ls.init_adapter("cola", base, r=R, alpha=ALPHA, targets=COLA_TARGETS, rslora=rslora, seed=3,
                              options={"num_a": num_a, "num_b": num_b, "strategy": strategy, **options})
    gen = torch.Generator().manual_seed(5)
    for params in adapter.weights.values():
        for name in adapter.method.a_names + adapter.method.b_names:
            params[name] = params[name] + 0.05 * torch.randn(params[name].shape, generator=gen)
    return adapter


def _original_load(tensors: dict[str, torch.Tensor], path: str, kind: str, count: int) -> list[torch.Tensor]:
    """The copies lora_{kind}[0..count) the original code holds after loading a file, in float32. Its pissa_init
    gives every copy one tensor (peft/tuners/cola/layer.py: `self.lora_A[adapter_name][i].weight.data = lora_A`,
    likewise lora_B), and set_peft_model_state_dict (peft/utils/save_and_load.py) loads with
    model.load_state_dict(strict=False), which copies each stored tensor into its parameter in place."""
    stored = [tensors[f"base_model.model.{path}.lora_{kind}.{i}.weight"] for i in range(count)]
    out_features, in_features = stored[0].shape
    copies = torch.nn.ModuleList([torch.nn.Linear(in_features, out_features, bias=False) for _ in range(count)])
    tied = torch.zeros(out_features, in_features)  # pissa_init's value, overwritten by the load
    for layer in copies:
        layer.weight.data = tied
    copies.load_state_dict({f"{i}.weight": t for i, t in enumerate(stored)}, strict=False)
    return [layer.weight.detach().clone() for layer in copies]


@pytest.mark.parametrize("strategy, num_a, num_b, rslora", [("fully", 2, 3, False), ("random", 2, 3, True),
                                                            ("heuristic", 1, 3, False)])
def test_convert_to_cola_is_what_the_original_code_loads(llama, tmp_path, shape_of, strategy, num_a, num_b, rslora):
    """The original code ties its copies, so only equal copies load as written: its merged weight (residual +
    s·Σ_ij B_j A_i over the tied copies) is the source adapter's, and lrs reads the file back to the same ΔW."""
    adapter = _trained_cola(llama, strategy, num_a, num_b, rslora)
    ls.save_adapter(adapter, tmp_path / "src")
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        convert(tmp_path / "src", tmp_path / "out", "cola")
    assert (strategy != "fully") == any("written as fully" in str(w.message) for w in warned)

    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert set(config) <= COLA_CONFIG_FIELDS, set(config) - COLA_CONFIG_FIELDS  # else ColaConfig(**config) fails
    assert (config["peft_type"], config["num_A"], config["num_B"], config["r"]) == ("COLA", num_a, num_b, R)
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    weights = _base_weights(llama)
    method = adapter.method
    for path, params in adapter.weights.items():
        a, b = _original_load(tensors, path, "A", num_a), _original_load(tensors, path, "B", num_b)
        r, alpha = _original_lookup(config, path)
        original = _original_residual(weights[path], r) + (alpha / r) * _original_sum("fully", a, b)
        assert _rel(original, method.merge(weights[path], params, path)) < 1e-5  # lrs's evaluation forward

    back = ls.load_adapter(tmp_path / "out")
    assert back.method.strategy == "fully" and "| strategy | fully |" in (tmp_path / "out" / "README.md").read_text()
    for path, params in adapter.weights.items():
        assert _rel(back.method.delta(back.weights[path], path, shape_of(params)), method.delta(params, path, shape_of(params))) < 1e-5


def test_cola_original_config_keeps_every_module_scale(llama):
    """rsLoRA, rank_pattern and alpha_pattern (suffix keys here) as full-path patterns the original resolves."""
    config = ls.AdapterConfig("cola", R, ALPHA, ["q_proj", "v_proj"], rslora=True, rank_pattern={"q_proj": 2},
                              alpha_pattern={"model.layers.1.self_attn.v_proj": 3.0},
                              options={"num_a": 2, "num_b": 3})
    method = ls.get_method(config)
    paths = list(_targets(llama, "q_proj,v_proj"))
    original = method.original_json(paths)
    assert set(original) <= COLA_CONFIG_FIELDS and original["lora_alpha"] == pytest.approx(ALPHA * math.sqrt(R))
    for path in paths:
        r, alpha = _original_lookup(original, path)
        assert r == config.rank(path) and alpha / r == pytest.approx(config.scale(path), rel=1e-12)


def test_convert_to_cola_refuses_heuristic_and_warns_on_randomized_init(llama, tmp_path):
    ls.save_adapter(_trained_cola(llama, "heuristic", 2, 5), tmp_path / "heuristic")
    with pytest.raises(LrsError, match="cannot express; convert it --to peft-lora instead"):
        convert(tmp_path / "heuristic", tmp_path / "out", "cola")
    assert not (tmp_path / "out").exists()
    ls.save_adapter(_trained_cola(llama, "fully", 2, 3, init_svd="randomized"), tmp_path / "randomized")
    with pytest.warns(ls.LrsWarning, match="by exact SVD.*randomized SVD"):
        convert(tmp_path / "randomized", tmp_path / "out", "cola")


# ------------------------------------------------------------------------------------------------ MiSS / Bone


@pytest.mark.parametrize("init_weights, r, mini_r", [(True, 5, 1), (False, 4, 1), ("mini", 4, 8), ("bat", 8, 1)])
def test_peft_written_miss_adapter_imports(llama, tmp_path, load_causal_lm, init_weights, r, mini_r):
    """PEFT's own MissConfig/save_pretrained output (no lrs block) gives PEFT's outputs in lrs."""
    from peft import MissConfig, PeftModel, get_peft_model

    peft = get_peft_model(load_causal_lm(llama), MissConfig(r=r, mini_r=mini_r, init_weights=init_weights,
                                                            target_modules=["q_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "miss_block" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    peft.save_pretrained(tmp_path / "miss")
    saved = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MISS" and saved["init_weights"] == init_weights and "lrs" not in saved

    adapter = ls.load_adapter(tmp_path / "miss")
    variant = {True: "balance", False: "balance"}.get(init_weights, init_weights)
    assert adapter.config.options["variant"] == variant and len(adapter.weights) == 4
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    theirs = PeftModel.from_pretrained(load_causal_lm(llama), tmp_path / "miss").eval()
    ours = ls.attach(load_causal_lm(llama), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init_weights", [True, False])
def test_bone_balance_adapter_is_the_tiled_block(llama, tmp_path, init_weights):
    """Bone (PEFT 0.14-0.17): config without dropout or mini_r, key bone_block (r × out), ΔW[o, i] = D[i mod r, o]."""
    r = 5
    targets = _targets(llama, "q_proj,up_proj")
    gen = torch.Generator().manual_seed(4)
    blocks = {path: torch.randn(r, t.out_features, generator=gen) for path, t in targets.items()}
    (tmp_path / "bone").mkdir()
    config = {"peft_type": "BONE", "r": r, "init_weights": init_weights, "target_modules": ["q_proj", "up_proj"],
              "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "bias": "none",
              "modules_to_save": None, "base_model_name_or_path": str(llama), "revision": None, "task_type": None,
              "inference_mode": True}
    (tmp_path / "bone" / "adapter_config.json").write_text(json.dumps(config))
    save_file({f"base_model.model.{p}.bone_block": d for p, d in blocks.items()}, tmp_path / "bone" / "adapter_model.safetensors")
    adapter = ls.load_adapter(tmp_path / "bone")
    assert adapter.config.options["variant"] == "balance"
    for path, d in blocks.items():
        out, inp = targets[path].shape
        expected = torch.stack([d[torch.arange(inp) % r, o] for o in range(out)])
        torch.testing.assert_close(adapter.method.delta(adapter.weights[path], path, (out, inp)), expected)


# ------------------------------------------------------------------------------------------------ kohya


def _kohya_name(path: str, prefix: str = "lora_te") -> str:
    """sd-scripts' LoRANetwork: prefix + "." + module name, dots replaced by underscores."""
    return f"{prefix}.{path}".replace(".", "_")


@pytest.mark.parametrize("alpha", [torch.tensor(2.0), torch.tensor(2.0, dtype=torch.float16),
                                   torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(1), torch.tensor(0.0), None],
                         ids=["f32", "f16", "bf16", "int64", "zero", "absent"])
def test_kohya_file_as_sd_scripts_saves_it(llama, tmp_path, alpha):
    """lora_down (r × in), lora_up (out × r), 0-d alpha; scale = alpha / r, and alpha 0 or absent means r."""
    targets = _targets(llama, "q_proj,o_proj")
    gen = torch.Generator().manual_seed(6)
    tensors, expected = {}, {}
    for path, t in targets.items():
        name = _kohya_name(path)
        down = torch.randn(R, t.in_features, generator=gen).half()  # --save_precision fp16
        up = torch.randn(t.out_features, R, generator=gen).half()
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        if alpha is not None:
            tensors[f"{name}.alpha"] = alpha.clone()
        scale = (float(alpha) if alpha is not None and float(alpha) else R) / R
        expected[path] = scale * up.float() @ down.float()
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(R), "ss_network_alpha": "2.0"}
    save_file(tensors, tmp_path / "kohya.safetensors", metadata=metadata)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        adapter, fmt = read_adapter(tmp_path / "kohya.safetensors", ls.Checkpoint(llama))
    assert fmt == "kohya" and set(adapter.weights) == set(targets) and bool(warned) == (alpha is None)
    for path, delta in expected.items():
        assert _rel(adapter.method.delta(adapter.weights[path], path, tuple(delta.shape)), delta) < 1e-6


def test_kohya_export_prefix_is_documented_and_round_trips(llama, tmp_path):
    """lrs writes kohya's text-encoder prefix `lora_te_`; the file reads back with or without the base."""
    ls.save_adapter(ls.init_adapter("lora", llama, r=R, alpha=ALPHA, targets="q_proj"), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "k", "kohya")
    tensors = load_file(tmp_path / "k" / "adapter_model.safetensors")
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert names == {_kohya_name(p) for p in _targets(llama, "q_proj")}
    assert all(tensors[f"{n}.alpha"].dim() == 0 and tensors[f"{n}.alpha"].dtype == torch.float32 for n in names)
    assert "`lora_te_`" in kohya_format.__doc__
    for base in (None, ls.Checkpoint(llama)):
        back, _ = read_adapter(tmp_path / "k" / "adapter_model.safetensors", base)
        assert set(back.weights) == set(_targets(llama, "q_proj")) and back.config.scale(next(iter(back.weights))) == 2


# ------------------------------------------------------------------------------------------------ mlx-lm


def _mlx_config(num_layers: int, keys: list[str], rank: int, scale: float, **extra) -> dict:
    """adapter_config.json as mlx_lm.lora writes it: its training arguments plus lora_parameters."""
    return {"adapter_path": "adapters", "batch_size": 4, "data": "data", "fine_tune_type": "lora", "iters": 100,
            "learning_rate": 1e-5, "lora_parameters": {"rank": rank, "dropout": 0.0, "scale": scale, "keys": keys},
            "model": "mlx-community/tiny", "num_layers": num_layers, "seed": 0, "train": True, **extra}


def test_mlx_lm_adapter_imports_with_scale_as_is(llama, tmp_path, shape_of):
    """lora_a (in × r), lora_b (r × out) on the last num_layers layers; y += scale·(x·lora_a)·lora_b, scale not α/r."""
    keys, scale = ["self_attn.q_proj", "self_attn.v_proj"], 20.0
    targets = _targets(llama)
    gen = torch.Generator().manual_seed(8)
    tensors = {}
    for key in keys:
        t = targets[f"model.layers.1.{key}"]
        tensors[f"{t.path}.lora_a"] = torch.randn(t.in_features, R, generator=gen) / 8
        tensors[f"{t.path}.lora_b"] = torch.randn(R, t.out_features, generator=gen) / 8
    (tmp_path / "mlx").mkdir()
    save_file(tensors, tmp_path / "mlx" / "adapters.safetensors")
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(_mlx_config(1, keys, R, scale)))
    adapter, fmt = read_adapter(tmp_path / "mlx")
    assert fmt == "mlx" and len(adapter.weights) == 2
    x = torch.randn(3, 64, generator=gen)
    for path, params in adapter.weights.items():
        mlx_out = scale * (x @ tensors[f"{path}.lora_a"]) @ tensors[f"{path}.lora_b"]
        torch.testing.assert_close(x @ adapter.method.delta(params, path, shape_of(params)).T, mlx_out, rtol=1e-5, atol=1e-5)


def test_mlx_export_is_what_mlx_lm_wraps_and_loads(llama, tmp_path):
    """Every exported module is one linear_to_lora_layers wraps (keys in model.layers[-num_layers:]), else
    load_weights(strict=False) would drop it silently; per module ΔW = scale·lora_bᵀ·lora_aᵀ."""
    gen = torch.Generator().manual_seed(9)
    targets = _targets(llama)
    pairs = {p: (torch.randn(targets[p].out_features, r, generator=gen), torch.randn(r, targets[p].in_features,
                                                                                      generator=gen), s)
             for p, r, s in [("model.layers.1.self_attn.q_proj", 2, 0.5), ("model.layers.1.mlp.down_proj", 3, 1.5)]}
    ls.save_adapter(lora_adapter(pairs, {"base_model": str(llama)}), tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "mlx", "mlx", base=llama)
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    params = config["lora_parameters"]
    layers = list(range(2))[-max(config["num_layers"], 0):]  # mlx-lm: model.layers[-max(num_layers, 0):]
    wrapped = {f"model.layers.{i}.{key}" for i in layers for key in params["keys"]}
    tensors = load_file(tmp_path / "mlx" / "adapters.safetensors")
    assert config["num_layers"] == 1 and {k.rsplit(".", 1)[0] for k in tensors} == set(pairs) <= wrapped
    for path, (b, a, s) in pairs.items():
        lora_a, lora_b = tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"]
        assert lora_a.shape == (a.shape[1], params["rank"]) and lora_b.shape == (params["rank"], b.shape[0])
        assert _rel(params["scale"] * lora_b.T @ lora_a.T, s * b @ a) < 1e-6


def _mlx_moe(tmp_path: Path, **config) -> Path:
    """An mlx-lm LoRASwitchLinear adapter: lora_a (experts, r, in), lora_b (experts, out, r)."""
    (tmp_path / "moe").mkdir()
    save_file({"model.layers.0.mlp.switch_mlp.up_proj.lora_a": torch.zeros(4, R, 64),
               "model.layers.0.mlp.switch_mlp.up_proj.lora_b": torch.zeros(4, 96, R)}, tmp_path / "moe" / "adapters.safetensors")
    (tmp_path / "moe" / "adapter_config.json").write_text(json.dumps(
        {k: v for k, v in _mlx_config(1, ["mlp.switch_mlp.up_proj"], R, 20.0, **config).items() if v is not None}))
    return tmp_path / "moe"


def _kohya_conv(tmp_path: Path) -> Path:
    """A kohya Conv2d LoRA: 4-D lora_down/up."""
    name = _kohya_name("model.layers.0.self_attn.q_proj", "lora_unet")
    save_file({f"{name}.lora_down.weight": torch.zeros(R, 64, 3, 3), f"{name}.lora_up.weight": torch.zeros(64, R, 1, 1),
               f"{name}.alpha": torch.tensor(1.0)}, tmp_path / "conv.safetensors")
    return tmp_path / "conv.safetensors"


FOREIGN = {  # case -> (builder, expected message)
    "mlx-switch-linear": (_mlx_moe, "only linear"),
    "mlx-dora": (lambda tmp_path: _mlx_moe(tmp_path, fine_tune_type="dora"), "'dora' is not a LoRA"),
    "mlx-old-dora": (lambda tmp_path: _mlx_moe(tmp_path, use_dora=True, fine_tune_type=None), "'dora' is not a LoRA"),
    "kohya-conv2d": (_kohya_conv, "only linear"),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_foreign_adapters_that_are_not_linear_lora_are_refused(llama, tmp_path, case):
    build, expected = FOREIGN[case]
    with pytest.raises(LrsError, match=expected):
        read_adapter(build(tmp_path), ls.Checkpoint(llama))
