"""The shared atomic output every command writes through: OUT as a symlink or the current directory, inputs that
live inside OUT, signals, concurrent runs, what a killed run leaves, parent directories of a failed run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lowrank_surgery as lrs
from lowrank_surgery.adapter import default_adapter_out, load_adapter, save_adapter
from lowrank_surgery.checkpoint import Checkpoint, atomic_output, model_name
from lowrank_surgery.errors import LrsError
from lowrank_surgery.initialize import init_adapter
from lowrank_surgery.subspace import default_subspace_out

CLI = [sys.executable, "-c", "from lowrank_surgery.cli.app import main; main()"]


def leftovers(*directories: Path) -> list[str]:
    return [p.name for d in directories if d.is_dir() for p in d.iterdir() if ".lrs-" in p.name]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory) -> Path:
    return lrs.save_adapter(lrs.init_adapter("lora", llama, r=2, targets="q_proj"), tmp_path_factory.mktemp("ad") / "ad")


COMMANDS = {  # a command's arguments for an output OUT
    "init": lambda llama, ad, out: ["init", "--method", "lora", "--base", llama, "--out", out],
    "merge": lambda llama, ad, out: ["merge", ad, llama, out],
    "extract-subspace": lambda llama, ad, out: ["extract-subspace", llama, "--out", out, "--rank", "2"],
    "convert": lambda llama, ad, out: ["convert", ad, out, "--to", "kohya"],
}


def _dangling(tmp_path: Path) -> Path:
    (tmp_path / "out").symlink_to(tmp_path / "missing" / "target")
    return tmp_path / "out"


def _link_to_previous_output(tmp_path: Path) -> Path:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "previous.txt").write_text("an earlier output")
    (tmp_path / "out").symlink_to(tmp_path / "real")
    return tmp_path / "out"


def _current_directory(tmp_path: Path) -> Path:
    (tmp_path / "here").mkdir()
    os.chdir(tmp_path / "here")
    return Path(".")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("make_out, message", [
    (_dangling, "is a symlink to"),
    (_current_directory, "holds the current directory, which cannot be replaced"),
])
def test_out_that_cannot_be_replaced_is_refused_and_leaves_nothing(lrs, llama, adapter, tmp_path, monkeypatch,
                                                                 command, make_out, message):
    monkeypatch.chdir(tmp_path)
    out = make_out(tmp_path)
    res = lrs(*COMMANDS[command](llama, adapter, out), "--force")
    assert res.code == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert not leftovers(tmp_path, tmp_path / "here") and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_out_a_symlink_to_a_directory_is_replaced_through_the_link(lrs, llama, adapter, tmp_path, command):
    out = _link_to_previous_output(tmp_path)
    res = lrs(*COMMANDS[command](llama, adapter, out), "--force")
    assert res.code == 0, res.stderr
    assert out.is_symlink() and out.resolve() == tmp_path / "real"
    assert not (out / "previous.txt").exists() and any(out.iterdir())
    assert not leftovers(tmp_path)


def _symlinked_shards(llama: Path, out: Path) -> Path:
    return _linked_copy(llama, out, lambda f: f.suffix == ".safetensors")


def _symlinked_index(llama: Path, out: Path) -> Path:
    return _linked_copy(llama, out, lambda f: f.name.endswith("index.json"))


def _linked_copy(llama: Path, out: Path, into_out) -> Path:
    """A base directory of symlinks: to OUT's file of the same name where `into_out`, else to llama's."""
    base = out.parent / "base"
    base.mkdir()
    for f in llama.iterdir():
        (base / f.name).symlink_to(out / f.name if into_out(f) else f)
    return base


def _symlinked_file(llama: Path, out: Path) -> Path:
    (out.parent / "base.safetensors").symlink_to(next(out.glob("*.safetensors")))
    return out.parent / "base.safetensors"


@pytest.mark.parametrize("link", [_symlinked_shards, _symlinked_index, _symlinked_file])
def test_input_files_that_live_in_out_are_refused_with_force(lrs, llama, adapter, tmp_path, link):
    """A base whose shards, index or file are symlinks into OUT: replacing OUT would delete the weights read."""
    out = tmp_path / "out"
    assert lrs("merge", adapter, llama, out).code == 0  # an earlier output, now the target of the base's links
    before = sorted(p.name for p in out.iterdir())
    res = lrs("merge", adapter, link(llama, out), out, "--force")
    assert res.code == 1 and "would replace the input" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert sorted(p.name for p in out.iterdir()) == before and not leftovers(tmp_path)


def test_failed_run_removes_the_parents_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "kept" / "new" / "deeper" / "out") as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


@pytest.mark.parametrize("failing", ["moving OUT aside", "moving the new output in"])
def test_a_rename_that_fails_keeps_out_and_leaves_nothing(tmp_path, monkeypatch, failing):
    """The final renames sit inside the cleanup: EBUSY (a mount point, say) restores OUT and removes the rest."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    rename = Path.rename

    def busy(self, target):
        if (self == out) == (failing == "moving OUT aside") and ".lrs-old-" not in self.name:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(LrsError, match="cannot put .* in place: Device or resource busy"):
        with atomic_output(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["previous.txt"] and not leftovers(tmp_path)


@pytest.mark.parametrize("killed", ["dead pid", "pid reused by a live process"])
def test_leftovers_of_a_killed_run_are_cleaned_and_a_half_swapped_out_restored(tmp_path, killed):
    out, pid = tmp_path / "out", dead_pid() if killed == "dead pid" else os.getppid()
    (tmp_path / f".out.lrs-tmp-{pid}-0123abcd").mkdir()
    (tmp_path / f".out.lrs-old-{pid}-4567ef89").mkdir()  # killed between moving OUT aside and renaming the new one in
    (tmp_path / f".out.lrs-old-{pid}-4567ef89" / "kept.txt").write_text("the previous output")
    (tmp_path / ".out.lrs-claim").write_text(f"{pid}\n")
    (tmp_path / f".other.lrs-tmp-{pid}-0123abcd").mkdir()  # another OUT's: not this run's business
    with pytest.raises(LrsError, match="already exists"), atomic_output(out):
        pass
    assert (out / "kept.txt").read_text() == "the previous output"
    assert leftovers(tmp_path) == [f".other.lrs-tmp-{pid}-0123abcd"]


# ---------------------------------------------------------------------------- real runs of the CLI
@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Path]:
    """A 64 MB base and an adapter for it: a merge long enough to be stopped while it writes."""
    root = tmp_path_factory.mktemp("big")
    save_file({f"layers.{i}.proj.weight": torch.randn(1024, 1024) for i in range(16)}, root / "base.safetensors")
    lrs.save_adapter(lrs.init_adapter("lora", root / "base.safetensors", r=4, targets="proj"), root / "ad")
    return {"base": root / "base.safetensors", "adapter": root / "ad"}


def _default_signals() -> None:
    """The merge as a terminal starts it: under nohup or as a background job the suite's own process ignores
    SIGHUP, SIGINT or SIGQUIT, which its children inherit and lrs rightly leaves ignored."""
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)


def start_merge_and_stop_it(big: dict[str, Path], out: Path) -> subprocess.Popen:
    """`lrs merge` in a process of its own, frozen (SIGSTOP) once its temporary output exists."""
    proc = subprocess.Popen([*CLI, "merge", str(big["adapter"]), str(big["base"]), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.lrs-tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    assert proc.poll() is None, "the merge finished before it could be stopped"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGALRM, signal.SIGTERM,
                                    signal.SIGINT], ids=lambda s: signal.Signals(s).name)
def test_a_signal_mid_write_leaves_nothing(big, tmp_path, signum):
    out = tmp_path / "new" / "deeper" / "out"
    proc = start_merge_and_stop_it(big, out)
    proc.send_signal(signum)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "error: interrupted; nothing was written\n", stderr
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary output, no claim, and not the parents it created


@pytest.mark.slow
def test_concurrent_runs_on_one_out_the_second_is_refused(big, tmp_path, lrs):
    out = tmp_path / "out"
    first = start_merge_and_stop_it(big, out)
    second = subprocess.run([*CLI, "merge", str(big["adapter"]), str(big["base"]), str(out)],
                            capture_output=True, text=True, timeout=120)
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
    assert f"{out} is being written by another lrs run (pid {first.pid})" in second.stderr
    assert set(Checkpoint(out).names()) == {f"layers.{i}.proj.weight" for i in range(16)}
    assert "already exists" in lrs("merge", big["adapter"], big["base"], out).stderr  # once it is done: OUT exists
    assert not leftovers(tmp_path)


@pytest.mark.slow
def test_what_a_killed_run_leaves_is_recognisable_and_cleaned_by_the_next(big, tmp_path, lrs):
    out = tmp_path / "out"
    proc = start_merge_and_stop_it(big, out)
    proc.kill()
    proc.wait()
    left = leftovers(tmp_path)
    assert sorted(n.split(f"-{proc.pid}-")[0] for n in left) == [".out.lrs-claim", ".out.lrs-tmp"]
    assert (tmp_path / ".out.lrs-claim").read_text() == f"{proc.pid}\n"
    res = lrs("merge", big["adapter"], big["base"], out)
    assert res.code == 0, res.stderr
    assert not leftovers(tmp_path) and len(Checkpoint(out).names()) == 16


# ------------------------------------------------------------------------------------------------ default OUT


@pytest.mark.parametrize("model, name", [
    ("HuggingFaceTB/SmolLM2-135M", "SmolLM2-135M"),
    ("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"),  # a dot inside a name is not a suffix
    ("models/smollm2/", "smollm2"),
    ("~/ckpt/weights.safetensors", "weights"),
    ("old/pytorch_model.bin", "pytorch_model"),
    ("/data/.cache/.hidden-model", "hidden-model"),
    ("my model (v2)", "my-model-v2"),
    ("/data/-rf", "rf"),
    ("/", "model"),
])
def test_model_name_is_the_last_component_made_safe(model, name):
    assert model_name(model) == name


def test_default_outs_are_named_after_models_method_and_rank():
    assert default_adapter_out("HuggingFaceTB/SmolLM2-135M-Instruct", "cola", 8) == Path("SmolLM2-135M-Instruct-cola-r8")
    assert default_subspace_out(["a/x", "b/y.safetensors"], 64) == Path("x+y-subspace-r64")
    assert default_subspace_out(["a/x", "b/y", "c/z", "d/w"], 16) == Path("x+3-more-subspace-r16")


def _output_line(res) -> str:
    return res.stdout.strip().splitlines()[-1]


def test_init_without_out_writes_in_the_current_directory(lrs, llama, tmp_path, monkeypatch, assert_one_line_error):
    monkeypatch.chdir(tmp_path)
    res = lrs("init", "--method", "cola", "--base", llama, "--rank", "2", "--targets", "q_proj")
    expected = f"{llama.name}-cola-r2"
    assert res.code == 0 and f"to {expected}:" in _output_line(res), res
    assert load_adapter(tmp_path / expected).config.method == "cola"
    again = lrs("init", "--method", "cola", "--base", llama, "--rank", "2", "--targets", "q_proj")
    assert_one_line_error(again, f"{expected} already exists; pass --force to overwrite it")
    assert lrs("init", "--method", "cola", "--base", llama, "--rank", "2", "--targets", "q_proj", "--force").code == 0
    written = save_adapter(init_adapter("lora", llama, r=2, targets="q_proj"))  # the Python API's default
    assert written == Path(f"{llama.name}-lora-r2") and (tmp_path / written / "adapter_config.json").is_file()


def test_extract_subspace_without_out_is_named_after_every_model(lrs, llama, tmp_path, monkeypatch,
                                                                 assert_one_line_error):
    (tmp_path / "twin").symlink_to(llama)
    monkeypatch.chdir(tmp_path)
    res = lrs("extract-subspace", llama, "twin", "--rank", "2", "--json")
    expected = f"{llama.name}+twin-subspace-r2"
    assert res.code == 0 and json.loads(res.stdout)["out"] == expected
    assert json.loads((tmp_path / expected / "subspace.json").read_text())["rank"] == 2
    assert_one_line_error(lrs("extract-subspace", llama, "twin", "--rank", "2"), f"{expected} already exists")


def test_a_hub_id_with_a_revision_names_the_output_after_the_repository(lrs, llama, tmp_path, monkeypatch,
                                                                        cache_on_hub):
    commit = cache_on_hub(llama, "acme/tiny-llama", tmp_path / "hub")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for args, expected in [(["init", "--method", "lora", "--base", "acme/tiny-llama"], "tiny-llama-lora-r8"),
                           (["extract-subspace", "acme/tiny-llama", "--rank", "2"], "tiny-llama-subspace-r2")]:
        res = lrs(*args, "--revision", commit)
        assert res.code == 0 and f"to {expected}" in _output_line(res), res
        assert (tmp_path / "work" / expected).is_dir()
