"""Training data: JSON Lines -> token ids with a loss mask, optional packing, and the batch stream.

One example per line, in one of three shapes:
  {"text": "..."}                                   loss on every token
  {"prompt": "...", "completion": "..."}            loss on the completion only
  {"messages": [{"role": ..., "content": ...}]}     the tokenizer's chat template, loss on assistant turns only
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import LrsError

IGNORE = -100  # label of a token that is context, not target


@dataclass
class Example:
    """Token ids and, per token, whether the model is trained to predict it."""

    ids: list[int]
    trained: list[bool]

    def targets(self) -> int:
        """Tokens that carry loss (the first token is never predicted)."""
        return sum(self.trained[1:])


@dataclass
class Dataset:
    examples: list[Example]
    path: Path
    fingerprint: str
    truncated: int = 0  # examples cut at seq_len
    dropped: int = 0  # examples left with no target token

    def __len__(self) -> int:
        return len(self.examples)


def load_dataset(path: str | os.PathLike, tokenizer: Any, seq_len: int, packing: bool = False) -> Dataset:
    """Read, tokenise, truncate (or pack) a JSON Lines file."""
    path = Path(path)
    if seq_len < 2:
        raise LrsError(f"--seq-len must be at least 2, got {seq_len}")
    records = read_jsonl(path)
    if not records:
        raise LrsError(f"{path}: empty data file (expected JSON Lines with text, prompt/completion or messages)")
    encoded = [encode(record, tokenizer, f"{path}:{number}") for number, record in records]
    if packing:
        examples, truncated = pack(encoded, seq_len), 0
    else:
        truncated = sum(len(e.ids) > seq_len for e in encoded)
        examples = [Example(e.ids[:seq_len], e.trained[:seq_len]) for e in encoded]
    kept = [e for e in examples if e.targets() > 0]
    if not kept:
        raise LrsError(f"{path}: no example has a token to train on (check --seq-len and the completions)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return Dataset(kept, path, digest, truncated, len(examples) - len(kept))


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a bad line is an error naming file and line."""
    if not path.exists():
        raise LrsError(f"no such file: {path}")
    if not path.is_file():  # a directory, /dev/null, a pipe: nothing a run could be reproduced from
        raise LrsError(f"{path}: not a regular file (expected a JSON Lines file)")
    with path.open("rb") as f:
        return [(number, _parse_line(raw, f"{path}:{number}")) for number, raw in enumerate(f, 1) if raw.strip()]


def _parse_line(raw: bytes, where: str) -> dict:
    """One JSON Lines record; `where` (file:line) names it in errors."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise LrsError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise LrsError(f"{where}: malformed JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise LrsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def encode(record: dict, tokenizer: Any, where: str) -> Example:
    """Tokenise one record; `where` (file:line) names it in errors."""
    if isinstance(record.get("messages"), list):
        segments = chat_segments(record["messages"], tokenizer, where)
        return _join(tokenizer, segments, special=False, eos=False)
    if "prompt" in record and "completion" in record:
        return _join(tokenizer, [(_text(record, "prompt", where), False), (_text(record, "completion", where), True)])
    if "text" in record:
        return _join(tokenizer, [(_text(record, "text", where), True)])
    raise LrsError(f"{where}: expected a 'text', 'prompt' and 'completion', or 'messages' field")


def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise LrsError(f"{where}: '{key}' must be a string")
    return value


def _join(tokenizer: Any, segments: list[tuple[str, bool]], special: bool = True, eos: bool = True) -> Example:
    """Tokenise segments separately (so the mask is exact) and concatenate; the first gets BOS, EOS closes."""
    ids: list[int] = []
    trained: list[bool] = []
    for i, (text, train) in enumerate(segments):
        part = tokenizer(text, add_special_tokens=special and i == 0)["input_ids"]
        ids += part
        trained += [train] * len(part)
    if eos and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        trained.append(trained[-1] if trained else True)
    return Example(ids, trained)


def chat_segments(messages: list, tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant) pieces, from the template rendered turn by turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise LrsError(f"{where}: 'messages' needs a tokenizer with a chat template, and this one has none")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LrsError(f"{where}: every message needs string 'role' and 'content'")
    render = lambda msgs, prompt: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)  # noqa: E731
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True) if i else "", render(messages[: i + 1], False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise LrsError(f"{where}: the chat template does not render turns as prefixes; cannot mask assistant turns")
        segments += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    rest = render(messages, False)[len(done):]
    return [(text, train) for text, train in segments + [(rest, False)] if text]


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate all examples and cut the stream into seq_len chunks (attention spans example boundaries)."""
    ids = [t for e in examples for t in e.ids]
    trained = [m for e in examples for m in e.trained]
    return [Example(ids[i:i + seq_len], trained[i:i + seq_len]) for i in range(0, len(ids), seq_len)]


# ---------------------------------------------------------------------------- the batch stream
@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


def step_indices(n: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: the data is an endless stream of reshuffled epochs,
    so the position in the data is a function of the step alone (what makes resume exact)."""
    return [_permutation(n, seed, k // n)[k % n] for k in range(step * global_batch, (step + 1) * global_batch)]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask, and the shifted targets (IGNORE where no loss)."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        mask[row, :n] = 1
        labels = torch.tensor(e.ids[1:])
        targets[row, : n - 1] = torch.where(torch.tensor(e.trained[1:], dtype=torch.bool), labels, IGNORE)
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}
