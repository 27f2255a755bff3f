"""`lrs merge` / `lrs unmerge`: fold an adapter into a base checkpoint (or take it out), streaming.

The output shards are planned up front (headers first, every tensor's offset known), then a few worker
threads each read one base tensor, compute and write it in place: peak memory is one tensor per worker
(a few float32 copies of the largest targeted weight), never the model. Untouched tensors are copied
file to file by the kernel (copy_file_range) without entering Python. Every method goes through
`Method.merge` / `Method.unmerge`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, load_adapter
from .architecture import untied_copies
from .checkpoint import (
    Checkpoint, PlannedTensor, ShardedWriter, atomic_output, check_finite, check_output, parse_size, peak, plan_shards,
    shard_names,
)
from .device import resolve_device
from .errors import LrsError
from .methods.base import Method, Params
from .progress import progress
from .targets import Target, find_targets, is_output_layer, load_weight

WORKERS = min(4, os.cpu_count() or 1)  # tensors produced concurrently (each with one torch thread on the CPU)
DTYPE_CHOICES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


@dataclass(frozen=True)
class Job:
    """One targeted tensor: where its W comes from, where the result goes, and the adapter's parameters."""

    target: Target
    source: str  # tensor read from the base
    output: str  # tensor written (differs from source only for an untied output layer)
    params: Params


@dataclass
class MergeReport:
    """What a merge or unmerge did; `error_bound` (unmerge) is how far the result can be from the original base."""

    operation: str
    adapter: str
    method: str
    base: str
    base_revision: str | None
    out: str
    dtype: str
    modules: int
    tensors: int
    shards: list[str]
    bytes: int
    seconds: float = 0.0
    untied: list[str] = field(default_factory=list)
    error_bound: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ public API


def merge(adapter: str | os.PathLike | Adapter, base: str | os.PathLike | Checkpoint, out: str | os.PathLike,
          dtype: str = "auto", max_shard_size: str | int | None = None, device: str = "auto", force: bool = False,
          revision: str | None = None, allow_pickle: bool = False, cola_strategy: str | None = None) -> MergeReport:
    """Write base + ΔW (every module the adapter targets) as a full checkpoint in `out`."""
    return _run("merge", adapter, base, out, dtype, max_shard_size, device, force, revision, allow_pickle,
                cola_strategy)


def unmerge(adapter: str | os.PathLike | Adapter, merged: str | os.PathLike | Checkpoint, out: str | os.PathLike,
            dtype: str = "auto", max_shard_size: str | int | None = None, device: str = "auto", force: bool = False,
            revision: str | None = None, allow_pickle: bool = False, cola_strategy: str | None = None) -> MergeReport:
    """Write the base that `merge` turned into `merged` (exact in float32; see the report's error_bound otherwise)."""
    return _run("unmerge", adapter, merged, out, dtype, max_shard_size, device, force, revision, allow_pickle,
                cola_strategy)


def _run(operation: str, adapter: str | os.PathLike | Adapter, base: str | os.PathLike | Checkpoint,
         out: str | os.PathLike, dtype: str, max_shard_size: str | int | None, device: str, force: bool,
         revision: str | None, allow_pickle: bool, cola_strategy: str | None) -> MergeReport:
    start = time.perf_counter()
    out = Path(out)
    check_output(out, force, inputs=(adapter, base))
    out_dtype = _parse_dtype(dtype)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    dev = resolve_device(device)
    source = "(in memory)" if isinstance(adapter, Adapter) else os.fspath(adapter)
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter, cola_strategy)
    # merge --dtype reads fp8 weights with block scales as float32 and writes them plain in that dtype; any other
    # quantized base is refused, and fp8 without a --dtype to dequantize into
    quantized = "dequantize" if operation == "merge" and out_dtype is not None else "refuse"
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base, revision, allow_pickle, quantized=quantized)
    method = adapter.method
    jobs = plan_jobs(ckpt, adapter, method, from_base=operation == "merge")
    whole = whole_tensors(ckpt, adapter, jobs, operation)
    untied = [j.output for j in jobs.values() if j.target.output] if _unties(ckpt, jobs) else []
    copies = untied_copies(ckpt.config, ckpt.tensors.keys() | jobs.keys()) if untied else {}
    shards, names = plan_output(ckpt, jobs, out_dtype, limit, copies)
    report = MergeReport(
        operation, source, method.name, ckpt.source.id, ckpt.source.revision, str(out),
        dtype if out_dtype is not None else "auto", len(jobs), sum(len(s) for s in shards), names,
        sum(t.nbytes for s in shards for t in s), untied=untied)
    apply = method.merge if operation == "merge" else method.unmerge
    bound = ErrorBound(method) if operation == "unmerge" else None
    with atomic_output(out, force) as tmp, _cpu_threads(dev):
        _write_shards(ckpt, ShardedWriter(tmp, shards, names, always_index=ckpt.is_sharded), jobs, copies | whole,
                      apply, dev, bound)
        _write_side_files(ckpt, tmp, adapter, report, out_dtype)
    report.error_bound = bound.worst if bound else None
    report.seconds = round(time.perf_counter() - start, 3)
    return report


# ------------------------------------------------------------------------------------------------ planning


def plan_jobs(ckpt: Checkpoint, adapter: Adapter, method: Method, from_base: bool = True) -> dict[str, Job]:
    """Every adapter module matched to its base tensor and checked to fit, before anything is written.

    Parameters an imported adapter lacks (`Method.completable`) are recomputed from the base when `ckpt`
    is the base (`from_base`); a merged checkpoint cannot give them back, so unmerge refuses instead.
    """
    linear = find_targets(ckpt, adapter.weights, adapter.config.fan_in_fan_out)
    jobs = {path: _job(ckpt, linear, path, params) for path, params in adapter.weights.items()}
    missing = sorted({f"{path}.{n}" for path, params in adapter.weights.items()
                      for n in set(method.param_names) - set(params)})
    if missing and not from_base:
        raise LrsError(f"adapter lacks {missing[0]}, which is recomputed from the original base: "
                       "unmerge needs an adapter that holds all its parameters")
    method.complete(adapter.weights, lambda path: load_weight(ckpt, jobs[path].target))
    for job in jobs.values():
        method.validate(job.target)
        method.check_fits(job.target, job.params)
    return {job.output: job for job in jobs.values()}


def whole_tensors(ckpt: Checkpoint, adapter: Adapter, jobs: dict[str, Job], operation: str) -> dict[str, torch.Tensor]:
    """The tensors the adapter holds whole (PEFT modules_to_save), which replace the base's, checked to fit."""
    if adapter.saved and operation == "unmerge":
        raise LrsError(f"the adapter holds whole modules ({', '.join(adapter.config.modules_to_save)}) that replace "
                       "the base's: unmerge cannot recover the values they replaced")
    for name, tensor in adapter.saved.items():
        info = ckpt.tensors.get(name)
        if name in jobs or info is None or info.shape != tuple(tensor.shape):
            found = "a tensor the adapter also changes by ΔW" if name in jobs else \
                "absent" if info is None else f"of shape {list(info.shape)}"
            raise LrsError(f"adapter does not fit the base: it holds {name} whole, {list(tensor.shape)}, but in "
                           f"{ckpt.source.id} that is {found}")
    return adapter.saved


def _job(ckpt: Checkpoint, linear: dict[str, Target], path: str, params: Params) -> Job:
    if path in linear:
        return Job(linear[path], linear[path].source, linear[path].weight, params)
    name = f"{path}.weight"
    if name in ckpt.tensors:
        raise LrsError(f"adapter targets {path}, which is not a linear layer in {ckpt.source.id} "
                       f"(tensor {name} has shape {list(ckpt.tensors[name].shape)})")
    embedding = _tied_embedding(ckpt) if is_output_layer(path) else None
    if embedding is None:
        raise LrsError(f"adapter does not fit the base: it has module {path}, which {ckpt.source.id} lacks "
                       f"(no tensor {name})")
    out_f, in_f = ckpt.tensors[embedding].shape
    return Job(Target(path, out_f, in_f, tied_to=embedding, output=True), embedding, name, params)


def _tied_embedding(ckpt: Checkpoint) -> str | None:
    """The input embedding that a tied output layer (absent from the checkpoint) shares, guessed from names
    (for checkpoints whose architecture transformers cannot build)."""
    vocab = ckpt.config.get("vocab_size")
    for name, info in ckpt.tensors.items():
        last = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if name.endswith(".weight") and len(info.shape) == 2 and info.shape[0] == vocab and (
                "embed" in last or last in {"wte", "word_embeddings"}):
            return name
    return None


def _unties(ckpt: Checkpoint, jobs: dict[str, Job]) -> bool:
    """True when the adapter changes an output layer the config ties to the input embedding (or that shares it)."""
    touched = [j for j in jobs.values() if j.target.output]
    return bool(touched) and (bool(ckpt.config.get("tie_word_embeddings")) or any(j.source != j.output for j in touched))


def plan_output(ckpt: Checkpoint, jobs: dict[str, Job], out_dtype: torch.dtype | None, limit: int | None,
                copies: dict[str, str] | None = None) -> tuple[list[list[PlannedTensor]], list[str]]:
    """Output shards (the base's boundaries and file names, unless resharding to `limit` bytes) and their names.

    Tensors the base does not hold (an untied output layer, and the `copies` untying needs) go in the last shard."""
    def planned(name: str, source: str) -> PlannedTensor:
        info = ckpt.tensors[source]
        return PlannedTensor(name, _cast_dtype(info.dtype, out_dtype), info.shape)

    shards = [[planned(n, n) for n in ckpt.names(shard)] for shard in ckpt.shards]
    shards[-1] += [planned(j.output, j.source) for j in jobs.values() if j.output not in ckpt.tensors]
    shards[-1] += [planned(name, source) for name, source in (copies or {}).items()]
    if limit is not None:
        shards = plan_shards([t for s in shards for t in s], limit)
    elif ckpt.path.is_dir() and all(s.suffix == ".safetensors" for s in ckpt.shards):
        return shards, [s.name for s in ckpt.shards]
    return shards, shard_names(len(shards))


def _cast_dtype(dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    """--dtype applies to floating-point tensors only (integer buffers keep theirs)."""
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


def _parse_dtype(dtype: str) -> torch.dtype | None:
    if dtype not in DTYPE_CHOICES:
        raise LrsError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return DTYPE_CHOICES[dtype]


@contextlib.contextmanager
def _cpu_threads(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU: the work is memory-bound, and on a busy machine the thread pool's
    spin-waiting made merges up to 10x slower than a single thread."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------ writing


Apply = Callable[..., torch.Tensor]  # Method.merge or Method.unmerge: (W, params, path, out=buffer) -> W'


def _write_shards(ckpt: Checkpoint, writer: ShardedWriter, jobs: dict[str, Job], copies: dict[str, str | torch.Tensor],
                  apply: Apply, device: torch.device, bound: ErrorBound | None) -> None:
    """Every output tensor is produced and written in place by a few worker threads (reads, torch ops and
    positioned writes release the GIL), so only one tensor per worker is ever in memory. `copies` gives an
    output tensor's source other than the base tensor of its name: another base tensor (one the base lacks),
    or the adapter's whole tensor that replaces it (modules_to_save)."""
    failed = threading.Event()  # the first error stops the workers from starting further tensors

    def produce(t: PlannedTensor, source: str | torch.Tensor) -> None:
        if failed.is_set():
            return
        try:
            _produce(writer, ckpt, t, source, jobs.get(t.name), apply, device, bound)
        except BaseException:
            failed.set()
            raise

    pool = ThreadPoolExecutor(WORKERS)
    try:
        futures = [pool.submit(produce, t, copies.get(t.name, t.name)) for t in writer.planned]
        label = "merge" if bound is None else "unmerge"
        for future in progress(as_completed(futures), label, total=len(futures), unit="tensor"):
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    writer.close()


def _produce(writer: ShardedWriter, ckpt: Checkpoint, t: PlannedTensor, source: str | torch.Tensor,
             job: Job | None, apply: Apply, device: torch.device, bound: ErrorBound | None) -> None:
    """Write one output tensor: computed, an adapter's whole tensor, or base tensor `source` cast or copied."""
    if job is not None:
        writer.write(t.name, _apply(ckpt, job, apply, t.dtype, device, bound))
        return
    if isinstance(source, torch.Tensor):
        writer.write(t.name, source)  # the writer casts, refusing values out of the new dtype's range
        return
    info = ckpt.info(source)
    if t.dtype != info.dtype:
        writer.write(t.name, ckpt.get(source))  # the writer casts, refusing values out of the new dtype's range
    elif info.shard.suffix == ".safetensors":
        writer.copy(t.name, info.shard, info.start)
    else:
        writer.write(t.name, ckpt.raw(source))


_SCRATCH = threading.local()


def _scratch(key: str, nbytes: int) -> torch.Tensor:
    """A per-thread byte buffer reused from tensor to tensor: fresh memory for each would cost a page fault
    per 4 KB, which was most of a merge's system time."""
    buf = getattr(_SCRATCH, key, None)
    if buf is None or buf.numel() < nbytes:
        setattr(_SCRATCH, key, None)  # free the old one before allocating the larger one
        buf = torch.empty(nbytes, dtype=torch.uint8)
        setattr(_SCRATCH, key, buf)
    return buf[:nbytes]


def _apply(ckpt: Checkpoint, job: Job, apply: Apply, dtype: torch.dtype, device: torch.device,
           bound: ErrorBound | None) -> torch.Tensor:
    """W (Linear layout, float32, on `device`) through the method, rounded once to the output dtype."""
    stored = ckpt.get(job.source, buffer=_scratch("in", ckpt.info(job.source).nbytes)).to(device)
    weight = _float32(stored)
    weight = weight.T if job.target.conv1d else weight
    params = {n: p.to(device) for n, p in job.params.items()}
    # merge works in place on this thread's float32 copy of W; unmerge keeps it for the error bound
    out = weight if bound is None else _buffer("result", weight.shape, torch.float32, device)
    result = apply(weight, params, job.target.path, out=out)
    largest = peak(result)
    if not largest <= torch.finfo(dtype).max:  # NaN fails this too
        check_finite(stored, job.source, ckpt.source.id)  # a non-finite base weight is named as such
        raise LrsError(f"{'merging' if bound is None else 'unmerging'} the adapter gives NaN or Inf in "
                       f"{job.output} (module {job.target.path}, {str(dtype).removeprefix('torch.')}); nothing was written")
    if bound is not None:
        bound.add(job, weight, stored.dtype, largest, dtype, params)
    result = result.T if job.target.conv1d else result
    # this thread's buffer, valid until its next tensor: the caller writes it out first
    return _buffer("rounded", result.shape, dtype, device).copy_(result).cpu()


def _float32(t: torch.Tensor) -> torch.Tensor:
    """t as float32 in this thread's reusable buffer."""
    return _buffer("f32", t.shape, torch.float32, t.device).copy_(t)


def _buffer(key: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor in this thread's reusable buffer `key` (CPU), or a fresh one on an accelerator."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return _scratch(key, math.prod(shape) * dtype.itemsize).view(dtype).view(shape)


class ErrorBound:
    """How far an unmerged tensor can be from the original base, entrywise: the largest bound over touched tensors
    (`absolute`, and the tensor it is in), and the largest relative to its tensor's largest entry (`relative`).

    The merged input was rounded (at most half an ulp of each of its entries) and the result is rounded once more
    (at most half an ulp of its largest entry). The method's `unmerge_error` carries the input rounding through
    unmerge: unchanged for W' − ΔW, amplified by (I + D_b)⁻¹ for FOSSIL bat.
    """

    def __init__(self, method: Method):
        self.method = method
        self.worst: dict[str, Any] = {"absolute": 0.0, "relative": 0.0, "tensor": None, "merged_dtype": None}
        self._lock = threading.Lock()  # tensors are unmerged by several worker threads

    def add(self, job: Job, merged: torch.Tensor, merged_dtype: torch.dtype, largest: float, dtype: torch.dtype,
            params: Params) -> None:
        carried = half_ulp(peak(merged), merged_dtype)  # W' − ΔW moves no entry further than its largest half ulp
        if self.method.needs_base_weight:
            merged = merged.double()
            half_ulps = torch.ldexp(torch.full_like(merged, torch.finfo(merged_dtype).eps / 2),
                                    torch.frexp(merged)[1] - 1)
            carried = float(self.method.unmerge_error(half_ulps, params).max())
        absolute = carried + half_ulp(largest, dtype)
        relative = absolute / max(largest, torch.finfo(torch.float32).tiny)
        with self._lock:
            if absolute > self.worst["absolute"]:
                self.worst.update(absolute=absolute, tensor=job.output,
                                  merged_dtype=str(merged_dtype).removeprefix("torch."))
            self.worst["relative"] = max(self.worst["relative"], relative)


def half_ulp(x: float, dtype: torch.dtype) -> float:
    """Half a unit in the last place of x in `dtype`: the most that rounding to `dtype` moves a value near x."""
    info = torch.finfo(dtype)
    _, exponent = math.frexp(x)
    return max(math.ldexp(info.eps, exponent - 1), info.smallest_normal * info.eps) / 2


# ------------------------------------------------------------------------------------------------ side files


def _write_side_files(ckpt: Checkpoint, tmp: Path, adapter: Adapter, report: MergeReport,
                      out_dtype: torch.dtype | None) -> None:
    """config (untied / retyped when needed), generation config and tokenizer files, and the model card."""
    from .cards import merged_card

    for path in ckpt.side_files():
        if path.name != "config.json":
            shutil.copy2(path, tmp / path.name)
    config = dict(ckpt.config)
    if report.untied:
        config["tie_word_embeddings"] = False
    if out_dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = report.dtype
    if config:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    card = merged_card(config, base_model=ckpt.source.id, adapter=adapter, adapter_source=report.adapter,
                       base_revision=ckpt.source.revision, operation=report.operation, dtype=report.dtype)
    (tmp / "README.md").write_text(card)

