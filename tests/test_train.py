"""`lrs train`: data formats and masking, the loop, exact resume, NaN stop, every method, torchrun, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowrank_surgery as lrs
from lowrank_surgery import train as train_module
from lowrank_surgery.data import collate, load_dataset, step_indices
from lowrank_surgery.errors import LrsError
from lowrank_surgery.train import STATE_DIR, TrainConfig, train

QA = [{"prompt": f"Q: {a}+{b}=", "completion": f"{a + b}"} for a in range(6) for b in range(6)]
CHATS = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w * 2}]}
         for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op")]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a loaded machine OpenMP spinning costs 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(chat_models, tmp_path_factory):
    """A LoRA adapter for the tiny llama and small train/eval files."""
    root = tmp_path_factory.mktemp("train")
    lrs.save_adapter(lrs.init_adapter("lora", chat_models["llama"], r=4, seed=1), root / "lora")
    return {"root": root, "base": chat_models["llama"], "adapter": root / "lora",
            "data": write_jsonl(root / "train.jsonl", QA), "eval": write_jsonl(root / "eval.jsonl", QA[::5])}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# ---------------------------------------------------------------------------- data
def test_masks_follow_the_format(tmp_path, char_tokenizer):
    tok = char_tokenizer()
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "hello"}, {"prompt": "2+2=", "completion": "4"}, CHATS[0]])
    examples = load_dataset(data, tok, seq_len=64).examples
    trained = [tok.decode([i for i, t in zip(e.ids, e.trained) if t]) for e in examples]
    assert trained[0] == "hello<|im_end|>"
    assert trained[1] == "4<|im_end|>"
    assert trained[2] == "abab<|im_end|>\n"  # the assistant turn only, never the user's "say ab"
    batch = collate(examples, pad_id=0)
    row = examples[1]
    expected = [i if t else -100 for i, t in zip(row.ids[1:], row.trained[1:])]
    assert batch["targets"][1, : len(expected)].tolist() == expected
    assert (batch["targets"][1, len(expected):] == -100).all() and batch["attention_mask"][1].sum() == len(row.ids)


def test_truncation_and_packing(tmp_path, char_tokenizer):
    tok = char_tokenizer()
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 30}, {"text": "short"}, {"prompt": "p" * 40, "completion": "c"}])
    plain = load_dataset(data, tok, seq_len=16)
    assert plain.truncated == 2 and plain.dropped == 1  # the long prompt leaves its completion beyond 16 tokens
    assert all(len(e.ids) <= 16 for e in plain.examples)
    packed = load_dataset(data, tok, seq_len=16, packing=True)
    assert [len(e.ids) for e in packed.examples][:-1] == [16] * (len(packed.examples) - 1)
    assert packed.dropped == 1  # the chunk made only of prompt tokens carries no loss
    assert sum(len(e.ids) for e in packed.examples) == 31 + 6 + 42 - 16


def test_stream_is_a_function_of_the_step():
    first = [step_indices(10, s, 4, seed=3) for s in range(5)]  # 20 draws: two full epochs
    assert sorted(sum(first[:2], []) + first[2][:2]) == list(range(10))
    assert first == [step_indices(10, s, 4, seed=3) for s in range(5)]
    assert first != [step_indices(10, s, 4, seed=4) for s in range(5)]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: malformed JSON"),
    ("\n\n", r"bad\.jsonl: empty data file"),
    ('{"input": "x"}\n', r"bad\.jsonl:1: expected a 'text'"),
    ('{"prompt": "x", "completion": 3}\n', r"bad\.jsonl:1: 'completion' must be a string"),
])
def test_bad_data_names_file_and_line(tmp_path, char_tokenizer, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(LrsError, match=message):
        load_dataset(tmp_path / "bad.jsonl", char_tokenizer(), seq_len=32)


# ---------------------------------------------------------------------------- the loop
def test_training_lowers_eval_loss_and_writes_an_adapter(setup, tmp_path, char_tokenizer, load_causal_lm):
    out = tmp_path / "out"
    summary = train(setup["adapter"], setup["base"], setup["data"], out, steps=12, lr=2e-2, batch_size=6,
                    grad_accum=2, seq_len=32, eval_data=setup["eval"], eval_every=6, save_every=6, warmup=3,
                    device="cpu")  # the CPU evaluation below reproduces it exactly (CUDA trains in bf16 autocast)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 6, 12]
    assert evals[-1] < evals[0] - 0.5
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in records[1:])
    assert records[1]["lr"] < records[2]["lr"] and records[-1]["lr"] < records[3]["lr"]  # warmup, then cosine decay
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG" and "## Training" in (out / "README.md").read_text()
    assert summary["steps"] == 12 and summary["examples"] == len(QA) and summary["truncated"] == 0

    trained = lrs.load_adapter(out)  # the same format as `lrs init`, with the trained weights
    assert trained.config == lrs.load_adapter(setup["adapter"]).config
    assert any(p["lora_B.weight"].abs().sum() > 0 for p in trained.weights.values())
    model = lrs.attach(load_causal_lm(setup["base"]), trained).eval()
    ds = load_dataset(setup["eval"], char_tokenizer(), seq_len=32)
    ctx = train_module.Context(0, 1, torch.device("cpu"))
    assert train_module.evaluate_loss(model, ds, 6, 0, ctx) == pytest.approx(evals[-1], rel=1e-5)


def test_resume_gives_the_uninterrupted_losses(setup, tmp_path):
    adapter = lrs.init_adapter("lora", setup["base"], r=4, seed=1, dropout=0.2)  # dropout: the RNG state must resume too
    args = dict(steps=6, lr=1e-2, batch_size=4, seq_len=32, save_every=3, seed=5)
    straight = tmp_path / "straight"
    train(adapter, setup["base"], setup["data"], straight, **args)

    def interrupt(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(adapter, setup["base"], setup["data"], cut, on_log=interrupt, **args)
    assert json.loads((cut / STATE_DIR / "state.json").read_text())["step"] == 3
    assert len(losses(cut)) == 3
    summary = train(adapter, setup["base"], setup["data"], cut, resume=True, **args)
    assert summary["resumed_from"] == 3
    assert losses(cut) == losses(straight)  # exactly, not approximately
    a, b = lrs.load_adapter(cut), lrs.load_adapter(straight)
    assert all(torch.equal(a.weights[m][n], b.weights[m][n]) for m in a.weights for n in a.weights[m])


def test_a_config_is_saved_whole_with_each_checkpoint(setup, tmp_path):
    """train() takes a TrainConfig as well as keywords; state.json keeps every setting, steps and warmup settled."""
    config = TrainConfig(epochs=0.5, batch_size=4, seq_len=16, eval_every=3, seed=2)
    train(setup["adapter"], setup["base"], setup["data"], tmp_path / "out", config, device="cpu")
    saved = json.loads((tmp_path / "out" / STATE_DIR / "state.json").read_text())["settings"]
    assert TrainConfig(**{k: v for k, v in saved.items() if k != "data"}) == TrainConfig(
        steps=5, warmup=0, batch_size=4, seq_len=16, eval_every=3, seed=2, device="cpu")  # 0.5 x 36 examples / 4
    assert TrainConfig.must_match() == ("steps", "lr", "batch_size", "grad_accum", "seq_len", "warmup",
                                        "weight_decay", "max_grad_norm", "packing", "seed")


def test_nan_loss_stops_and_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch):
    real, calls = train_module.token_loss_sum, []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_module, "token_loss_sum", poisoned)
    out = tmp_path / "out"
    with pytest.raises(LrsError, match=rf"loss is nan .* at step 3; stopped, {out} keeps the last good checkpoint \(step 2\)"):
        train(setup["adapter"], setup["base"], setup["data"], out, steps=5, batch_size=4, seq_len=32, save_every=2)
    assert json.loads((out / STATE_DIR / "state.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for p in lrs.load_adapter(out).weights.values() for t in p.values())


def test_nonfinite_parameters_stop_before_a_checkpoint(setup, tmp_path, monkeypatch):
    """A finite loss and gradient can still leave NaN/Inf parameters (a step too large): never checkpoint those."""
    real, calls = torch.optim.AdamW.step, []

    def overflowing(optimizer, *args, **kwargs):
        result = real(optimizer, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = tmp_path / "out"
    with pytest.raises(LrsError, match=rf"parameters hold NaN or Inf after step 2 .*; stopped, {out} keeps the last "
                                       rf"good checkpoint \(step 1\)"):
        train(setup["adapter"], setup["base"], setup["data"], out, steps=3, batch_size=4, seq_len=32, save_every=1)
    assert json.loads((out / STATE_DIR / "state.json").read_text())["step"] == 1
    assert all(torch.isfinite(t).all() for p in lrs.load_adapter(out).weights.values() for t in p.values())


@pytest.mark.method_cases(*lrs.METHODS)  # each method's default case (CoRA: a subspace of the base, frozen mode)
def test_every_method_trains_only_its_trainable_parameters(method_case, chat_models, recipe, tmp_path):
    base = chat_models["gpt2"] if method_case == "lora" else chat_models["llama"]  # gpt2: Conv1D layers
    method, _, options = recipe(method_case, base)  # at rank 4 whatever the case's
    start = lrs.init_adapter(method, base, r=4, seed=2, targets="all-linear", options=options)
    frozen = start.method.frozen
    assert method != "cora" or frozen == {"lora_B.weight"}
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    train(start, base, data, tmp_path / "out", steps=3, lr=1e-2, batch_size=4, seq_len=48)
    after = lrs.load_adapter(tmp_path / "out").weights
    for path, params in start.weights.items():
        for name, before in params.items():
            assert torch.equal(after[path][name], before) == (name in frozen), f"{method} {path}.{name}"


@pytest.mark.method_cases("lora", "cola")
def test_micro_batches_split_a_step_without_changing_it(method_case, setup, recipe, tmp_path):
    """A step is the same however its batch is split into micro-batches; for CoLA too, whose A's once shared one
    gradient tensor (the backward of a stacked sum), which clipping then scaled and accumulation added to once per A."""
    method, _, options = recipe(method_case, setup["base"])
    start = lrs.init_adapter(method, setup["base"], r=4, seed=2, targets="all-linear", options=options)
    args = dict(steps=3, lr=1e-2, seq_len=32, save_every=10, max_grad_norm=1.0)  # the gradient norms are above 1
    train(start, setup["base"], setup["data"], tmp_path / "whole", batch_size=4, **args)
    train(start, setup["base"], setup["data"], tmp_path / "split", batch_size=2, grad_accum=2, **args)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


# ---------------------------------------------------------------------------- torchrun
DDP_SCRIPT = """
import sys
from lowrank_surgery.train import train
adapter, base, data, out = sys.argv[1:5]
train(adapter, base, data, out, steps=3, lr=1e-2, batch_size=4, grad_accum=2, seq_len=32, save_every=10, device="cpu")
"""


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    args = [str(setup[k]) for k in ("adapter", "base", "data")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), *args, str(tmp_path / "ddp")], check=True, env=env, capture_output=True, timeout=120)
    subprocess.run([sys.executable, str(script), *args, str(tmp_path / "one")], check=True, env=env, timeout=120)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    a, b = lrs.load_adapter(tmp_path / "ddp"), lrs.load_adapter(tmp_path / "one")
    for m in a.weights:
        for n in a.weights[m]:
            torch.testing.assert_close(a.weights[m][n], b.weights[m][n], rtol=1e-3, atol=1e-5)
    assert json.loads((tmp_path / "ddp" / STATE_DIR / "state.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------- --shard (FSDP2)
SHARD_ARGS = dict(steps=4, lr=1e-2, batch_size=4, grad_accum=2, seq_len=32, save_every=2, eval_every=4, device="cpu")
SHARD_CASES = ("lora", "fossil", "fossil-bat", "cola-random", "pissa", "cora")  # fossil: balance at r 5, uneven shards

SHARD_SCRIPT = """
import json, os, sys
import torch
from lowrank_surgery import checkpoint, train as train_module

spec = json.loads(open(sys.argv[1]).read())
torch.distributed.init_process_group("gloo")  # one group for all the runs, which use it as they find it
read = []
real_read = checkpoint.Checkpoint._read


def counted(self, info, buffer=None):  # the bytes of the base this process reads (not those of the adapter)
    if os.path.samefile(info.shard.parent, spec["base"]):
        read.append(info.nbytes)
    return real_read(self, info, buffer)


checkpoint.Checkpoint._read = counted
if spec["kill"]:  # process 1 dies in the forward of step 3 (two micro-batches a step)
    real_loss, calls = train_module.token_loss_sum, []

    def dying(*args):
        calls.append(torch.is_grad_enabled())  # training forwards, not evaluation's
        if os.environ["RANK"] == "1" and sum(calls) == 5:
            os._exit(1)
        return real_loss(*args)

    train_module.token_loss_sum = dying
report = []
for run in spec["runs"]:
    read.clear()
    train_module.train(run["adapter"], spec["base"], spec["data"], run["out"], shard=True, resume=run["resume"],
                       **spec["args"])
    report.append(sum(read))
with open(f"{spec['report']}.{os.environ['RANK']}", "w") as f:
    json.dump(report, f)
torch.distributed.destroy_process_group()
"""


def run_sharded(root: Path, runs: list[dict], inputs: dict, kill: bool = False) -> tuple[subprocess.CompletedProcess,
                                                                                      list[list[int]]]:
    """SHARD_SCRIPT on two processes under torchrun: (the launcher's result, each process's bytes read per run)."""
    (root / "script.py").write_text(SHARD_SCRIPT)
    spec = {"base": str(inputs["base"]), "data": str(inputs["data"]),
            "args": {**SHARD_ARGS, "eval_data": str(inputs["eval"])}, "runs": [{**run, "adapter": str(run["adapter"]), "out": str(run["out"])} for run in runs], "kill": kill,
            "report": str(root / "read")}
    (root / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(root / "script.py"), str(root / "spec.json")]
    launcher = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and the processes it started, not left behind
        launcher.communicate()
        raise
    res = subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)
    reports = [json.loads((root / f"read.{rank}").read_text()) for rank in (0, 1) if (root / f"read.{rank}").exists()]
    return res, reports


@pytest.fixture(scope="module")
def shard_inputs(setup, recipe) -> dict:
    """An adapter of every SHARD_CASES case (all linear modules), an evaluation file the two processes split unevenly
    (9 examples: 5 and 4, so 2 and 1 micro-batches of 4), and each case trained by one process without --shard."""
    root = setup["root"] / "shard"
    root.mkdir()
    inputs = {"base": setup["base"], "data": setup["data"], "eval": write_jsonl(root / "eval.jsonl", QA[:9]),
              "adapters": {}, "one": {}}
    for case in SHARD_CASES:
        method, r, options = recipe(case, setup["base"])
        adapter = lrs.init_adapter(method, setup["base"], r=r, seed=3, targets="all-linear", options=options)
        inputs["adapters"][case] = lrs.save_adapter(adapter, root / "adapters" / case)
        inputs["one"][case] = root / "one" / case
        train(inputs["adapters"][case], setup["base"], setup["data"], inputs["one"][case], eval_data=inputs["eval"],
              **SHARD_ARGS)
    return inputs


def eval_losses(out: Path) -> list[float]:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return [r["eval_loss"] for r in records if "eval_loss" in r]


def assert_same_checkpoint(sharded: Path, one: Path) -> None:
    """The same losses within 1e-5 relative per step, the same adapter and a checkpoint of the same format."""
    assert losses(sharded) == pytest.approx(losses(one), rel=1e-5) and len(losses(one)) == SHARD_ARGS["steps"]
    assert eval_losses(sharded) == pytest.approx(eval_losses(one), rel=1e-5)
    a, b = lrs.load_adapter(sharded), lrs.load_adapter(one)
    assert a.config == b.config and a.weights.keys() == b.weights.keys()
    for path in a.weights:
        for name in a.weights[path]:
            torch.testing.assert_close(a.weights[path][name], b.weights[path][name], rtol=1e-4, atol=1e-6)
    states = [lrs.Checkpoint(out / STATE_DIR / "optimizer.safetensors") for out in (sharded, one)]
    assert {n: i.shape for n, i in states[0].tensors.items()} == {n: i.shape for n, i in states[1].tensors.items()}


@pytest.mark.slow
def test_shard_on_two_processes_matches_one(shard_inputs, setup, tmp_path):
    """Every method sharded over two processes gives the one-process losses, adapter and checkpoint format; each
    process reads only its half of the base; a one-process checkpoint resumes sharded, exactly."""
    cut = tmp_path / "resumed"

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(shard_inputs["adapters"]["lora"], setup["base"], setup["data"], cut, on_log=interrupt,
              eval_data=shard_inputs["eval"], **SHARD_ARGS)
    runs = [{"adapter": shard_inputs["adapters"][case], "out": tmp_path / case, "resume": False}
            for case in SHARD_CASES] + [{"adapter": cut, "out": cut, "resume": True}]
    res, reports = run_sharded(tmp_path, runs, shard_inputs)
    assert res.returncode == 0, res.stderr[-3000:]
    for case in SHARD_CASES:
        assert_same_checkpoint(tmp_path / case, shard_inputs["one"][case])
        assert json.loads((tmp_path / case / STATE_DIR / "state.json").read_text())["world_size"] == 2
    assert_same_checkpoint(cut, shard_inputs["one"]["lora"])
    total = sum(info.nbytes for info in lrs.Checkpoint(setup["base"]).tensors.values())
    for first, second in zip(*reports):  # every byte of the base read once, by one of the two
        assert first + second == total and max(first, second) < 0.55 * total


@pytest.mark.slow
def test_a_process_dying_mid_step_leaves_the_last_checkpoint(shard_inputs, setup, tmp_path):
    """Process 1 dies in step 3: OUT keeps step 2 whole, which one process resumes unsharded to the same end."""
    out = tmp_path / "out"
    res, _ = run_sharded(tmp_path, [{"adapter": shard_inputs["adapters"]["lora"], "out": out, "resume": False}],
                         shard_inputs, kill=True)
    assert res.returncode != 0
    assert json.loads((out / STATE_DIR / "state.json").read_text())["step"] == 2
    assert not list(tmp_path.glob(".out.lrs-tmp*"))
    assert losses(out) == pytest.approx(losses(shard_inputs["one"]["lora"])[:2], rel=1e-5)
    train(shard_inputs["adapters"]["lora"], setup["base"], setup["data"], out, resume=True,
          eval_data=shard_inputs["eval"], **SHARD_ARGS)
    assert_same_checkpoint(out, shard_inputs["one"]["lora"])


def test_shard_without_torchrun_runs_as_one_process(lrs, setup, tmp_path):
    """`lrs train --shard` alone says it shards over nothing, and trains as one process would."""
    args = [setup["adapter"], "--base", setup["base"], "--data", setup["data"], "--steps", "2", "--batch-size", "4",
            "--seq-len", "16", "--json"]
    res = lrs("train", *args, "--out", tmp_path / "sharded", "--shard")
    assert res.code == 0 and res.stderr == f"warning: {train_module.SHARD_ALONE}\n", res.stderr
    assert json.loads(res.stdout)["shard"] and not torch.distributed.is_initialized()
    assert lrs("train", *args, "--out", tmp_path / "plain").code == 0
    assert losses(tmp_path / "sharded") == pytest.approx(losses(tmp_path / "plain"), rel=1e-6)


def test_shard_rows_cut_like_torch_chunk():
    """The rows each process reads are those FSDP2 keeps there: torch.chunk's pieces, empty past the last."""
    from lowrank_surgery.sharding import shard_rows

    for rows in range(12):
        for world in range(1, 5):
            pieces = [c.tolist() for c in torch.arange(rows).chunk(world)] if rows else []
            expected = pieces + [[]] * (world - len(pieces))
            assert [list(range(*shard_rows(rows, rank, world))) for rank in range(world)] == expected


def test_resuming_on_another_number_of_processes_warns_of_dropout(setup, tmp_path):
    adapter = lrs.init_adapter("lora", setup["base"], r=4, seed=1, dropout=0.2)
    args = dict(steps=2, batch_size=4, seq_len=16, save_every=1)

    def interrupt(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(adapter, setup["base"], setup["data"], tmp_path / "out", on_log=interrupt, **args)
    _edit_state(tmp_path / "out" / STATE_DIR / "state.json", lambda s: s.update(world_size=2))
    with pytest.warns(lrs.LrsWarning, match=r"resuming a checkpoint of 2 process\(es\) on 1: training continues"):
        assert train(adapter, setup["base"], setup["data"], tmp_path / "out", resume=True, **args)["resumed_from"] == 1


# ---------------------------------------------------------------------------- CLI
def test_cli_trains_and_reports(lrs, setup, tmp_path):
    out = tmp_path / "cli-out"
    res = lrs("train", setup["adapter"], "--base", setup["base"], "--data", setup["data"], "--out", out,
              "--steps", "2", "--batch-size", "4", "--seq-len", "8", "--json")
    assert res.code == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["steps"] == 2 and summary["truncated"] > 0 and (out / "adapter_model.safetensors").is_file()
    res = lrs("train", setup["adapter"], "--base", setup["base"], "--data", setup["data"], "--out", out,
              "--steps", "2", "--batch-size", "4", "--seq-len", "8", "--resume")
    assert res.code == 0 and "trained 2 steps" in res.stdout  # nothing left to do
    res = lrs("train", setup["adapter"], "--base", setup["base"], "--data", setup["data"], "--out", out, "--force",
              "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-data", setup["eval"], "--eval-every", "1")
    assert res.code == 0 and "step 0: eval loss" in res.stdout and "step 2: loss" in res.stdout, res.stdout


RESUME_EDITS = {  # a training checkpoint with one part broken, by name: (file under OUT, how it is broken)
    "state-not-json": (".trainer/state.json", lambda path: path.write_text("{")),
    "state-a-list": (".trainer/state.json", lambda path: path.write_text("[1]")),
    "state-no-settings": (".trainer/state.json", lambda path: _edit_state(path, lambda s: s.pop("settings"))),
    "state-bad-groups": (".trainer/state.json", lambda path: _edit_state(path, lambda s: s.update(param_groups=[{"lr": 1}]))),
    "state-bad-betas": (".trainer/state.json", lambda path: _edit_state(path, lambda s: s["param_groups"][0].update(betas="x"))),
    "metrics-not-json": ("metrics.jsonl", lambda path: path.write_text("{oops\n")),
    "optimizer-keys": (".trainer/optimizer.safetensors", lambda path: save_file({"step": torch.zeros(1)}, path)),
    "rng-size": (".trainer/rng.safetensors", lambda path: save_file({"cpu.0": torch.zeros(10, dtype=torch.uint8)}, path)),
    "no-optimizer": (".trainer/optimizer.safetensors", lambda path: path.unlink()),
}


def _edit_state(path: Path, change) -> None:
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


@pytest.fixture(scope="module")
def train_inputs(setup, chat_models, tiny_models, char_tokenizer, pickled_copy) -> Path:
    """Data files, bases and broken checkpoints for the table below, built once."""
    root = setup["root"] / "bad"
    root.mkdir()
    (root / "empty.jsonl").write_text("")
    (root / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    (root / "binary.jsonl").write_bytes(b'{"text": "a"}\n\xff\xfe garbage\n')
    (root / "exists").mkdir()
    bert = shutil.copytree(tiny_models["bert"], root / "bert")
    char_tokenizer().save_pretrained(bert)
    lrs.save_adapter(lrs.init_adapter("lora", bert, r=2, targets="query"), root / "bert-adapter")
    lrs.save_adapter(lrs.init_adapter("cola", setup["base"], r=2, targets="q_proj", options={"strategy": "random"}),
                     root / "cola-random")
    pickled_copy(setup["base"], root / "pickled")
    train(setup["adapter"], setup["base"], setup["data"], root / "run", steps=1, batch_size=2, seq_len=16)
    for name, (file, breaks) in RESUME_EDITS.items():
        shutil.copytree(root / "run", root / name)
        breaks(root / name / file)
    return root


TRAIN_BAD = {  # expected message -> arguments after `lrs train` (--out a fresh directory unless given)
    "broken.jsonl:2: malformed JSON": ["{adapter}", "--base", "{base}", "--data", "{root}/broken.jsonl"],
    "empty data file": ["{adapter}", "--base", "{base}", "--data", "{root}/empty.jsonl"],
    "binary.jsonl:2: not UTF-8": ["{adapter}", "--base", "{base}", "--data", "{root}/binary.jsonl"],
    "/dev/null: not a regular file": ["{adapter}", "--base", "{base}", "--data", "/dev/null"],
    "bad: not a regular file": ["{adapter}", "--base", "{base}", "--data", "{root}"],
    "adapter does not fit": ["{adapter}", "--base", "{gpt2}", "--data", "{data}"],
    "no usable tokenizer": ["{adapter}", "--base", "{qwen2}", "--data", "{data}"],
    "not a causal language model with its head: BertLMHeadModel needs": [
        "{root}/bert-adapter", "--base", "{root}/bert", "--data", "{data}"],
    "needs 5 tensor(s) it lacks (e.g. cls.predictions.bias), which would start random (--shard reads": [
        "{root}/bert-adapter", "--base", "{root}/bert", "--data", "{data}", "--shard"],
    "is a pickled checkpoint; pass --allow-pickle": ["{adapter}", "--base", "{root}/pickled", "--data", "{data}"],
    "--lr must be positive and finite, got nan": ["{adapter}", "--base", "{base}", "--data", "{data}", "--lr", "nan"],
    "--lr must be positive and finite, got inf": ["{adapter}", "--base", "{base}", "--data", "{data}", "--lr", "inf"],
    "--lr must be positive and finite, got 1e+300": ["{adapter}", "--base", "{base}", "--data", "{data}", "--lr", "1e300"],
    "--weight-decay must be at least 0 and finite, got inf": ["{adapter}", "--base", "{base}", "--data", "{data}",
                                                              "--weight-decay", "inf"],
    "--seed must be between 0 and 4294967295": ["{adapter}", "--base", "{base}", "--data", "{data}", "--seed",
                                                "99999999999999999999"],
    "--max-grad-norm must be positive": ["{adapter}", "--base", "{base}", "--data", "{data}", "--max-grad-norm", "-1"],
    "--warmup must be at least 0": ["{adapter}", "--base", "{base}", "--data", "{data}", "--warmup", "-1"],
    "already exists": ["{adapter}", "--base", "{base}", "--data", "{data}", "--out", "{root}/exists"],
    "draws at random in every training forward, which --grad-checkpointing would recompute differently": [
        "{root}/cola-random", "--base", "{base}", "--data", "{data}", "--grad-checkpointing"],
    "holds no training checkpoint": ["{adapter}", "--base", "{base}", "--data", "{data}", "--out", "{root}/exists",
                                     "--resume"],
    "state-not-json/.trainer/state.json: not valid JSON": ["{resume}", "{root}/state-not-json"],
    "state-a-list/.trainer/state.json: not a JSON object": ["{resume}", "{root}/state-a-list"],
    "state-no-settings/.trainer/state.json: malformed or missing settings": ["{resume}", "{root}/state-no-settings"],
    "state-bad-groups/.trainer/state.json: malformed or missing param_groups": ["{resume}", "{root}/state-bad-groups"],
    "state-bad-betas/.trainer/state.json: malformed or missing param_groups": ["{resume}", "{root}/state-bad-betas"],
    "metrics-not-json/metrics.jsonl:1: malformed JSON": ["{resume}", "{root}/metrics-not-json"],
    "optimizer.safetensors: key 'step' is not <parameter index>.<name>": ["{resume}", "{root}/optimizer-keys"],
    "rng.safetensors: cpu.0 is not a CPU random state": ["{resume}", "{root}/rng-size"],
    "no-optimizer/.trainer/optimizer.safetensors is missing; the checkpoint in": ["{resume}", "{root}/no-optimizer"],
    "--resume needs the checkpoint's settings, but these differ: lr 1.0 (checkpoint: 0.0002)": [
        "{resume}", "{root}/run", "--lr", "1"],
}


@pytest.mark.parametrize("expected", TRAIN_BAD)
def test_cli_bad_input_is_one_line(lrs, setup, chat_models, tiny_models, train_inputs, tmp_path, fill,
                                   assert_one_line_error, expected):
    resume = "{adapter} --base {base} --data {data} --resume --out"
    args = [part for arg in TRAIN_BAD[expected] for part in (resume.split() if arg == "{resume}" else [arg])]
    args = fill(args, root=train_inputs, gpt2=chat_models["gpt2"], qwen2=tiny_models["qwen2"],
                **{k: setup[k] for k in ("adapter", "base", "data")})
    res = lrs("train", *args, *([] if "--out" in args else ["--out", tmp_path / "out"]),
              "--steps", "1", "--batch-size", "2", "--seq-len", "16")
    assert_one_line_error(res, expected)
    assert not (tmp_path / "out").exists()


def test_pickled_base_trains_with_allow_pickle(lrs, setup, train_inputs, tmp_path):
    res = lrs("train", setup["adapter"], "--base", train_inputs / "pickled", "--data", setup["data"], "--out",
              tmp_path / "out", "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--allow-pickle")
    assert res.code == 0, res.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(LrsError, match="1 are visible.*--nproc_per_node.*--device cpu"):
        train_module._setup_distributed("auto")


# ---------------------------------------------------------------------------- OUT
def test_without_matplotlib_the_run_completes_without_a_plot(lrs, setup, tmp_path, monkeypatch):
    """matplotlib is only in the examples extra: a plain install must not lose the run for the plot."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "out"
    res = lrs("train", setup["adapter"], "--base", setup["base"], "--data", setup["data"], "--out", out,
              "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--save-every", "1")
    assert res.code == 0, res.stderr
    assert res.stderr == "warning: no loss_curve.png: matplotlib is not installed (pip install matplotlib to plot the losses)\n"
    assert json.loads((out / STATE_DIR / "state.json").read_text())["step"] == 2 and train_module.load_adapter(out).weights
    assert not (out / "loss_curve.png").exists() and "loss_curve" not in (out / "README.md").read_text()


def test_resume_keeps_what_else_out_holds(setup, tmp_path):
    """A checkpoint replaces only what lrs wrote in OUT: the user's notes and the run's own --data stay."""
    args = dict(steps=4, lr=1e-2, batch_size=4, seq_len=32, save_every=2)
    out = tmp_path / "out"

    def interrupt(record):
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match=f"interrupted; {out} keeps its checkpoint of step 2"):
        train(setup["adapter"], setup["base"], setup["data"], out, on_log=interrupt, **args)
    data = write_jsonl(out / "my-data.jsonl", QA)  # the same examples, now kept inside OUT
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("compare with rank 8")
    with pytest.raises(LrsError, match="would replace the input"):  # a file of the checkpoint's own is refused
        train(setup["adapter"], setup["base"], write_jsonl(out / STATE_DIR / "data.jsonl", QA), out, resume=True, **args)
    summary = train(setup["adapter"], setup["base"], data, out, resume=True, **args)
    assert summary["resumed_from"] == 2 and json.loads((out / STATE_DIR / "state.json").read_text())["step"] == 4
    assert data.read_text() == write_jsonl(tmp_path / "copy.jsonl", QA).read_text()
    assert (out / "notes" / "todo.txt").read_text() == "compare with rank 8"


@pytest.mark.slow
def test_a_run_holds_out_from_start_to_end(setup, tmp_path):
    """A second run on an OUT another run holds (even before its first checkpoint) is refused."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lowrank_surgery.checkpoint import "
                               "claim_output\nwith claim_output(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LrsError, match=f"{out} is being written by another lrs run \\(pid {holder.pid}\\)"):
            train(setup["adapter"], setup["base"], setup["data"], out, steps=1, batch_size=4, seq_len=16)
    finally:
        holder.kill()
        holder.wait()
