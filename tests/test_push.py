"""`lrs push`: one commit with every file and a valid model card, through an injected Hub client; no secret leaks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError

import lowrank_surgery as lrs
from lowrank_surgery import cards
from lowrank_surgery.errors import LrsError
from lowrank_surgery.hub import push

SECRET = "hf_secretTOKEN1234567890abcdef"
BASE_ID = "acme/tiny-llama"
USER_TEXT = "My own notes about this adapter.\n"


class FakeHub:
    """Records HfApi calls; fails with an HTTP error when `status` is set."""

    def __init__(self, status: int | None = None, leak: str = SECRET):
        self.status, self.leak, self.calls, self.uploaded = status, leak, [], {}

    def _fail(self, name: str) -> None:
        if self.status:
            url = f"https://huggingface.co/api/{name}?token={self.leak}"
            response = httpx2.Response(self.status, request=httpx2.Request("POST", url))
            raise HfHubHTTPError(f"{self.status} Client Error for url {url} (Authorization: Bearer {self.leak})",
                                 response=response)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        self._fail("repos/create")
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, kwargs))
        self._fail("commit")
        for op in operations:
            data = op.path_or_fileobj
            self.uploaded[op.path_in_repo] = Path(data).read_bytes() if isinstance(data, str) else bytes(data)
        pr = "https://huggingface.co/x/discussions/1" if kwargs.get("create_pr") else None
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc", pr_url=pr)


@pytest.fixture(autouse=True)
def secret_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture
def adapter_dir(llama, tmp_path) -> Path:
    adapter = lrs.init_adapter("lora", llama, r=4, targets="q_proj,v_proj")
    adapter.config.base_model = BASE_ID
    out = lrs.save_adapter(adapter, tmp_path / "adapter")
    (out / "metrics.jsonl").write_text('{"step": 10, "loss": 2.5, "lr": 0.001}\n{"step": 20, "loss": 1.75}\n'
                                       '{"step": 20, "eval_loss": 1.9}\n')
    (out / "README.md").write_text(f"---\nlicense: apache-2.0\ntags:\n- mine\n---\n# My adapter\n\n{USER_TEXT}")
    (out / "loss_curve.png").write_bytes(b"\x89PNG fake")
    (out / ".cache").mkdir()
    (out / ".cache" / "junk").write_text("not uploaded")
    return out


def validated(card: str) -> dict:
    """The card's metadata after a round trip through huggingface_hub's ModelCard and ModelCardData."""
    parsed = ModelCard(card)
    data = parsed.data.to_dict()
    assert ModelCardData(**data).to_dict() == data
    assert parsed.content == card
    return data


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_push_adapter_in_one_commit(adapter_dir, capsys):
    before = snapshot(adapter_dir)
    hub = FakeHub()
    report = push(adapter_dir, "me/tiny-lora", private=True, create_pr=True, message="first push", api=hub)
    assert [c[0] for c in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][2] == {"private": True, "exist_ok": True}
    assert hub.calls[1][1] == "me/tiny-lora"
    assert hub.calls[1][2] == {"commit_message": "first push", "revision": None, "create_pr": True}
    assert set(hub.uploaded) == {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl",
                                 "loss_curve.png", "README.md"}
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png"):
        assert hub.uploaded[name] == before[name]
    assert hub.uploaded["README.md"].decode() == report.card
    assert report.pr_url and report.total_bytes == sum(len(v) for v in hub.uploaded.values())
    assert snapshot(adapter_dir) == before  # the local directory is not touched

    data = validated(report.card)
    assert data["base_model"] == BASE_ID and data["library_name"] == "peft" and data["license"] == "apache-2.0"
    assert data["tags"][:2] == ["lowrank-surgery", "lora"] and "mine" in data["tags"]
    body = ModelCard(report.card).text
    assert "# My adapter" in body and USER_TEXT in body  # the user's text stays
    assert "| final training loss | 1.75 |" in body and "| final eval loss | 1.9 |" in body and "| steps | 20 |" in body
    assert "![loss_curve](loss_curve.png)" in body and "| rank r | 4 |" in body and "`q_proj`, `v_proj`" in body
    assert 'PeftModel.from_pretrained(base, "me/tiny-lora")' in body
    assert SECRET not in report.card and SECRET not in "".join(capsys.readouterr())


def test_card_update_is_stable_and_replaces_only_its_section(adapter_dir):
    adapter = lrs.load_adapter(adapter_dir)
    first = push(adapter_dir, "me/tiny-lora", dry_run=True).card
    metrics = cards.read_metrics(adapter_dir)
    assert cards.adapter_card(adapter, "me/tiny-lora", metrics, ["loss_curve.png"], existing=first) == first
    refreshed = cards.adapter_card(adapter, "me/tiny-lora", existing=first)  # metrics gone: section rewritten
    assert "## Training" in first and "## Training" not in refreshed
    assert refreshed.count(cards.BEGIN) == 1 and USER_TEXT in refreshed


def test_pipeline_tag_from_the_base_config(llama, tmp_path, monkeypatch, cache_on_hub):
    adapter = lrs.init_adapter("lora", llama, r=2, targets="q_proj")
    assert validated(cards.adapter_card(adapter)).get("pipeline_tag") == "text-generation"  # local base path
    assert "base_model" not in validated(cards.adapter_card(adapter))  # a local path is not a Hub id
    (tmp_path / "models" / "smollm2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    adapter.config.base_model = "models/smollm2"  # a relative local path that reads like namespace/name
    assert "base_model" not in validated(cards.adapter_card(adapter))
    adapter.config.base_model = BASE_ID
    assert "pipeline_tag" not in validated(cards.adapter_card(adapter))  # not cached: no guess, no network
    cache_on_hub(llama, BASE_ID, tmp_path / "hub")
    assert validated(cards.adapter_card(adapter))["pipeline_tag"] == "text-generation"


def test_lrs_only_methods_get_the_lrs_snippet(adapter_dir, monkeypatch):
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    for peft_type, prefix in cards.PEFT_PREFIXES.items():  # our table agrees with PEFT
        assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == prefix
    monkeypatch.setattr(cards, "PEFT_PREFIXES", {})
    card = push(adapter_dir, "me/x", dry_run=True).card
    assert 'lrs.load_adapter(snapshot_download("me/x"))' in card and "PeftModel" not in card
    assert "lora" in validated(card)["tags"]


def test_revision_creates_the_branch(adapter_dir):
    hub = FakeHub()
    push(adapter_dir, "me/tiny-lora", revision="v2", api=hub)
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert hub.calls[0][2]["private"] is False
    assert hub.calls[1][2] == {"branch": "v2", "exist_ok": True}
    assert hub.calls[2][2] == {"commit_message": "Upload adapter with lowrank-surgery", "revision": "v2",
                               "create_pr": False}


def test_merged_checkpoint_card(llama, tmp_path):
    merged = tmp_path / "merged"
    shutil.copytree(llama, merged)
    adapter = lrs.init_adapter("lora", llama, r=2, targets="q_proj")
    config = json.loads((merged / "config.json").read_text())
    written = cards.merged_card(config, "acme/base", adapter, adapter_source="me/adapter", base_revision="main")
    (merged / "README.md").write_text(written.replace(cards.END, "Extra words.\n" + cards.END))
    hub = FakeHub()
    report = push(merged, "me/merged", api=hub)
    data = validated(report.card)
    assert data["library_name"] == "transformers" and data["base_model"] == "acme/base"
    assert data["pipeline_tag"] == "text-generation" and {"lowrank-surgery", "merge", "lora"} <= set(data["tags"])
    assert "Extra words." in report.card and "| adapter | me/adapter |" in report.card
    assert len(hub.uploaded) == len(list(merged.iterdir()))

    (merged / "README.md").unlink()  # a checkpoint lrs did not write: no `merge` tag
    data = validated(push(merged, "me/merged", dry_run=True).card)
    assert data["library_name"] == "transformers" and "merge" not in data["tags"]


def test_subspace_card(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    info = {"format": "lrs-subspace", "version": 1, "models": [{"id": BASE_ID, "revision": "abc"}, {"id": "/local/m"}],
            "rank": 4, "scope": "layer", "algorithm": "exact", "energy": {"a.q_proj": 0.5, "a.k_proj": 0.75}}
    (sub / "subspace.json").write_text(json.dumps(info))
    (sub / "subspace.safetensors").write_bytes(b"x" * 10)
    hub = FakeHub()
    report = push(sub, "me/sub", api=hub)
    data = validated(report.card)
    assert data["base_model"] == [BASE_ID] and {"lowrank-surgery", "cora"} <= set(data["tags"])
    assert "library_name" not in data and "min 0.5, mean 0.625, max 0.75" in report.card
    assert f'lrs.init_adapter("cora", "{BASE_ID}", r=4' in report.card
    assert set(hub.uploaded) == {"subspace.json", "subspace.safetensors", "README.md"}


def test_cli_dry_run_sends_and_writes_nothing(lrs, adapter_dir, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("dry run touched the Hub client")

    monkeypatch.setattr("huggingface_hub.HfApi", no_network)
    before = snapshot(adapter_dir)
    res = lrs("push", adapter_dir, "me/tiny-lora", "--dry-run")
    assert res.code == 0, res.stderr
    assert "adapter_model.safetensors" in res.stdout and "KB" in res.stdout and "library_name: peft" in res.stdout
    assert "dry run: nothing was sent" in res.stdout and ".cache" not in res.stdout
    assert snapshot(adapter_dir) == before
    info = json.loads(lrs("push", adapter_dir, "me/tiny-lora", "--dry-run", "--json").stdout)
    assert info["dry_run"] and info["kind"] == "adapter" and {f["path"] for f in info["files"]} == {
        "adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss_curve.png", "README.md"}
    assert SECRET not in res.stdout + res.stderr


def test_cli_push_uses_the_token_from_the_environment(lrs, adapter_dir, monkeypatch):
    hub = FakeHub()
    made = []
    monkeypatch.setattr("huggingface_hub.HfApi", lambda **kw: made.append(kw) or hub)
    res = lrs("push", adapter_dir, "me/tiny-lora", "--private", "--message", "hello")
    assert res.code == 0, res.stderr
    assert made == [{"token": None}]  # huggingface_hub itself reads HF_TOKEN; lrs never handles it
    assert hub.calls[0][2]["private"] is True and hub.calls[-1][2]["commit_message"] == "hello"
    assert "pushed: https://huggingface.co/me/tiny-lora/commit/abc" in res.stdout
    assert SECRET not in res.stdout + res.stderr


@pytest.mark.parametrize("status, expected", [(401, "401 authentication failed"), (403, "403 forbidden"),
                                              (404, "404 not found"), (500, "500 Client Error")])
def test_hub_errors_are_one_line_without_the_token(lrs, adapter_dir, monkeypatch, status, expected):
    monkeypatch.setattr("huggingface_hub.HfApi", lambda **kw: FakeHub(status))
    res = lrs("push", adapter_dir, "me/tiny-lora")
    assert res.code == 1 and res.stderr.startswith("error: push to me/tiny-lora failed: " + expected)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert SECRET not in res.stdout + res.stderr and "***" in res.stderr


def test_token_argument_is_scrubbed_too(adapter_dir):
    token = "plain-secret-without-the-hf-prefix"
    with pytest.raises(LrsError) as err:
        push(adapter_dir, "me/x", token=token, api=FakeHub(401, leak=token))
    assert token not in str(err.value) and "Bearer ***" in str(err.value)


def test_not_logged_in(adapter_dir, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(LrsError, match="not logged in"):
        push(adapter_dir, "me/x")


@pytest.fixture
def bad_dirs(adapter_dir, tmp_path) -> Path:
    (tmp_path / "empty").mkdir()
    shutil.copytree(adapter_dir, tmp_path / "bad-metrics")
    (tmp_path / "bad-metrics" / "metrics.jsonl").write_text('{"step": 1}\n{"step": \n')
    (tmp_path / "bad-subspace").mkdir()
    (tmp_path / "bad-subspace" / "subspace.json").write_text("{")
    (tmp_path / "bad-subspace" / "subspace.safetensors").write_bytes(b"")
    shutil.copytree(adapter_dir, tmp_path / "bad-yaml")
    (tmp_path / "bad-yaml" / "README.md").write_text("---\n- a list\n---\nbody\n")
    return tmp_path


PUSH_BAD = {  # expected message -> (PATH, REPO_ID)
    "no such file or directory": ("{root}/missing", "me/x"),
    "not a directory": ("{adapter}/adapter_config.json", "me/x"),
    "not an adapter (adapter_config.json), merged checkpoint": ("{root}/empty", "me/x"),
    "invalid repo id 'me/x/y'": ("{adapter}", "me/x/y"),
    "invalid repo id 'bad name'": ("{adapter}", "bad name"),
    "metrics.jsonl:2: not valid JSON": ("{root}/bad-metrics", "me/x"),
    "README.md: invalid YAML metadata": ("{root}/bad-yaml", "me/x"),
    "bad-subspace/subspace.json: not valid JSON": ("{root}/bad-subspace", "me/x"),
}


@pytest.mark.parametrize("expected", PUSH_BAD)
def test_bad_input_exits_1_with_one_line(lrs, adapter_dir, bad_dirs, fill, assert_one_line_error, expected):
    assert_one_line_error(lrs("push", *fill(PUSH_BAD[expected], root=bad_dirs, adapter=adapter_dir), "--dry-run"),
                          expected)


@pytest.mark.parametrize("flag", ["--quiet", "--debug"])
def test_global_flag_as_an_option_value_is_the_value(lrs, adapter_dir, flag):
    """`--message --quiet` is a commit message, not the global flag (stripping it left --message without a value)."""
    res = lrs("push", adapter_dir, "me/x", "--dry-run", "--json", "--message", flag)
    assert res.code == 0, res.stderr
    assert json.loads(res.stdout)["message"] == flag


def test_help_has_an_example(lrs):
    res = lrs("push", "--help")
    assert res.code == 0 and "Example: lrs push" in res.stdout and "--create-pr" in res.stdout
