"""`lrs train --shard` (FSDP2) against one process and against DDP: peak RSS per process and seconds per step.

    python benchmarks/bench_shard.py WORK [--layers 8] [--hidden 1024] [--mlp 4096] [--vocab 8192] [--steps 4]
                                          [--nproc 2] [--json out.json]

Writes a random Llama-shaped checkpoint in bf16 shards under WORK (benchmarks/make_llama.py's shapes, a small vocabulary
so that the decoder layers hold most of the weights) with the test suite's character tokenizer, and a LoRA adapter (r 8,
all linear modules). Then trains it three ways, each a fresh process tree, on the CPU in float32 (gloo), every
process on one thread (so that OpenMP spinning on a shared machine does not decide the numbers):
  - one process;
  - DDP under torchrun, --nproc processes: every process loads the whole model;
  - --shard under torchrun, the same processes: each builds the model on the meta device and reads its rows only.
Each process reports its own peak RSS (ru_maxrss) and the wall time of every optimizer step; the table gives the
largest RSS over the processes and the median step after the first. The interpreter floor (python with torch,
transformers and lowrank_surgery imported) is measured the same way. The same global batch runs everywhere (batch 4 x
--seq-len packed tokens), so DDP and --shard do the same arithmetic per process: their difference in seconds per
step is what sharding's communication (per decoder layer an all-gather of its weights in the forward and again in
the backward, then a reduce-scatter of the adapter's gradients) costs over DDP's one all-reduce of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def child(args: argparse.Namespace) -> None:
    """One process of one run: train, then write {rank, peak_rss_mb, step_seconds} to REPORT.<rank>."""
    rank = int(os.environ.get("RANK", "0"))
    report = {"rank": rank}
    if args.child == "floor":
        import torch  # noqa: F401
        import transformers  # noqa: F401

        import lowrank_surgery  # noqa: F401
    else:
        from lowrank_surgery import train as train_module

        steps, real_step = [], train_module._optimizer_step

        def timed(run, step):
            began = time.perf_counter()
            record = real_step(run, step)
            steps.append(time.perf_counter() - began)
            return record

        train_module._optimizer_step = timed
        began = time.perf_counter()
        train_module.train(args.adapter, args.base, args.data, args.out, steps=args.steps, batch_size=4,
                           seq_len=args.seq_len, packing=True, lr=1e-4, warmup=0, save_every=args.steps, force=True,
                           device="cpu", shard=args.child == "shard")
        report |= {"step_seconds": steps, "run_seconds": time.perf_counter() - began}
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    Path(f"{args.report}.{rank}").write_text(json.dumps(report))


def measure(args: argparse.Namespace, how: str, work: Path, adapter: Path, data: Path) -> dict:
    """Run one configuration as a fresh process tree; the largest peak RSS over its processes, the median step."""
    nproc = 1 if how in ("one", "floor") else args.nproc
    report = work / f"report-{how}"
    script = [__file__, str(args.work), "--child", how, "--base", str(args.work / "base"), "--adapter", str(adapter), "--data", str(data),
              "--out", str(work / f"out-{how}"), "--report", str(report), "--steps", str(args.steps),
              "--seq-len", str(args.seq_len)]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    done = subprocess.run(launcher + script, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{how} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(Path(f"{report}.{rank}").read_text()) for rank in range(nproc)]
    row = {"how": how, "processes": nproc, "peak_rss_mb_per_process": [round(r["peak_rss_mb"]) for r in ranks]}
    if how != "floor":
        row["seconds_per_step"] = statistics.median(s for r in ranks for s in r["step_seconds"][1:])
        row["run_seconds"] = max(r["run_seconds"] for r in ranks)
    return row


def write_base(base: Path, args: argparse.Namespace) -> None:
    """The random checkpoint (make_llama's, weights N(0, 0.02), norms 1) with the test suite's character tokenizer."""
    from make_llama import generate
    from tiny_tokenizer import char_tokenizer

    generate(base, layers=args.layers, max_shard_size="100MB", hidden=args.hidden, mlp=args.mlp,
             heads=args.hidden // 64, kv_heads=args.hidden // 256, vocab=args.vocab)
    char_tokenizer().save_pretrained(base)


def make_inputs(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict]:
    """The checkpoint (reused when WORK holds it), its tokenizer, a LoRA adapter and packed text data."""
    from bench_train import make_data

    import lowrank_surgery as lrs

    base = args.work / "base"
    if not (base / "config.json").is_file():
        write_base(base, args)
    ckpt = lrs.Checkpoint(base)
    stored = sum(info.nbytes for info in ckpt.tensors.values())
    model = {"parameters": sum(info.numel for info in ckpt.tensors.values()), "stored_mb": round(stored / 2**20),
             "float32_mb": round(stored * 2 / 2**20), "layers": args.layers, "largest_tensor_mb": round(
                 max(info.numel for info in ckpt.tensors.values()) * 4 / 2**20)}
    adapter = lrs.save_adapter(lrs.init_adapter("lora", base, r=8, targets="all-linear"), work / "adapter")
    return adapter, make_data(work / "data.jsonl", rows=args.steps * 4 * 4), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, help="where the checkpoint is written (and reused)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    for hidden in ("--child", "--adapter", "--data", "--out", "--report", "--base"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from bench_init import machine

    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        adapter, data, model = make_inputs(args, work)
        rows = [measure(args, how, work, adapter, data) for how in ("floor", "one", "ddp", "shard")]
    print(f"Machine: {machine()}\n\nLlama-shaped checkpoint: {model['parameters'] / 1e6:.0f}M parameters, "
          f"{model['layers']} layers, {model['stored_mb']} MB stored (bf16), {model['float32_mb']} MB in float32 "
          f"(largest tensor {model['largest_tensor_mb']} MB); LoRA r 8 on all linear modules; batch 4 x "
          f"{args.seq_len} packed tokens, {args.steps} steps, float32 on the CPU.\n")
    print("| run | processes | peak RSS MB per process | seconds per step (median after the first) |")
    print("|---|---|---|---:|")
    for row in rows:
        step = f"{row['seconds_per_step']:.2f}" if "seconds_per_step" in row else ""
        print(f"| {row['how']} | {row['processes']} | "
              f"{', '.join(map(str, row['peak_rss_mb_per_process']))} | {step} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "model": model, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
