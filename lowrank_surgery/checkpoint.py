"""Checkpoint I/O: resolve a MODEL argument, read tensors lazily shard by shard, write shards atomically.

The safetensors format is simple enough to read and write directly: an 8-byte little-endian header
length, a JSON header mapping names to dtype/shape/byte offsets, then the raw bytes. Doing it here
lets `merge` copy untouched tensors byte for byte and write output shards as it goes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import re
import shutil
import signal
import struct
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar, get_args

import torch

from .errors import LrsError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu, "C64": torch.complex64,
}
SUB_BYTE_DTYPES = {"F4", "F6_E2M3", "F6_E3M2"}  # valid safetensors, but no torch dtype holds them element by element
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
              "added_tokens.json", "chat_template.jinja", "chat_template.json")
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
MAX_HEADER = 100 * 2**20
T = TypeVar("T")
# What a Checkpoint does with a quantized checkpoint (config.json with quantization_config), whose stored values are
# not the weights: refuse to read its tensors (headers and config stay readable: inspect, push, init of a LoRA),
# refuse it at once (a command that computes with the weights), or dequantize fine-grained fp8 and refuse the rest.
Quantized = Literal["refuse_reads", "refuse", "dequantize"]


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, from the shard header alone."""

    name: str
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelSource:
    """A resolved MODEL argument: a local path, plus the Hub id and revision it came from."""

    path: Path
    id: str
    revision: str | None = None


def resolve_model(model: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Resolve a local directory, a single file or a Hub model id (through the huggingface_hub cache)."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        return ModelSource(path.resolve(), text, revision)
    if _looks_like_path(text):
        raise LrsError(f"no such file or directory: {text}")
    return _download(text, revision, allow_pickle)


def model_name(model: str | os.PathLike) -> str:
    """What a MODEL argument is called, safe as a file name: the last component of its Hub id or local path,
    without a checkpoint file's suffix ("HuggingFaceTB/SmolLM2-135M" -> "SmolLM2-135M", "dir/w.safetensors" -> "w")."""
    last = os.path.basename(os.path.abspath(os.path.expanduser(os.fspath(model))))
    stem = next((last[: -len(s)] for s in CHECKPOINT_SUFFIXES if last.endswith(s)), last)
    # Hub names' own characters only; no leading dot (hidden) or dash (read as an option by the next command)
    return re.sub(r"[^\w.-]+", "-", stem).strip(".-") or "model"


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
            or text.endswith((".safetensors", ".bin", ".json")) or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", text))


def _download(repo_id: str, revision: str | None, allow_pickle: bool) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except RepositoryNotFoundError:
        raise LrsError(f"{repo_id}: not a local path and not a model on the Hub") from None
    except LocalEntryNotFoundError:
        raise LrsError(f"{repo_id}: not a local path, and not in the Hub cache (offline or no network)") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise LrsError(f"{repo_id}: could not fetch from the Hub: {str(exc).splitlines()[0]}") from None
    return ModelSource(Path(local), repo_id, revision or _cached_commit(local))


def _cached_commit(local: str) -> str | None:
    """The commit hash of a snapshot directory in the Hub cache (its folder name)."""
    name = Path(local).name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header as the safetensors library does: tensors by name, and the metadata."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LrsError(f"corrupt safetensors file {path}: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise LrsError(f"corrupt safetensors file {path}: header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LrsError(f"corrupt safetensors file {path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise LrsError(f"corrupt safetensors file {path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LrsError(f"corrupt safetensors file {path}: __metadata__ is not a map of strings")
    base = 8 + length
    tensors = sorted((_header_entry(path, name, entry, base) for name, entry in header.items()),
                     key=lambda info: (info.start, info.end))
    _check_coverage(path, tensors, base, size)
    return {info.name: info for info in tensors}, metadata


def _header_entry(path: Path, name: str, entry: object, base: int) -> TensorInfo:
    """One tensor's header entry, checked: a known dtype, non-negative integer dims, offsets that hold its bytes."""
    def corrupt(why: str) -> LrsError:
        return LrsError(f"corrupt safetensors file {path}: tensor {name} {why}")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise corrupt("has no dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype in SUB_BYTE_DTYPES:
        raise LrsError(f"{path}: tensor {name} has dtype {dtype}, which lrs cannot read (sub-byte floats)")
    if dtype not in DTYPES:
        raise corrupt(f"has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise corrupt(f"has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise corrupt(f"has data_offsets {offsets!r}, not [start, end] with 0 <= start <= end")
    start, end = offsets
    if end - start != math.prod(shape) * DTYPES[dtype].itemsize:
        raise corrupt(f"has {end - start} bytes for shape {shape} of {dtype}")
    return TensorInfo(name, path, DTYPES[dtype], tuple(shape), base + start, base + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(path: Path, tensors: Sequence[TensorInfo], base: int, size: int) -> None:
    """The tensors (sorted by offset) must tile the data section exactly: no gap, no overlap, nothing after."""
    position = base
    for info in tensors:
        if info.start != position:
            gap = info.start - position
            why = "overlaps another tensor" if gap < 0 else f"leaves a gap of {gap} bytes"
            raise LrsError(f"corrupt safetensors file {path}: tensor {info.name} {why}")
        position = info.end
    if position > size:
        raise LrsError(f"corrupt safetensors file {path}: tensor {tensors[-1].name} lies beyond the end of the file "
                       "(truncated?)")
    if position < size:
        raise LrsError(f"corrupt safetensors file {path}: {size - position} bytes after the last tensor")


class Checkpoint:
    """A lazily read checkpoint: headers up front, tensor data one shard at a time; `quantized` says what becomes
    of a quantized one (see Quantized)."""

    def __init__(self, model: str | os.PathLike | ModelSource, revision: str | None = None, allow_pickle: bool = False,
                 quantized: Quantized = "refuse_reads"):
        if quantized not in get_args(Quantized):
            raise ValueError(f"quantized={quantized!r} is not one of {get_args(Quantized)}")
        self.source = model if isinstance(model, ModelSource) else resolve_model(model, revision, allow_pickle)
        self.path = self.source.path
        self.dir = self.path if self.path.is_dir() else self.path.parent
        self.shards = self._find_shards(allow_pickle)
        self.tensors: dict[str, TensorInfo] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        for shard in self.shards:
            if shard.suffix in PICKLE_SUFFIXES:
                self._load_pickle(shard)
            else:
                self.tensors.update(read_header(shard)[0])
        self.config: dict = self._read_json("config.json") if self.path.is_dir() else {}
        check_model_config(self.config, self.path / "config.json")
        self.quantization = quant_method(self.config)
        self._scales: dict[str, TensorInfo] = {}  # fp8 weight -> its block scales, when dequantized
        self._block: tuple[int, int] = (1, 1)  # the rows × columns each scale covers
        if quantized == "dequantize":
            self._dequantize_fp8()
        if quantized != "refuse_reads":
            self.require_unquantized()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source.id!r}, {len(self.shards)} shard(s), {len(self.tensors)} tensors)"

    def _find_shards(self, allow_pickle: bool) -> list[Path]:
        if self.path.is_file():
            if self.path.suffix == ".safetensors":
                return [self.path]
            if self.path.suffix in PICKLE_SUFFIXES:
                return [self._check_pickle(self.path, allow_pickle)]
            raise LrsError(f"{self.path}: not a .safetensors file")
        index = self.path / INDEX_NAME
        if index.is_file():
            shards = [self.path / f for f in index_shards(self._read_json(INDEX_NAME), index)]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise LrsError(f"{index} lists shard {missing[0]}, which is missing")
            return shards
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        pickles = sorted(self.path.glob("*.bin"))
        if pickles:
            return [self._check_pickle(p, allow_pickle) for p in pickles]
        raise LrsError(f"{self.path}: no weights found (expected model.safetensors or {INDEX_NAME})")

    @staticmethod
    def _check_pickle(path: Path, allow_pickle: bool) -> Path:
        if not allow_pickle:
            raise LrsError(f"{path} is a pickled checkpoint; pass --allow-pickle to load it with torch.load(weights_only=True)")
        return path

    def _load_pickle(self, shard: Path) -> None:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # torch raises many kinds for a bad or unsafe pickle
            raise LrsError(f"{shard}: cannot load with torch.load(weights_only=True): {str(exc).splitlines()[0]}") from None
        if not (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())):
            kinds = sorted({type(t).__name__ for t in state.values()} - {"Tensor"}) if isinstance(state, dict) else []
            held = f"a dict holding {', '.join(kinds)}" if kinds else f"a {type(state).__name__}"
            raise LrsError(f"{shard}: expected a flat state dict of tensor names to tensors, found {held}")
        self._pickled[shard] = state
        for name, t in state.items():
            self.tensors[name] = TensorInfo(name, shard, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())

    def _read_json(self, name: str) -> dict:
        path = self.path / name
        return read_json_object(path) if path.is_file() else {}

    @property
    def is_sharded(self) -> bool:
        return len(self.shards) > 1 or (self.dir / INDEX_NAME).is_file()

    def names(self, shard: Path | None = None) -> list[str]:
        """Tensor names, in file order, of one shard or of the whole checkpoint."""
        return [n for n, info in self.tensors.items() if shard is None or info.shard == shard]

    def get(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor into memory, straight out of the page cache (one copy); into `buffer`
        (uint8, at least the tensor's bytes) when given, which the result then shares. A quantized checkpoint's
        tensors are refused (they are not its weights), but fp8 weights it dequantizes (float32)."""
        self.require_unquantized()
        if name in self._scales:
            return dequantize_blocks(self._read(self.info(name), buffer), self._read(self._scales[name]),
                                     self._block)
        return self._read(self.info(name), buffer)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop (along dim 0, clipped to the tensor) of one tensor, reading only their bytes: the part one
        process of a sharded run keeps. A 0-dim tensor is read whole."""
        info = self.info(name)
        if not info.shape:
            return self.get(name)
        stop = min(stop, info.shape[0])
        start = min(start, stop)
        if name in self._scales or info.shard in self._pickled:  # dequantized by block, or already mapped in memory
            return self.get(name)[start:stop]
        self.require_unquantized()
        row = info.nbytes // info.shape[0] if info.shape[0] else 0  # safetensors stores rows contiguously
        rows = TensorInfo(name, info.shard, info.dtype, (stop - start, *info.shape[1:]), info.start + start * row,
                          info.start + stop * row)
        return self._read(rows)

    def _read(self, info: TensorInfo, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor as stored."""
        name = info.name
        if info.shard in self._pickled:
            return self._pickled[info.shard][name]
        data = torch.empty(info.nbytes, dtype=torch.uint8) if buffer is None else buffer[:info.nbytes]
        with open(info.shard, "rb") as f:
            f.seek(info.start)
            if info.nbytes and f.readinto(data.numpy()) != info.nbytes:  # straight into the tensor: one copy
                raise LrsError(f"corrupt safetensors file {info.shard}: tensor {name} is truncated")
        return data.view(info.dtype).reshape(info.shape)

    def require_unquantized(self) -> None:
        """Refuse a quantized checkpoint (a config.json with quantization_config): what it stores are integers or
        fp8 values with scales, not the weights that lrs computes with. The one check: at once for `quantized`
        "refuse" and "dequantize" (after dequantizing fp8), on every read for "refuse_reads"."""
        if not self.quantization:
            return
        hint = ("; lrs merge can dequantize its fp8 weights with block scales into a plain checkpoint: pass "
                "--dtype bfloat16" if fp8_block_size(self.config) else "")
        raise LrsError(f"{self.source.id} is quantized ({self.quantization}): lrs needs its unquantized weights "
                       f"and would take the stored values for them; use the unquantized checkpoint{hint}")

    def _dequantize_fp8(self) -> None:
        """Read a fine-grained fp8 checkpoint (DeepSeek-V3, Qwen3-FP8: float8_e4m3fn `*.weight` and float
        `*.weight_scale_inv`, one scale per weight_block_size block) as the unquantized checkpoint it stands for:
        `get` gives W = fp8 · scale_inv in float32, and the scales and the quantization_config are no longer seen.
        Any other checkpoint is left as it is."""
        block = fp8_block_size(self.config)
        if block is None:
            return
        scales = {name.removesuffix("_scale_inv"): self.tensors.pop(name)
                  for name in list(self.tensors) if name.endswith(".weight_scale_inv")}
        for name, info in self.tensors.items():
            if info.dtype.is_floating_point and info.dtype.itemsize == 1 and name not in scales:
                raise LrsError(f"{self.source.id}: fp8 tensor {name} has no {name}_scale_inv to dequantize it with")
        for name, scale in scales.items():
            info = self.tensors.get(name)
            expected = tuple(-(-d // b) for d, b in zip(info.shape, block)) if info and len(info.shape) == 2 else None
            if info is None or info.dtype != torch.float8_e4m3fn or scale.shape != expected:
                raise LrsError(f"{self.source.id}: {name}_scale_inv does not scale a float8_e4m3fn weight {name} "
                               f"in {list(block)} blocks")
        self._scales, self._block = scales, block
        self.config = {k: v for k, v in self.config.items() if k != "quantization_config"}
        self.quantization = None

    def get_finite(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """`get` for maths: a weight holding NaN or Inf is refused in one line naming it."""
        return check_finite(self.get(name, buffer), name, self.source.id)

    def raw(self, name: str) -> bytes | torch.Tensor:
        """The tensor's stored bytes (a tensor for pickled shards), for copying without decoding."""
        info = self.info(name)
        if info.shard in self._pickled:
            return self._pickled[info.shard][name]
        with open(info.shard, "rb") as f:
            f.seek(info.start)
            return f.read(info.nbytes)

    def same_stored(self, other: Checkpoint, name: str, block: int = 2**26) -> bool:
        """Whether `other` stores tensor `name` with the same bytes, compared a block at a time (two copies of the
        largest tensor would be 2 GB at 8B); pickled shards compare their tensors."""
        mine, theirs = self.info(name), other.info(name)
        if mine.shard in self._pickled or theirs.shard in other._pickled:
            a, b = self.raw(name), other.raw(name)
            return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        if mine.nbytes != theirs.nbytes:
            return False
        with open(mine.shard, "rb") as f, open(theirs.shard, "rb") as g:
            f.seek(mine.start)
            g.seek(theirs.start)
            for offset in range(0, mine.nbytes, block):
                size = min(block, mine.nbytes - offset)
                if f.read(size) != g.read(size):
                    return False
        return True

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise LrsError(f"tensor {name} not found in {self.source.id}") from None

    def side_files(self) -> list[Path]:
        """config, generation config and tokenizer files to copy next to derived checkpoints."""
        return [self.dir / n for n in SIDE_FILES if (self.dir / n).is_file()] if self.path.is_dir() else []

    def fingerprint(self) -> str:
        """A cheap identity: a hash of the shard headers (names, dtypes, shapes, sizes)."""
        import hashlib

        h = hashlib.sha256()
        for info in self.tensors.values():
            h.update(f"{info.name}:{info.dtype}:{info.shape}:{info.nbytes};".encode())
        return h.hexdigest()[:16]


def check_finite(tensor: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """The tensor, after refusing NaN or Inf in it: an SVD, a Gram or W ± ΔW of it would be garbage or crash.
    One reduction (aminmax propagates NaN and shows ±Inf), no temporary of the tensor's size."""
    if tensor.is_floating_point() and tensor.element_size() > 1 and tensor.numel():  # float8 has no aminmax
        low, high = torch.aminmax(tensor)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise LrsError(f"tensor {name} in {where} holds NaN or Inf values; lrs cannot compute with it")
    return tensor


# --------------------------------------------------------------------------------------------- writing


@dataclass
class PlannedTensor:
    """A tensor to be written, known before its data is (so headers can go first)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsWriter:
    """One safetensors file: the header from a plan at once, then each tensor's bytes at its planned offset,
    in any order and from any thread (positioned writes), so tensors are written as soon as they are ready."""

    def __init__(self, path: Path, plan: Sequence[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = path
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for t in plan:
            header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align data to 8 bytes, as the reference writer does
        start = 8 + len(blob)
        self._places = {t.name: (t, start + header[t.name]["data_offsets"][0]) for t in plan}
        self._unwritten = set(self._places)
        self._lock = threading.Lock()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(start + offset)

    def write(self, name: str, data: torch.Tensor | bytes) -> None:
        """Put a tensor (or its raw bytes) in its place, cast to its planned dtype (refused where that overflows)."""
        expected, offset = self._place(name)
        if isinstance(data, torch.Tensor):
            if tuple(data.shape) != expected.shape:
                raise RuntimeError(f"{name}: planned shape {list(expected.shape)}, got {list(data.shape)}")
            data = _tensor_bytes(cast(data, expected.dtype, name))
        if len(data) != expected.nbytes:
            raise RuntimeError(f"{name}: planned {expected.nbytes} bytes, got {len(data)}")
        with _open_for_update(self.path) as fd:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
        self._done(name)

    def copy(self, name: str, source: Path, start: int) -> None:
        """Put a tensor in its place straight from another file's bytes at `start` (in the kernel where it can)."""
        expected, offset = self._place(name)
        with open(source, "rb") as src, _open_for_update(self.path) as fd:
            copied = _copy_range(src.fileno(), start, fd, offset, expected.nbytes)
        if copied != expected.nbytes:
            raise LrsError(f"corrupt safetensors file {source}: tensor {name} is truncated")
        self._done(name)

    def close(self) -> None:
        if self._unwritten:
            raise RuntimeError(f"{self.path}: {len(self._unwritten)} planned tensors were never written")

    def _place(self, name: str) -> tuple[PlannedTensor, int]:
        if name not in self._places:
            raise RuntimeError(f"writer has no planned tensor {name}")
        return self._places[name]

    def _done(self, name: str) -> None:
        with self._lock:
            self._unwritten.discard(name)


def plan_of(tensors: Mapping[str, torch.Tensor]) -> list[PlannedTensor]:
    """The plan that writes these tensors as they are, in order."""
    return [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most max_shard_size bytes (a larger tensor gets its own); no
    tensors make one empty shard."""
    return split_by_size(tensors, lambda t: t.nbytes, max_shard_size) or [[]]


def split_by_size(items: Iterable[T], size: Callable[[T], int], budget: int) -> list[list[T]]:
    """Consecutive runs of the items, in order, each of at most `budget` in total size (a larger item alone)."""
    runs: list[list[T]] = []
    total = 0
    for item in items:
        if not runs or total + size(item) > budget and runs[-1]:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size(item)
    return runs


def shard_names(count: int, stem: str = "model") -> list[str]:
    """Hugging Face shard file names for `count` shards."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class ShardedWriter:
    """A checkpoint's safetensors shards in `directory`, every header written at once from the plan; then each
    tensor goes to its place in any order and from any thread (memory: the tensors in flight), and `close` adds
    model.safetensors.index.json. Shard files are named `names` (default: Hugging Face's); the index is written when
    there are several shards, or always with `always_index` (a merge keeps its sharded base's index)."""

    def __init__(self, directory: Path, shards: Sequence[Sequence[PlannedTensor]], names: Sequence[str] | None = None,
                 always_index: bool = False):
        self.directory = directory
        self.shards = shards
        self.names = list(names) if names is not None else shard_names(len(shards))
        self._indexed = always_index or len(shards) > 1
        self._files = [SafetensorsWriter(directory / name, shard) for name, shard in zip(self.names, shards)]
        self._file_of = {t.name: file for file, shard in zip(self._files, shards) for t in shard}

    @property
    def planned(self) -> list[PlannedTensor]:
        """Every planned tensor, shard after shard."""
        return [t for shard in self.shards for t in shard]

    def write(self, name: str, data: torch.Tensor | bytes) -> None:
        """`SafetensorsWriter.write` in the tensor's shard: cast to its planned dtype, refused where that overflows."""
        self._file(name).write(name, data)

    def copy(self, name: str, source: Path, start: int) -> None:
        """`SafetensorsWriter.copy` in the tensor's shard: its bytes straight from another file."""
        self._file(name).copy(name, source, start)

    def close(self) -> None:
        """Check every planned tensor was written, then write the index."""
        for file in self._files:
            file.close()
        if self._indexed:
            weight_map = {t.name: name for name, shard in zip(self.names, self.shards) for t in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for t in self.planned)}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _file(self, name: str) -> SafetensorsWriter:
        if name not in self._file_of:
            raise RuntimeError(f"writer has no planned tensor {name}")
        return self._file_of[name]


def write_sharded(directory: Path, plan: Sequence[PlannedTensor], tensor: Callable[[PlannedTensor], torch.Tensor],
                  max_shard_size: str | int, always_index: bool = False) -> list[str]:
    """Write the planned tensors in order as shards of at most max_shard_size bytes (`ShardedWriter`), asking
    `tensor` for each one in turn, so that only one is in memory; returns the shard file names."""
    writer = ShardedWriter(directory, plan_shards(plan, parse_size(max_shard_size)), always_index=always_index)
    for t in writer.planned:
        writer.write(t.name, tensor(t))
    writer.close()
    return writer.names


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a small dict of tensors to one safetensors file."""
    writer = SafetensorsWriter(path, plan_of(tensors), metadata)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()


@contextlib.contextmanager
def _open_for_update(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_WRONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _copy_range(src: int, start: int, dst: int, offset: int, nbytes: int) -> int:
    """Copy nbytes from src at start to dst at offset; the bytes copied (fewer when src ends early)."""
    done = 0
    while done < nbytes:
        try:
            step = os.copy_file_range(src, dst, nbytes - done, start + done, offset + done)
        except (AttributeError, OSError):  # no copy_file_range here (other OS, filesystem pairs): copy in user space
            step = _copy_chunk(src, start + done, dst, offset + done, min(nbytes - done, 64 << 20))
        if step == 0:
            break
        done += step
    return done


def _copy_chunk(src: int, start: int, dst: int, offset: int, nbytes: int) -> int:
    data = os.pread(src, nbytes, start)
    view = memoryview(data)
    while view:
        view = view[os.pwrite(dst, view, offset + len(data) - len(view)):]
    return len(data)


def cast(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """t in `dtype`; LrsError naming the tensor when a finite value would become infinite (float16's range is small)."""
    if t.dtype == dtype:
        return t
    converted = t.to(dtype)
    if converted.is_floating_point() and converted.numel() and not math.isfinite(peak(converted)):
        overflow = torch.isinf(converted) & torch.isfinite(t)  # located only when the one reduction saw an Inf
        if bool(overflow.any()):
            raise LrsError(f"tensor {name} holds {float(t[overflow].abs().max()):.4g}, beyond the range of "
                           f"{str(dtype).removeprefix('torch.')} (largest {torch.finfo(dtype).max:.4g}): "
                           "choose a wider dtype; nothing was written")
    return converted


def peak(t: torch.Tensor) -> float:
    """max |t| from one reduction, NaN if t holds a NaN (float8, which has no aminmax, is widened first)."""
    lo, hi = torch.aminmax(t if t.element_size() > 1 else t.float())
    return float("nan") if lo.isnan() or hi.isnan() else max(-float(lo), float(hi))


def _tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise LrsError(f"not a size: {text!r} (expected e.g. 5GB or 500MB)")
    number, unit, binary = m.groups()
    power = "KMGT".find(unit.upper()) + 1 if unit else 0
    size = int(float(number) * (1024 if binary else 1000) ** power)
    if size < 1:
        raise LrsError(f"size {text!r} is less than one byte (expected e.g. 5GB or 500MB)")
    return size


def index_shards(index: dict, where: Path) -> list[str]:
    """The shard files a model.safetensors.index.json names, validated: one place for every index check."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LrsError(f"{where}: no weight_map")
    bad = next((name for name, file in weight_map.items() if not (isinstance(file, str) and file)), None)
    if bad is not None:
        raise LrsError(f"{where}: weight_map gives {json.dumps(weight_map[bad])} for {bad}, not a shard file name")
    files = sorted(set(weight_map.values()))
    by_name: dict[str, str] = {}
    for file in files:
        other = by_name.setdefault(Path(file).name, file)
        if other != file:  # outputs keep the shard names, so two would collide
            raise LrsError(f"{where}: shards {other} and {file} have the same file name")
    return files


def check_model_config(config: dict, where: Path) -> None:
    """Refuse a config.json whose fields lrs reads have the wrong type."""
    names = config.get("architectures")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise LrsError(f"{where}: architectures must be a list of class names, got {json.dumps(names)}")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; LrsError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LrsError(f"{path}: not valid JSON") from None
    if not isinstance(data, dict):
        raise LrsError(f"{path}: not a JSON object")
    return data


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of one (small) safetensors file, validating its header first."""
    ckpt = Checkpoint(ModelSource(path, str(path)))
    return {name: ckpt.get(name) for name in ckpt.names()}


def quant_method(config: dict) -> str | None:
    """How a checkpoint is quantized, from config.json's quantization_config (None when it is not)."""
    quantization = config.get("quantization_config")
    if not quantization:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    return str(method or "unknown method")


def fp8_block_size(config: dict) -> tuple[int, int] | None:
    """The (rows, columns) of a fine-grained fp8 checkpoint's scale blocks; None for any other quantization."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
        return None
    block = quantization.get("weight_block_size")
    dynamic = quantization.get("activation_scheme", "dynamic") == "dynamic"  # static ones carry activation scales
    if dynamic and isinstance(block, list) and len(block) == 2 and all(_is_count(b) and b > 0 for b in block):
        return block[0], block[1]
    return None


def dequantize_blocks(fp8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """W = fp8 · scale, each scale covering a block of rows × columns (the last ones cut at the edges), in float32.
    Each part of whole or cut blocks is viewed as (row blocks, rows, column blocks, columns) and scaled in place by
    its scales broadcast over the block, so no scale tensor of W's size is built."""
    weight, scale = fp8.to(torch.float32, copy=True), scale.float()
    for rows, scale_rows, row_block in _block_spans(weight.shape[0], block[0]):
        for cols, scale_cols, col_block in _block_spans(weight.shape[1], block[1]):
            blocks = weight[rows, cols].unflatten(1, (-1, col_block)).unflatten(0, (-1, row_block))
            blocks.mul_(scale[scale_rows, scale_cols][:, None, :, None])
    return weight


def _block_spans(size: int, block: int) -> list[tuple[slice, slice, int]]:
    """Along one dimension: the whole blocks, then the last block cut at the edge (if any), each as the span of
    the weight, the span of the scales and the block length."""
    whole = size // block * block
    spans = [(slice(0, whole), slice(0, whole // block), block)] if whole else []
    if whole < size:
        spans.append((slice(whole, size), slice(whole // block, whole // block + 1), size - whole))
    return spans



# --------------------------------------------------------------------------------------------- atomic output
# A run holds an exclusive claim on OUT (`.OUT.lrs-claim` next to it: locked, holding the pid) while it writes the
# temporary sibling `.OUT.lrs-tmp-<pid>-<hex>` and swaps it in (the previous OUT is `.OUT.lrs-old-<pid>-<hex>` for
# that instant). The lock dies with its process, so the next run on OUT can tell what a killed run left and clean it.
CLAIM_SUFFIX = ".lrs-claim"
LEFTOVER = re.compile(r"\.(?P<out>.+)\.lrs-(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")
INTERRUPTS = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1",
                                                     "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF", "SIGXCPU")
                   if hasattr(signal, name))
_claimed: set[Path] = set()  # the OUTs this process holds (claims are reentrant: train holds OUT across checkpoints)
_held_back: list[int] | None = None  # signals that arrived while OUT was being swapped or cleaned up


def check_output(out: Path, force: bool, inputs: Iterable[object] = (),
                 replaces: Collection[str] | None = None) -> None:
    """Refuse, before any work is done: an OUT that cannot be replaced, an existing OUT unless --force, and an OUT
    whose replacement would delete one of the command's local `inputs` (every file they read, through symlinks).
    `replaces`: the names inside OUT the output stands for (None: all of OUT)."""
    out = Path(out)
    target = _output_path(out)
    replaced = [target] if replaces is None else [target / name for name in replaces]
    for source in inputs:
        for file in _input_files(source):
            if any(file == r or r in file.parents for r in replaced):
                via = "" if file == Path(source).resolve() else f" ({file})"
                raise LrsError(f"{out} would replace the input {source}{via}; keep inputs outside the output")
    if os.path.lexists(out) and not force:
        raise LrsError(f"{out} already exists; pass --force to overwrite it")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise LrsError(f"cannot write {out}: {parent} is not a directory")


def _output_path(out: Path) -> Path:
    """OUT resolved through symlinks (the output replaces what a link points to; the link stays)."""
    if out.is_symlink() and not out.exists():
        raise LrsError(f"{out} is a symlink to {os.readlink(out)}, which does not exist; "
                       "remove the link or create its target")
    target = out.resolve()
    if target == Path.cwd() or target in Path.cwd().parents:
        raise LrsError(f"{out} holds the current directory, which cannot be replaced; write the output elsewhere")
    return target


def _input_files(source: object) -> list[Path]:
    """A local input resolved through symlinks, with the files a directory input holds or its index lists."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).exists():  # a Hub id or an in-memory object
        return []
    path = Path(source)
    if not path.is_dir():
        return [path.resolve()]
    listed = _index_entries(path / INDEX_NAME)
    return [path.resolve()] + [p.resolve() for p in [*path.iterdir(), *listed] if p.is_file()]


def _index_entries(index: Path) -> list[Path]:
    """The shard files an index names (none when there is no readable index: the reader reports a broken one)."""
    try:
        return [index.parent / file for file in index_shards(read_json_object(index), index)]
    except (OSError, LrsError):
        return []


@contextlib.contextmanager
def claim_output(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Hold OUT for this process alone and yield its resolved path: refuse an OUT another run is writing, clean
    what a killed run left there, then check OUT (exists and no --force). Meanwhile a signal that would kill the
    process raises KeyboardInterrupt instead, and a failure removes the parent directories the claim created."""
    out = Path(out)
    check_output(out, force)
    target = _output_path(out)
    if target in _claimed:
        yield target
        return
    with interrupts_raised():
        created = [p for p in target.parents if not p.exists()]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _lock(target):
                _claimed.add(target)
                try:
                    _clean_leftovers(target)
                    check_output(out, force)  # again: a run may have completed OUT meanwhile, or a leftover restored it
                    yield target
                finally:
                    _claimed.discard(target)
        except BaseException:
            with _signals_held_back():
                _remove_empty(created)
            raise


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, force: bool = False,
                  replaces: Collection[str] | None = None, file: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of OUT, under a claim on OUT; swap it into place only if the body completes.
    The sibling is a new directory, or with `file` the path of the one file the body writes.
    `replaces`: the names inside OUT the output stands for; what else OUT holds is kept (None: OUT goes whole)."""
    with claim_output(out, force) as target:
        tmp = _sibling(target, "tmp")
        try:
            if not file:
                tmp.mkdir()
            yield tmp
            if replaces is not None and target.is_dir():
                _keep_others(target, tmp, replaces)
            _swap_in(tmp, target)
        except BaseException as exc:
            with _signals_held_back():
                _remove(tmp)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise LrsError(f"no space left on device while writing {out} (nothing was written)") from None
            raise


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.lrs-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _keep_others(out: Path, tmp: Path, replaces: Collection[str]) -> None:
    """Put what OUT holds beyond the output's own names into tmp: hard links (no copy), else copies."""
    for entry in out.iterdir():
        if entry.name in replaces or os.path.lexists(tmp / entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, tmp / entry.name)


def _link_or_copy(source: str | os.PathLike, dest: str | os.PathLike) -> None:
    try:
        os.link(source, dest, follow_symlinks=False)
    except OSError:  # a filesystem without hard links
        shutil.copy2(source, dest, follow_symlinks=False)


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename tmp to OUT (the previous OUT removed after), with signals held back until both renames are done."""
    with _signals_held_back() as held:
        try:
            if os.path.lexists(out):
                old = _sibling(out, "old")
                out.rename(old)
                _rename_or_restore(tmp, out, old)
                _remove(old)
            else:
                tmp.rename(out)
        except OSError as exc:
            raise LrsError(f"cannot put {out} in place: {exc.strerror or exc} (nothing was written)") from None
    if held:
        raise KeyboardInterrupt(f"interrupted; {out} was written just before")


def _rename_or_restore(tmp: Path, out: Path, old: Path) -> None:
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_empty(directories: Sequence[Path]) -> None:
    """Remove the directories (deepest first) a failed run created, as long as nothing else was put in them."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """The exclusive claim on OUT: `.OUT.lrs-claim`, locked with flock and holding this process's pid."""
    path = out.parent / f".{out.name}{CLAIM_SUFFIX}"
    fd = _locked(path, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with _signals_held_back():
            path.unlink(missing_ok=True)
            os.close(fd)


def _locked(path: Path, out: Path) -> int:
    """Open and lock the claim file; again when its last holder removed the file just before we locked it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LrsError(f"{out} is being written by another lrs run (pid {holder}); "
                           "wait for it or write elsewhere") from None
        except OSError as error:  # no locks on this filesystem (some NFS and FUSE mounts)
            os.close(fd)
            raise LrsError(f"cannot lock {path} to claim {out} ({error.strerror}): write the output on a "
                           "filesystem with file locks") from None
        if _same_file(fd, path):
            return fd
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _clean_leftovers(out: Path) -> None:
    """Remove what killed runs on OUT left; put back an OUT one was killed while swapping out. Called with the
    claim on OUT held, so what another pid left is stale even where that pid now names a live process."""
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.lrs-*")):
        match = LEFTOVER.fullmatch(path.name)
        if match is None or match["out"] != out.name or int(match["pid"]) == os.getpid():
            continue
        if match["kind"] == "old" and not os.path.lexists(out):
            path.rename(out)
        else:
            _remove(path)


@contextlib.contextmanager
def interrupts_raised() -> Iterator[None]:
    """Turn every signal that would end the process uncleanly (hang-up, quit, terminate, user, alarm...) into
    KeyboardInterrupt, so the run removes its temporary output; signals the program handles itself are left alone."""
    try:
        changed = {s: h for s in INTERRUPTS
                   if (h := signal.getsignal(s)) in (signal.SIG_DFL, signal.default_int_handler)}
        for s in changed:
            signal.signal(s, _on_signal)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in changed.items():
            signal.signal(s, handler)


def _on_signal(signum: int, frame: object) -> None:
    if _held_back is not None:
        _held_back.append(signum)
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_held_back() -> Iterator[list[int]]:
    """Record signals instead of raising them, so a swap or a clean-up is never cut in half; yields the record."""
    global _held_back
    if _held_back is not None:
        yield _held_back
        return
    _held_back = []
    try:
        yield _held_back
    finally:
        _held_back = None
