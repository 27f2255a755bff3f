"""Checkpoint I/O, target selection, the adapter format, LoRA against PEFT, and the CLI's bad-input contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowrank_surgery as lrs
from lowrank_surgery.checkpoint import INDEX_NAME, atomic_output, parse_size, plan_of, write_sharded
from lowrank_surgery.errors import LrsError
from lowrank_surgery.targets import linear_targets


def test_lazy_reader_matches_safetensors(tiny_models):
    for path in tiny_models.values():
        ckpt = lrs.Checkpoint(path)
        assert len(ckpt.shards) > 1
        expected = {}
        for shard in ckpt.shards:
            expected.update(load_file(shard))
        assert set(ckpt.tensors) == set(expected)
        for name, tensor in expected.items():
            info = ckpt.info(name)
            assert info.shape == tuple(tensor.shape) and info.dtype == tensor.dtype
            assert torch.equal(ckpt.get(name), tensor)


def test_a_row_range_is_read_alone(tiny_models, build_model, pickled_copy, tmp_path):
    """get_rows(name, start, stop) is rows start:stop (clipped) of a tensor, what one process of `lrs train --shard`
    keeps, read without the other rows' bytes; from float32, bf16 and pickled checkpoints."""
    llama = tiny_models["llama"]
    bf16 = build_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    pickled = pickled_copy(llama, tmp_path / "pickled")
    for ckpt in (lrs.Checkpoint(llama), lrs.Checkpoint(bf16), lrs.Checkpoint(pickled, allow_pickle=True)):
        for name in ckpt.names():
            full = ckpt.get(name)
            for start, stop in ((0, 1), (1, 3), (2, 2), (len(full) - 1, len(full) + 5), (9999, 10000)):
                assert torch.equal(ckpt.get_rows(name, start, stop), full[start:stop]), (ckpt, name, start, stop)
    ckpt, read = lrs.Checkpoint(llama), []
    real = ckpt._read
    ckpt._read = lambda info, buffer=None: read.append(info.nbytes) or real(info, buffer)
    rows = ckpt.get_rows("model.embed_tokens.weight", 10, 13)
    assert rows.shape == (3, 64) and read == [3 * 64 * 4]


def test_single_file_checkpoint(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(tensors, tmp_path / "one.safetensors")
    ckpt = lrs.Checkpoint(tmp_path / "one.safetensors")
    assert sorted(ckpt.names()) == ["a.weight", "b"]
    assert torch.equal(ckpt.get("b"), tensors["b"])


def _crafted(path, header: dict, data_size: int) -> None:
    """A safetensors file with exactly this header and `data_size` zero bytes of data."""
    import struct

    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(data_size))


def _entry(dtype: str, shape: list, start: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


# name -> (header, data bytes): each breaks one rule safetensors enforces
BAD_HEADERS = {
    "negative dims": ({"t": _entry("F32", [-1, -2], 0, 8)}, 8),
    "float dims": ({"t": _entry("F32", [2.0], 0, 8)}, 8),
    "bool dims": ({"t": _entry("F32", [True, 2], 0, 8)}, 8),
    "string dims": ({"t": _entry("F32", ["2"], 0, 8)}, 8),
    "unknown dtype": ({"t": _entry("F128", [2], 0, 8)}, 8),
    "negative offset": ({"t": _entry("U8", [2], -2, 0)}, 2),
    "float offset": ({"t": _entry("U8", [2], 0.0, 2)}, 2),
    "bytes not dtype x numel": ({"t": _entry("F16", [3], 0, 4)}, 4),
    "overlap": ({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 0, 2)}, 2),
    "gap": ({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 4, 6)}, 6),
    "bytes after the last tensor": ({"a": _entry("U8", [2], 0, 2)}, 3),
    "truncated": ({"a": _entry("U8", [4], 0, 4)}, 2),
    "missing field": ({"a": {"dtype": "U8", "shape": [2]}}, 2),
    "metadata not strings": ({"__metadata__": {"format": 1}, "a": _entry("U8", [2], 0, 2)}, 2),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_header_refused_where_safetensors_refuses_it(tmp_path, case):
    header, size = BAD_HEADERS[case]
    _crafted(tmp_path / "bad.safetensors", header, size)
    with pytest.raises(Exception):  # the oracle: safetensors itself cannot read it
        safe_open(tmp_path / "bad.safetensors", "pt")
    with pytest.raises(LrsError, match="corrupt safetensors file"):
        lrs.Checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("dtype", ["U16", "U32", "U64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "C64", "BOOL", "I16"])
def test_every_safetensors_dtype_torch_holds_is_read(tmp_path, dtype):
    from lowrank_surgery.checkpoint import DTYPES

    size = 3 * DTYPES[dtype].itemsize
    blob = bytes(range(1, size + 1))
    header = {"t": _entry(dtype, [3], 0, size), "u": _entry("U8", [1], size, size + 1)}
    _crafted(tmp_path / "ok.safetensors", header, 0)
    with open(tmp_path / "ok.safetensors", "ab") as f:
        f.write(blob + b"\x07")
    with safe_open(tmp_path / "ok.safetensors", "pt") as f:
        expected = f.get_tensor("t")
    got = lrs.Checkpoint(tmp_path / "ok.safetensors").get("t")
    assert got.dtype == expected.dtype and torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def test_sharded_writer_roundtrip(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 7 + i).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(6)}
    names = write_sharded(tmp_path, plan_of(tensors), lambda t: tensors[t.name], "700B")
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    with safe_open(tmp_path / names[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
    back = lrs.Checkpoint(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(back.get(name), t)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1024") == 1024
    with pytest.raises(LrsError):
        parse_size("lots")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(out) as tmp:
        (tmp / "done.txt").write_text("1")
    with pytest.raises(LrsError, match="--force"):
        with atomic_output(out):
            pass
    with atomic_output(out, force=True) as tmp:
        (tmp / "done.txt").write_text("2")
    assert (out / "done.txt").read_text() == "2" and len(list(tmp_path.iterdir())) == 1
    with atomic_output(tmp_path / "new" / "nested" / "out") as tmp:  # missing parents are created, like save_pretrained
        (tmp / "done.txt").write_text("3")
    assert (tmp_path / "new" / "nested" / "out" / "done.txt").read_text() == "3"
    with pytest.raises(LrsError, match="is not a directory"):
        with atomic_output(out / "done.txt" / "below"):
            pass


def test_targets_all_linear_and_conv1d(tiny_models):
    llama = lrs.Checkpoint(tiny_models["llama"])
    chosen = lrs.select_targets(llama, "all-linear")
    assert len(chosen) == 14 and all("lm_head" not in t.path and "embed" not in t.path for t in chosen)
    k = next(t for t in chosen if t.kind == "k_proj")
    assert k.shape == (32, 64)  # GQA: out < in
    gpt2 = lrs.Checkpoint(tiny_models["gpt2"])
    c_fc = next(t for t in linear_targets(gpt2) if t.kind == "c_fc")
    assert c_fc.conv1d and c_fc.shape == (256, 64)
    layer1 = lrs.select_targets(llama, r"model\.layers\.1\..*_proj")
    assert len(layer1) == 7 and all(t.path.startswith("model.layers.1.") for t in layer1)
    with pytest.raises(LrsError, match="this model has: .*q_proj"):
        lrs.select_targets(llama, "nothing_here")


def _randomize_b(adapter: lrs.Adapter, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for params in adapter.weights.values():
        b = params["lora_B.weight"]
        params["lora_B.weight"] = torch.randn(b.shape, generator=gen) * 0.1


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_lora_adapter_matches_peft(tiny_models, tmp_path, load_causal_lm, arch):
    from peft import PeftModel
    from transformers import AutoModel

    base = tiny_models[arch]
    adapter = lrs.init_adapter("lora", base, r=4, alpha=8, targets="all-linear", seed=3)
    _randomize_b(adapter)
    lrs.save_adapter(adapter, tmp_path / "ad")
    loader = AutoModel.from_pretrained if arch == "bert" else load_causal_lm
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = lrs.attach(loader(base).eval(), lrs.load_adapter(tmp_path / "ad"))
    theirs = PeftModel.from_pretrained(loader(base).eval(), tmp_path / "ad").eval()
    with torch.no_grad():
        out_ours, out_theirs, out_base = (_output(m, ids) for m in (ours, theirs, loader(base).eval()))
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-5, atol=1e-5)
    assert (out_ours - out_base).abs().max() > 1e-3  # the adapter really changes the output


def _output(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_attach_trains_only_adapter(tiny_models, load_causal_lm):
    model = load_causal_lm(tiny_models["llama"])
    lrs.attach(model, lrs.init_adapter("lora", tiny_models["llama"], r=2, targets="q_proj,v_proj"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all("adapter" in n for n in trainable)
    weights = lrs.trained_weights(model)
    assert sorted(weights["model.layers.0.self_attn.q_proj"]) == ["lora_A.weight", "lora_B.weight"]
    lrs.detach(model)
    assert not any(isinstance(m, lrs.AdapterLayer) for m in model.modules())


def test_adapter_keys_must_match_method(tmp_path, tiny_models):
    adapter = lrs.init_adapter("lora", tiny_models["llama"], r=2, targets="q_proj")
    lrs.save_adapter(adapter, tmp_path / "ad")
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.miss_block"] = torch.zeros(2, 64)
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(LrsError, match="miss_block"):
        lrs.load_adapter(tmp_path / "ad")


# ------------------------------------------------------------------------------------------------ CLI


def test_help_lists_commands_with_examples(lrs):
    top = lrs("--help")
    assert top.code == 0 and "init" in top.stdout and "inspect" in top.stdout
    for command in ("init", "inspect"):
        res = lrs(command, "--help")
        assert res.code == 0 and "Example: lrs " + command in res.stdout


def test_cli_init_and_inspect(lrs, llama, tmp_path):
    res = lrs("init", "--method", "lora", "--base", llama, "--out", tmp_path / "ad", "--targets", "q_proj,v_proj")
    assert res.code == 0, res.stderr
    info = json.loads(lrs("inspect", tmp_path / "ad", "--json").stdout)
    assert info["method"] == "lora" and info["modules"] == 4 and info["rank"] == 8
    ck = json.loads(lrs("inspect", llama, "--json").stdout)
    assert ck["kind"] == "checkpoint" and len(ck["shards"]) == 3 and ck["linear_modules"] == 15


@pytest.fixture(scope="module")
def bad_bases(llama, tmp_path_factory) -> Path:
    """Broken base checkpoints, built once for the init table below."""
    root = tmp_path_factory.mktemp("bad-bases")
    (root / "empty").mkdir()
    shard = sorted(Path(shutil.copytree(llama, root / "trunc")).glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    (root / "pickled").mkdir()
    torch.save({"w": torch.zeros(2)}, root / "pickled" / "pytorch_model.bin")
    for name, state in {"not-tensors": {"w": 1}, "nested": {"w": {"v": torch.zeros(2)}}, "list": [torch.zeros(2)]}.items():
        (root / name).mkdir()
        torch.save(state, root / name / "pytorch_model.bin")
    (root / "exists").mkdir()
    _edit_json(Path(shutil.copytree(llama, root / "int-shard")) / INDEX_NAME,
               lambda index: index["weight_map"].update({"lm_head.weight": 5}))
    _edit_json(_same_named_shards(llama, root / "same-name") / INDEX_NAME, lambda index: None)
    _edit_json(Path(shutil.copytree(llama, root / "arch")) / "config.json", lambda c: c.update(architectures=[5]))
    return root


def _edit_json(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _same_named_shards(llama: Path, out: Path) -> Path:
    """A copy of `llama` whose index puts two shards, both named x.safetensors, in folders a/ and b/."""
    shutil.copytree(llama, out)
    index = json.loads((out / INDEX_NAME).read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    for folder, shard in (("a", first), ("b", second)):
        (out / folder).mkdir()
        (out / shard).rename(out / folder / "x.safetensors")
    moved = {first: "a/x.safetensors", second: "b/x.safetensors"}
    index["weight_map"] = {k: moved.get(v, v) for k, v in index["weight_map"].items()}
    (out / INDEX_NAME).write_text(json.dumps(index))
    return out


INIT_BAD = {
    "no such file": ["--base", "{root}/missing"],
    "no weights": ["--base", "{root}/empty"],
    "truncated": ["--base", "{root}/trunc"],
    "is a pickled checkpoint; pass --allow-pickle": ["--base", "{root}/pickled"],
    "found a dict holding int": ["--base", "{root}/not-tensors", "--allow-pickle"],
    "found a dict holding dict": ["--base", "{root}/nested", "--allow-pickle"],
    "expected a flat state dict of tensor names to tensors, found a list": ["--base", "{root}/list", "--allow-pickle"],
    "weight_map gives 5 for lm_head.weight, not a shard file name": ["--base", "{root}/int-shard"],
    "shards a/x.safetensors and b/x.safetensors have the same file name": ["--base", "{root}/same-name"],
    "config.json: architectures must be a list of class names, got [5]": ["--base", "{root}/arch"],
    "matched no linear module; this model has:": ["--base", "{llama}", "--targets", "nope"],
    "rank 100 is larger than model.layers.0.": ["--base", "{llama}", "--rank", "100"],
    "--alpha must be a finite nonzero number, got 0.0": ["--base", "{llama}", "--alpha", "0"],
    "--alpha must be a finite nonzero number, got nan": ["--base", "{llama}", "--alpha", "nan"],
    "--seed must be between 0 and 4294967295, got 99999999999999999999": ["--base", "{llama}", "--seed",
                                                                          "99999999999999999999"],
    "already exists": ["--base", "{llama}", "--out", "{root}/exists"],
}


@pytest.mark.parametrize("expected", INIT_BAD)
def test_bad_input_exits_1_with_one_line(lrs, llama, bad_bases, tmp_path, fill, assert_one_line_error, expected):
    out = tmp_path / "out"
    args = fill(INIT_BAD[expected], root=bad_bases, llama=llama)
    res = lrs("init", "--method", "lora", *args, *([] if "--out" in args else ["--out", out]))
    assert_one_line_error(res, expected)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert not [p for p in bad_bases.iterdir() if ".lrs-tmp" in p.name]


# ------------------------------------------------------------------------------------------------ non-finite weights
POISONED = "model.layers.0.self_attn.q_proj.weight"


def _poisoned(llama, directory, value: float):
    """A copy of the tiny llama with one entry of POISONED set to `value` (NaN or Inf)."""
    shutil.copytree(llama, directory)
    shard = next(f for f in directory.glob("*.safetensors") if POISONED in load_file(f))
    tensors = load_file(shard)
    tensors[POISONED][3, 5] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def poisoned(llama, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("poisoned")
    lrs.save_adapter(lrs.init_adapter("lora", llama, r=2, seed=1), root / "lora")
    lrs.save_adapter(lrs.init_adapter("fossil", llama, r=4, targets="q_proj", options={"variant": "bat"}), root / "bat")
    return {"nan": _poisoned(llama, root / "nan", float("nan")), "inf": _poisoned(llama, root / "inf", float("-inf")),
            "llama": llama, "lora": root / "lora", "bat": root / "bat"}


NONFINITE = {  # every command that reads weights for maths: (the command line but OUT, then OUT's options)
    "subspace gram": lambda m: ["extract-subspace", m["nan"], "--rank", "4", "--algorithm", "gram", "--out"],
    "subspace exact": lambda m: ["extract-subspace", m["inf"], "--rank", "4", "--algorithm", "exact", "--out"],
    "subspace randomized": lambda m: ["extract-subspace", m["nan"], "--rank", "4", "--algorithm", "randomized", "--out"],
    "pissa exact": lambda m: ["init", "--method", "pissa", "--base", m["nan"], "--rank", "4", "--out"],
    "pissa gram": lambda m: ["init", "--method", "pissa", "--base", m["inf"], "--init-svd", "gram", "--out"],
    "pissa randomized": lambda m: ["init", "--method", "pissa", "--base", m["nan"], "--init-svd", "randomized", "--out"],
    "cola": lambda m: ["init", "--method", "cola", "--base", m["inf"], "--rank", "4", "--out"],
    "fossil bat init": lambda m: ["init", "--method", "fossil", "--variant", "bat", "--rank", "4", "--base", m["nan"],
                                  "--out"],
    "extract-lora finetuned": lambda m: ["extract-lora", m["nan"], m["llama"], "--rank", "2"],
    "extract-lora base randomized": lambda m: ["extract-lora", m["llama"], m["inf"], "--rank", "2",
                                               "--algorithm", "randomized"],
    "merge": lambda m: ["merge", m["lora"], m["nan"]],
    "unmerge": lambda m: ["unmerge", m["lora"], m["inf"]],
    "merge fossil bat": lambda m: ["merge", m["bat"], m["nan"]],
    "unmerge fossil bat": lambda m: ["unmerge", m["bat"], m["inf"]],
}


@pytest.mark.parametrize("case", list(NONFINITE))
def test_nonfinite_weight_is_named_in_one_line(lrs, poisoned, tmp_path, case):
    args = NONFINITE[case](poisoned)
    out = tmp_path / "out"
    args = args + [out] if args[-1] == "--out" else args[:3] + [out] + args[3:]
    res = lrs(*args)
    assert res.code == 1, (case, res)
    assert f"tensor {POISONED} in " in res.stderr and "holds NaN or Inf" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and not out.exists() and not list(tmp_path.iterdir())


def test_attach_refuses_a_nonfinite_weight_it_decomposes(poisoned, load_causal_lm):
    """attach recomputes missing PiSSA factors from the live model's weights: the same refusal as on disk."""
    adapter = lrs.init_adapter("pissa", poisoned["llama"], r=2, targets="q_proj")
    for params in adapter.weights.values():
        del params["pissa_A0.weight"], params["pissa_B0.weight"]
    with pytest.raises(LrsError, match=f"tensor {POISONED} in the model holds NaN or Inf"):
        lrs.attach(load_causal_lm(poisoned["nan"]), adapter)


def test_bad_usage_exits_2(lrs):
    assert lrs("init", "--method", "nonsense").code == 2


def test_pickle_only_with_weights_only(tmp_path):
    torch.save({"layer.weight": torch.ones(3, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(LrsError, match="--allow-pickle"):
        lrs.Checkpoint(tmp_path)
    ckpt = lrs.Checkpoint(tmp_path, allow_pickle=True)
    assert torch.equal(ckpt.get("layer.weight"), torch.ones(3, 2))


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_single_pickled_file_is_read_as_a_pickle(tmp_path, suffix):
    torch.save({"layer.weight": torch.ones(3, 2)}, tmp_path / f"model{suffix}")
    with pytest.raises(LrsError, match="--allow-pickle"):
        lrs.Checkpoint(tmp_path / f"model{suffix}")
    assert torch.equal(lrs.Checkpoint(tmp_path / f"model{suffix}", allow_pickle=True).get("layer.weight"),
                       torch.ones(3, 2))


PICKLE_COMMANDS = {  # every command that reads a base checkpoint, with {base} pickled
    "init": ["init", "--method", "lora", "--base", "{base}", "--out", "{out}"],
    "inspect": ["inspect", "{base}"],
    "extract-lora": ["extract-lora", "{base}", "{llama}", "{out}", "--rank", "2"],
    "extract-subspace": ["extract-subspace", "{base}", "--out", "{out}", "--rank", "2"],
    "convert": ["convert", "{adapter}", "{out}", "--to", "kohya", "--base", "{base}"],
}


@pytest.mark.parametrize("command", PICKLE_COMMANDS)
def test_every_command_reading_a_base_offers_allow_pickle(lrs, llama, tmp_path, pickled_copy, fill,
                                                          assert_one_line_error, command):
    """The error names --allow-pickle, so the command must have it, and with it the pickled base reads."""
    base = pickled_copy(llama, tmp_path / "pickled", **{"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64)})
    lrs_adapter = lrs_module_adapter(llama, tmp_path / "adapter")
    args = fill(PICKLE_COMMANDS[command], base=base, llama=llama, out=tmp_path / "out", adapter=lrs_adapter)
    assert_one_line_error(lrs(*args), "is a pickled checkpoint; pass --allow-pickle")
    res = lrs(*args, "--allow-pickle")
    assert res.code == 0, res.stderr


def lrs_module_adapter(base: Path, out: Path) -> Path:
    lrs.save_adapter(lrs.init_adapter("lora", base, r=2, targets="q_proj"), out)
    return out


def test_hub_id_resolves_from_cache_offline(tmp_path, cache_on_hub, llama):
    """A Hub id is served from the huggingface_hub cache (HF_HUB_OFFLINE), at the cached revision."""
    commit = cache_on_hub(llama, "acme/tiny-llama", tmp_path / "hub")
    ckpt = lrs.Checkpoint("acme/tiny-llama")
    assert ckpt.source.revision == commit and len(ckpt.shards) == 3
    with pytest.raises(LrsError, match="not in the Hub cache"):
        lrs.Checkpoint("acme/absent-model")
