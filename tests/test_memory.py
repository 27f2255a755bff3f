"""Memory is bounded by the largest tensor, never the model: every streaming command keeps the same peak RSS when
the checkpoint doubles in layers (same tensor shapes, same shard size), while a reader that holds the model does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lowrank_surgery as lrs

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from make_llama import generate  # noqa: E402  (the benchmarks' generator: multi-shard, tensor by tensor)

pytestmark = pytest.mark.slow

# 29 MB of bf16 weights per layer, a 32 MB embedding (the largest tensor), 64 MB shards: the layers added by
# doubling (4 -> 8) weigh 116 MB, 30% of the ~380 MB the interpreter and torch take before any work.
SHAPE = {"hidden": 1024, "mlp": 4096, "vocab": 16000, "max_shard_size": "64MB"}
LAYERS = (4, 8)
GROWTH = 1.10

# VmHWM, not ru_maxrss: the latter survives fork and exec, so a child would report its parent's (pytest's) size
PEAK_RSS = """
import atexit, re, sys
atexit.register(lambda: print("PEAK", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())[1], file=sys.stderr))
{body}
"""
CLI = "from lowrank_surgery.cli.app import main\nsys.argv = ['lrs', '--quiet', *sys.argv[1:]]\nmain()"
HOLD_MODEL = ("from safetensors.torch import load_file\n"  # load_file maps the shards: clone() reads them for real
              "held = [t.clone() for p in sys.argv[1:] for t in load_file(p).values()]")


def peak_rss_mb(body: str, *args: str | Path) -> float:
    res = subprocess.run([sys.executable, "-c", PEAK_RSS.format(body=body), *map(str, args)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stderr.rsplit("PEAK", 1)[1].split()[0]) / 1024


def commands(base: Path, work: Path) -> dict[str, list]:
    """Each streaming command with its inputs made (adapters, a merged checkpoint) and its OUT under `work`."""
    lora = work / "lora"
    adapter = lrs.init_adapter("lora", base, r=16, alpha=16, targets="all-linear", seed=0)
    for params in adapter.weights.values():
        params["lora_B.weight"] = torch.randn(params["lora_B.weight"].shape) * 0.01
    lrs.save_adapter(adapter, lora)
    lrs.merge_adapter(lora, base, work / "merged")
    cola = work / "cola"
    lrs.save_adapter(lrs.init_adapter("cola", base, r=8, targets="all-linear", options={"init_svd": "randomized"}), cola)
    return {
        "merge": ["merge", lora, base, work / "out"],
        "unmerge": ["unmerge", lora, work / "merged", work / "out"],
        "extract-lora": ["extract-lora", work / "merged", base, work / "out", "--rank", "16",
                         "--algorithm", "randomized"],
        "extract-subspace": ["extract-subspace", base, "--out", work / "out", "--rank", "16"],
        "init pissa": ["init", "--method", "pissa", "--base", base, "--rank", "8", "--targets", "all-linear",
                       "--init-svd", "gram", "--out", work / "out"],
        "convert": ["convert", cola, work / "out", "--to", "peft-lora", "--base", base],
    }


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[int, dict[str, float]]:
    """Peak RSS (MB) of every command, and of holding the model, at each layer count."""
    peaks = {}
    for layers in LAYERS:
        work = tmp_path_factory.mktemp(f"memory-{layers}")
        base = generate(work / "base", layers=layers, **SHAPE)
        peaks[layers] = {}
        for name, args in commands(base, work).items():
            peaks[layers][name] = peak_rss_mb(CLI, *args)
            subprocess.run(["rm", "-rf", str(work / "out")], check=True)
        peaks[layers]["hold the model"] = peak_rss_mb(HOLD_MODEL, *sorted(base.glob("*.safetensors")))
    return peaks


def test_the_measure_sees_a_reader_that_holds_the_model(measured):
    small, large = (measured[n]["hold the model"] for n in LAYERS)
    assert large > GROWTH * small, (small, large)


@pytest.mark.parametrize("command", ["merge", "unmerge", "extract-lora", "extract-subspace", "init pissa", "convert"])
def test_peak_rss_does_not_grow_with_the_model(measured, command):
    small, large = (measured[n][command] for n in LAYERS)
    assert large <= GROWTH * small, f"{command}: {small:.0f} MB at {LAYERS[0]} layers, {large:.0f} MB at {LAYERS[1]}"
