"""Fine-tune SmolLM2-135M-Instruct with a LoRA adapter on a small instruction set, on CPU, in a few minutes.

    python examples/smollm2.py /tmp/smol                 # once: the model as sharded safetensors
    python examples/finetune_smollm2.py /tmp/smol [--steps 30] [--out /tmp/smol-lora-trained]

The data (examples/data/{train,eval}.jsonl, written by examples/data/make_tasks.py) are chat
`messages`: reverse a word, add two numbers, convert km to m, answered tersely. The script prints the
eval loss as it falls and greedy answers to a few eval questions before and after training.
The same run from the shell:

    lrs init --method lora --base /tmp/smol --out lora --rank 16 --targets all-linear
    lrs train lora --base /tmp/smol --data examples/data/train.jsonl --eval-data examples/data/eval.jsonl \
        --out trained --steps 30 --lr 1e-3 --batch-size 4 --seq-len 96 --eval-every 7
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lowrank_surgery as lrs
from lowrank_surgery.train import train

DATA = Path(__file__).parent / "data"


def answers(model, tokenizer, conversations: list[list[dict]]) -> list[str]:
    """Greedy replies to the conversations (their final assistant turn left out)."""
    replies = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return replies


def show(title: str, conversations: list[list[dict]], replies: list[str]) -> None:
    print(f"\n{title}")
    for messages, reply in zip(conversations, replies):
        print(f"  {messages[-2]['content']!r:32} -> {reply!r:16} (expected {messages[-1]['content']!r})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", default="/tmp/smol", help="SmolLM2-135M directory (examples/smollm2.py)")
    parser.add_argument("--out", default=None, help="where to write the trained adapter (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    if not Path(args.base).is_dir():
        raise SystemExit(f"{args.base} not found: run `python examples/smollm2.py {args.base}` first")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="lrs-finetune-"))
    out = Path(args.out) if args.out else work / "trained"

    adapter = lrs.init_adapter("lora", args.base, r=args.rank, targets="all-linear")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    conversations = [json.loads(line)["messages"] for line in (DATA / "eval.jsonl").read_text().splitlines()]
    probes = list({m[-2]["content"]: m for m in conversations}.values())[:6]  # six distinct questions
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    show("before training (base model):", probes, answers(model, tokenizer, probes))

    def log(record: dict) -> None:
        if "eval_loss" in record:
            train_part = f"train loss {record['loss']:.3f}  " if "loss" in record else ""
            print(f"step {record['step']:3d}  {train_part}eval loss {record['eval_loss']:.3f}", flush=True)

    summary = train(adapter, args.base, DATA / "train.jsonl", out, steps=args.steps, lr=1e-3, batch_size=4,
                    seq_len=96, eval_data=DATA / "eval.jsonl", eval_every=max(1, args.steps // 4), force=True,
                    on_log=log)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r["eval_loss"] for r in records if "eval_loss" in r)
    print(f"\neval loss {first_eval:.3f} -> {summary['eval_loss']:.3f} in {summary['seconds']:.0f} s; "
          f"adapter, metrics.jsonl and loss_curve.png in {out}")

    tuned = lrs.attach(model, lrs.load_adapter(out)).eval()
    show("after training (base + trained LoRA):", probes, answers(tuned, tokenizer, probes))


if __name__ == "__main__":
    main()
