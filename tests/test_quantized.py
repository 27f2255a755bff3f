"""Quantized bases: refused wherever their weights would be computed with; fine-grained fp8 (block scales, as
DeepSeek-V3 and Qwen3-FP8 ship) dequantized by merge into a plain checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank_surgery.adapter import save_adapter
from lowrank_surgery.merge import merge

BLOCK = (16, 24)  # rows × columns per scale; 24 does not divide the widths (64, 96): edge blocks are cut
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def _quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, float32 scale per block) with weight ≈ fp8 · scale, block by block."""
    rows, cols = weight.shape
    scale = torch.empty(-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    fp8 = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            cut = (slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1]))
            scale[i, j] = weight[cut].abs().max() / FP8_MAX
            fp8[cut] = (weight[cut] / scale[i, j]).to(torch.float8_e4m3fn)
    return fp8, scale


def _dequantized(fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp8 · scale, block by block (written independently of lrs's broadcast)."""
    out = torch.empty(fp8.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            cut = (slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1]))
            out[cut] = fp8[cut].float() * scale[i, j]
    return out


def _is_quantized(name: str, t: torch.Tensor) -> bool:
    return ".layers." in name and name.endswith("proj.weight") and t.dim() == 2


@pytest.fixture(scope="module")
def fp8_llama(tiny_models, tmp_path_factory, tensors) -> Path:
    """The tiny Llama with every decoder linear in float8_e4m3fn with block scales, the rest in bfloat16."""
    out = tmp_path_factory.mktemp("fp8") / "llama-fp8"
    out.mkdir()
    stored = {}
    for name, t in tensors(tiny_models["llama"]).items():
        if _is_quantized(name, t):
            stored[name], stored[f"{name}_scale_inv"] = _quantize(t)
        else:
            stored[name] = t.bfloat16()
    save_file(stored, out / "model.safetensors")
    config = json.loads((tiny_models["llama"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK), "fmt": "e4m3"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_fp8_merge_dequantizes_into_a_plain_checkpoint(fp8_llama, llama, tmp_path, make_adapter, tensors,
                                                        load_causal_lm):
    adapter = make_adapter("lora", llama, targets="q_proj,v_proj")
    save_adapter(adapter, tmp_path / "ad")
    report = merge(tmp_path / "ad", fp8_llama, tmp_path / "merged", dtype="bfloat16")
    stored, merged = load_file(fp8_llama / "model.safetensors"), tensors(tmp_path / "merged")
    assert report.modules == len(adapter.weights) and not [n for n in merged if "scale" in n]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    impl, checked = adapter.method, 0
    for name, t in merged.items():
        assert t.dtype == torch.bfloat16, name
        if not _is_quantized(name, t):
            assert torch.equal(t, stored[name]), name
            continue
        w = _dequantized(stored[name], stored[f"{name}_scale_inv"])
        path = name.removesuffix(".weight")
        expected = w + impl.delta(adapter.weights[path], path, tuple(w.shape), w) if path in adapter.weights else w
        torch.testing.assert_close(t.float(), expected, rtol=2**-8, atol=1e-6, msg=name)  # one bf16 rounding
        checked += 1
    assert checked == 14
    model = load_causal_lm(tmp_path / "merged")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[q], merged[q].float())


def _quantized_as(base: Path, out: Path, quantization: dict) -> Path:
    """A copy of `base` whose config.json declares `quantization` (the weights stay as they are)."""
    shutil.copytree(base, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    return out


def _gptq_layout(out: Path) -> Path:
    """A GPTQ-style checkpoint: packed int32 qweight, qzeros, scales and g_idx instead of each linear's weight."""
    out.mkdir()
    layer = "model.layers.0.self_attn.q_proj"
    packed = {f"{layer}.qweight": torch.zeros(8, 64, dtype=torch.int32),
              f"{layer}.qzeros": torch.zeros(1, 8, dtype=torch.int32),
              f"{layer}.scales": torch.ones(1, 64, dtype=torch.float16),
              f"{layer}.g_idx": torch.zeros(64, dtype=torch.int32),
              "model.embed_tokens.weight": torch.zeros(128, 64, dtype=torch.float16)}
    save_file(packed, out / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("command", ["merge-auto", "merge-gptq", "merge-bnb", "unmerge", "init-pissa", "init-cola",
                                     "init-bat", "init-gptq-layout", "extract-subspace", "extract-lora", "train"])
def test_quantized_base_refused_in_one_line(lrs, fp8_llama, llama, tmp_path, make_adapter, command):
    """Every command that computes with the base's weights refuses a quantized one (merge only dequantizes fp8
    with block scales, and only into an explicit --dtype)."""
    lrs_adapter = tmp_path / "ad"
    save_adapter(make_adapter("lora", llama, targets="q_proj"), lrs_adapter)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello world"}\n')
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    out = tmp_path / "out"
    args, expected = {
        "merge-auto": (["merge", lrs_adapter, fp8_llama, out], "pass --dtype bfloat16"),
        "merge-gptq": (["merge", lrs_adapter, _quantized_as(llama, tmp_path / "gptq", gptq), out, "--dtype",
                        "bfloat16"], "is quantized (gptq)"),
        "merge-bnb": (["merge", lrs_adapter, _quantized_as(llama, tmp_path / "bnb", bnb), out],
                      "is quantized (bitsandbytes)"),
        "unmerge": (["unmerge", lrs_adapter, fp8_llama, out, "--dtype", "bfloat16"], "is quantized (fp8)"),
        "init-pissa": (["init", "--method", "pissa", "--base", fp8_llama, "--out", out], "is quantized (fp8)"),
        "init-cola": (["init", "--method", "cola", "--base", fp8_llama, "--out", out], "is quantized (fp8)"),
        "init-bat": (["init", "--method", "fossil", "--variant", "bat", "--rank", "8", "--base", fp8_llama, "--out",
                      out], "is quantized (fp8)"),
        "init-gptq-layout": (["init", "--method", "pissa", "--base", _gptq_layout(tmp_path / "packed"), "--out", out],
                             "is quantized (gptq)"),
        "extract-subspace": (["extract-subspace", fp8_llama, "--out", out, "--rank", "4"], "is quantized (fp8)"),
        "extract-lora": (["extract-lora", fp8_llama, llama, out, "--rank", "2"], "is quantized (fp8)"),
        "train": (["train", lrs_adapter, "--base", fp8_llama, "--data", data, "--out", out, "--steps", "1"],
                  "is quantized (fp8)"),
    }[command]
    res = lrs(*args)
    assert res.code == 1, res
    assert expected in res.stderr and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.lrs-tmp-*"))
