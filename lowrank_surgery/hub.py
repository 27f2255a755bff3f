"""`lrs push`: publish an adapter, merged checkpoint or subspace directory to the Hugging Face Hub.

One commit holds every file of the directory plus a freshly written model card; the local
directory is never modified. The token comes from huggingface_hub's usual sources and is
scrubbed from every message lrs prints.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import cards
from .adapter import CONFIG_NAME, load_adapter
from .checkpoint import Checkpoint
from .errors import LrsError
from .subspace import read_subspace_info

CARD_NAME = "README.md"
SUBSPACE_NAME = "subspace.json"
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{6,}")
KINDS = {"adapter": "adapter", "checkpoint": "merged checkpoint", "subspace": "subspace"}


@dataclass
class PushReport:
    """What push did (or, with dry_run, would do)."""

    kind: str
    repo_id: str
    files: list[dict[str, Any]]
    card: str
    dry_run: bool
    private: bool = False
    create_pr: bool = False
    revision: str | None = None
    message: str = ""
    repo_url: str | None = None
    commit_url: str | None = None
    pr_url: str | None = None
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_bytes = sum(f["size"] for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_kind(path: Path) -> str:
    """adapter, checkpoint (a merged or any transformers checkpoint) or subspace; anything else is an error."""
    if not path.exists():
        raise LrsError(f"no such file or directory: {path}")
    if not path.is_dir():
        raise LrsError(f"{path}: not a directory (push takes an adapter, merged checkpoint or subspace directory)")
    if (path / CONFIG_NAME).is_file():
        return "adapter"
    if (path / SUBSPACE_NAME).is_file():
        return "subspace"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "checkpoint"
    raise LrsError(f"{path}: not an adapter ({CONFIG_NAME}), merged checkpoint (config.json + *.safetensors) "
                   f"or subspace ({SUBSPACE_NAME}) directory")


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise LrsError(f"invalid repo id {repo_id!r}: expected 'namespace/name' with letters, digits, '-', '_' "
                       f"or '.' (at most 96 characters)") from None


def upload_files(path: Path) -> list[Path]:
    """Files to upload, relative to `path`: everything but hidden entries and the card lrs rewrites."""
    files = [p.relative_to(path) for p in sorted(path.rglob("*")) if p.is_file()]
    return [f for f in files if not any(part.startswith(".") for part in f.parts) and f != Path(CARD_NAME)]


def build_card(path: Path, kind: str, repo_id: str | None = None) -> str:
    """The README.md to push: lrs metadata and section refreshed, the user's own text kept."""
    readme = path / CARD_NAME
    existing = readme.read_text() if readme.is_file() else None
    if kind == "adapter":
        images = [p.name for p in sorted(path.glob("*.png"))]
        return cards.adapter_card(load_adapter(path), repo_id, cards.read_metrics(path), images, existing)
    if kind == "subspace":
        return cards.subspace_card(read_subspace_info(path), repo_id, existing)
    config = Checkpoint(path).config  # also checks the shards are readable before anything is sent
    if existing is None:  # lrs merge writes a card: without one, this is some other checkpoint
        return cards.merged_card(config, operation=None, repo_id=repo_id)
    return cards.update_card(existing, cards.merged_metadata(config), None, str(readme))


def push(path: str | os.PathLike, repo_id: str, private: bool = False, create_pr: bool = False,
         revision: str | None = None, message: str | None = None, dry_run: bool = False,
         token: str | None = None, api: Any = None) -> PushReport:
    """Create `repo_id` if needed and upload the directory with its model card in one commit.

    `api` is an HfApi-like object (tests pass a recorder); by default HfApi(token=token), which
    falls back to HF_TOKEN and the cached login. With dry_run nothing is written or sent.
    """
    path = Path(path)
    kind = detect_kind(path)
    check_repo_id(repo_id)
    card = build_card(path, kind, repo_id)
    files = upload_files(path)
    report = PushReport(kind, repo_id, [{"path": str(f), "size": (path / f).stat().st_size} for f in files]
                        + [{"path": CARD_NAME, "size": len(card.encode())}], card, dry_run, private, create_pr,
                        revision, message or f"Upload {KINDS[kind]} with lowrank-surgery")
    if not dry_run:
        _upload(report, path, files, token, api)
    return report


def _upload(report: PushReport, path: Path, files: list[Path], token: str | None, api: Any) -> None:
    from huggingface_hub import CommitOperationAdd

    if api is None:
        api = _default_api(token)
    operations = [CommitOperationAdd(path_in_repo=f.as_posix(), path_or_fileobj=str(path / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=report.card.encode()))
    with hub_errors(report.repo_id, token):
        report.repo_url = str(api.create_repo(report.repo_id, private=report.private, exist_ok=True))
        if report.revision and not report.create_pr:
            api.create_branch(report.repo_id, branch=report.revision, exist_ok=True)
        info = api.create_commit(report.repo_id, operations, commit_message=report.message,
                                 revision=report.revision, create_pr=report.create_pr)
    report.commit_url = getattr(info, "commit_url", None)
    report.pr_url = getattr(info, "pr_url", None)


def _default_api(token: str | None) -> Any:
    from huggingface_hub import HfApi, get_token

    if token is None and get_token() is None:
        raise LrsError("not logged in to the Hugging Face Hub: set HF_TOKEN or run `hf auth login`")
    return HfApi(token=token)


HINTS = {401: "authentication failed: check HF_TOKEN or run `hf auth login`",
         403: "forbidden: the token cannot write to this repository",
         404: "not found (repository, namespace or revision)"}


@contextmanager
def hub_errors(repo_id: str, token: str | None) -> Iterator[None]:
    """Turn Hub and network errors into one-line LrsErrors with every token scrubbed."""
    from huggingface_hub.errors import HTTPError

    try:
        yield
    except (HTTPError, OSError, ValueError) as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f"{status} {HINTS[status]} ({detail})" if status in HINTS else \
            detail if not status or detail.startswith(str(status)) else f"{status} {detail}"
        raise LrsError(scrub(f"push to {repo_id} failed: {reason}", token)) from None


def scrub(text: str, token: str | None = None) -> str:
    """`text` with the token (given, from the environment or the cached login) and anything token-like masked."""
    from huggingface_hub import get_token

    secrets = {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), get_token()}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return TOKEN_PATTERN.sub("hf_***", text)
