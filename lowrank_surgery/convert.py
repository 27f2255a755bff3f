"""`lrs convert`: adapters between PEFT LoRA, PEFT MiSS, CoLA, kohya and mlx-lm, and to llama.cpp's GGUF, through ΔW.

Every method reaches plain LoRA through the `Method` interface alone: `pair` gives (B, A) with
ΔW = s·B·A (exact; s is recovered from `delta`, so methods that do not scale by α/r need nothing
special), and a method without a pair (ΔW depends on W) is exported by a truncated SVD of `delta`
at --rank, which is lossy and reported. The plain-LoRA result is then written as:

- peft-lora: PEFT `LORA` directory; per-module `rank_pattern`/`alpha_pattern` (keys = module paths)
  so that PEFT's α/r reproduces each module's scale exactly. (llama.cpp's convert_lora_to_gguf.py reads
  only the global `lora_alpha` and takes r from each tensor's shape: rank_pattern is fine there,
  alpha_pattern is not.)
- kohya: OUT/adapter_model.safetensors with `<prefix><path with . -> _>.lora_down.weight` (r × in),
  `.lora_up.weight` (out × r) and `.alpha` (0-d), ΔW = (alpha/r)·up·down, as kohya-ss sd-scripts'
  networks/lora.py writes (alpha 0 or absent means alpha = r; it may be saved as fp16/bf16/int64).
  kohya's prefixes name diffusion parts (`lora_unet_`, `lora_te_`, `lora_te1_`, ...) and no LLM tool
  defines one, so lrs writes the text-encoder prefix `lora_te_` (an LLM is a text model) and reads any
  prefix. The header metadata carries kohya's `ss_network_*` fields and `lrs_modules` (kohya name ->
  module path), so that lrs reads its own files back without the base.
- mlx: OUT/adapters.safetensors with `<path>.lora_a` (in × r) and `.lora_b` (r × out), and an
  adapter_config.json with fine_tune_type, num_layers, lora_parameters {rank, scale, dropout, keys},
  as mlx-lm's tuner reads them: LoRALinear computes y += scale·(x·lora_a)·lora_b with `scale` a plain
  multiplier (mlx-lm's default 20.0), not α/r; linear_to_lora_layers wraps `keys` (paths relative to a
  layer) in the last `num_layers` layers (-1: all). mlx-lm has one rank and one scale per adapter:
  smaller ranks are zero-padded and other scales folded into lora_b (exact). Paths are the checkpoint's,
  which are mlx-lm's for Llama-style models (model.layers.N...); architectures that mlx-lm renames
  (e.g. GPT-2's transformer.h.N) would need their paths mapped.
- gguf: llama.cpp's LoRA adapter file (see llamacpp.py), from the plain LoRA as peft-lora makes it.
- peft-miss, cola: the FOSSIL and CoLA methods' own formats as their reference code loads them
  (`Method.export_native`): PEFT MiSS (Bone -> MiSS); the original CoLA code's layout (see methods/cola.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .adapter import CONFIG_NAME, WEIGHTS_NAME, Adapter, load_adapter, read_config, write_adapter_files
from .checkpoint import Checkpoint, ModelSource, atomic_output, check_output, read_header, save_tensors
from .config import CONFIG_FIELDS, NUMBER, POSITIVE_INT, AdapterConfig, check_fields
from .errors import LrsError
from .llamacpp import family_of, write_gguf
from .methods import METHODS
from .targets import Target, linear_targets, load_weight

FORMATS = ("peft-lora", "peft-miss", "kohya", "mlx", "cola", "gguf")
NATIVE = {"peft-miss": "MISS", "cola": "COLA"}  # formats that are a method's own on-disk layout
KOHYA_PREFIX = "lora_te_"
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
MLX_WEIGHTS = "adapters.safetensors"
MLX_SUFFIXES = {".lora_a": "lora_a", ".lora_b": "lora_b"}
MLX_FIELDS = {"scale": NUMBER, "rank": POSITIVE_INT, "dropout": CONFIG_FIELDS["lora_dropout"]}

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # module path -> (B, A, s) with ΔW = s·B·A


# ------------------------------------------------------------------------------------------ reading


def detect_format(path: str | os.PathLike) -> str:
    """'peft' (an lrs/PEFT adapter directory), 'kohya' or 'mlx'; LrsError for anything else."""
    p = Path(path)
    if not p.exists():
        raise LrsError(f"no such file or directory: {p}")
    if p.is_dir() and (p / CONFIG_NAME).is_file():
        return "mlx" if "lora_parameters" in read_config(p) else "peft"
    file = _single_safetensors(p)
    _key_layout(read_header(file)[0], file, "kohya")
    return "kohya"


def _single_safetensors(p: Path) -> Path:
    if p.is_file():
        return p
    files = sorted(p.glob("*.safetensors"))
    if len(files) != 1:
        raise LrsError(f"{p}: not an adapter (no {CONFIG_NAME}, and {len(files)} .safetensors files instead of one)")
    return files[0]


def _key_layout(keys, file: Path, expected: str) -> None:
    """All keys follow the `expected` layout (kohya or mlx), else say which layouts were found."""
    layouts = {"kohya": KOHYA_SUFFIXES, "mlx": MLX_SUFFIXES,
               "peft": {".lora_A.weight": 1, ".lora_B.weight": 1, ".miss_block": 1, ".bone_block": 1}}
    found: dict[str, list[str]] = {}
    for key in keys:
        kind = next((name for name, sfx in layouts.items() if key.endswith(tuple(sfx))), "unknown")
        found.setdefault(kind, []).append(key)
    if set(found) != {expected}:
        seen = "; ".join(f"{len(v)} {k} key(s), e.g. {v[0]}" for k, v in found.items()) or "no tensors"
        raise LrsError(f"{file}: {'mixed' if len(found) > 1 else 'unrecognised'} adapter key layout: {seen} "
                       f"(expected only {expected} keys)")


def read_adapter(path: str | os.PathLike, base: Checkpoint | None = None, cola_strategy: str | None = None
                 ) -> tuple[Adapter, str, list[str]]:
    """Any adapter lrs reads, as (adapter, format, warnings); kohya names resolve against `base`."""
    fmt = detect_format(path)
    if fmt == "peft":
        return load_adapter(path, cola_strategy), fmt, []
    if cola_strategy is not None:
        raise LrsError(f"--cola-strategy applies to CoLA adapters, but {path} is a {fmt} LoRA")
    if fmt == "mlx":
        return read_mlx(Path(path), base), fmt, []
    return (*read_kohya(_single_safetensors(Path(path)), base),)  # type: ignore[return-value]


def read_kohya(file: Path, base: Checkpoint | None = None) -> tuple[Adapter, str, list[str]]:
    """A kohya-style LoRA file; module paths from the base's names, else from lrs's `lrs_modules` metadata."""
    tensors = _load(file)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        suffix = next(s for s in KOHYA_SUFFIXES if key.endswith(s))
        groups.setdefault(key[: -len(suffix)], {})[KOHYA_SUFFIXES[suffix]] = t
    resolve = _kohya_resolver(file, base)
    pairs: Pairs = {}
    missing_alpha = []
    for name, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LrsError(f"{file}: kohya module {name} lacks its lora_{'up' if 'down' in parts else 'down'}.weight")
        up, down = _linear_pair(file, name, parts["up"], parts["down"])
        r = down.shape[0]
        if "alpha" not in parts:
            missing_alpha.append(name)
        alpha = _kohya_alpha(file, name, parts["alpha"]) if "alpha" in parts else 0.0
        pairs[resolve(name)] = (up, down, (alpha or r) / r)
    warnings = [f"{len(missing_alpha)} kohya module(s) have no .alpha (e.g. {missing_alpha[0]}): using alpha = r"] \
        if missing_alpha else []
    return lora_adapter(pairs, _plain_config(base)), "kohya", warnings


def _kohya_alpha(file: Path, name: str, alpha: torch.Tensor) -> float:
    """A module's .alpha: one finite number (a 0-d float32, fp16/bf16 from --save_precision, or int64); 0 means r."""
    value = float(alpha.reshape(-1)[0]) if alpha.numel() == 1 else math.nan
    if not math.isfinite(value):
        raise LrsError(f"{file}: kohya module {name} has .alpha {alpha.tolist()}, not one finite number")
    return value


def _linear_pair(file: Path, name: str, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two factors of a linear LoRA whose product left·right is defined (kohya up·down, mlx-lm lora_a·lora_b)."""
    if left.dim() != 2 or right.dim() != 2:
        raise LrsError(f"{file}: module {name} has factors of shapes {list(left.shape)} and {list(right.shape)}; only "
                       "linear (2-D) LoRA converts, not kohya Conv2d or mlx-lm SwitchLinear (expert) adapters")
    if left.shape[1] != right.shape[0]:
        raise LrsError(f"{file}: module {name} has factors of ranks {left.shape[1]} and {right.shape[0]} "
                       f"(shapes {list(left.shape)}, {list(right.shape)})")
    return left, right


def _load(file: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(ModelSource(file, str(file)))
    return {n: ckpt.get(n) for n in ckpt.names()}


def _kohya_resolver(file: Path, base: Checkpoint | None) -> Callable[[str], str]:
    """kohya name -> module path: the longest base module whose mangled path ends the name after a prefix."""
    if base is not None:
        table = {_mangle(t.path): t.path for t in linear_targets(base)}
        source = f"base {base.source.id}"
    else:
        table = _lrs_modules(file)
        if table is None:
            raise LrsError(f"{file}: kohya module names use '_' for '.', so lrs needs the base model (--base MODEL) "
                           "to map them back to module paths")
        source = "the file's lrs_modules metadata"

    def resolve(name: str) -> str:
        if name in table:
            return table[name]
        for i, ch in enumerate(name):
            if ch == "_" and name[i + 1:] in table:
                return table[name[i + 1:]]
        raise LrsError(f"{file}: kohya module {name} matches no linear module of {source}")

    return resolve


def _lrs_modules(file: Path) -> dict[str, str] | None:
    """The `lrs_modules` metadata lrs writes into kohya files (kohya name -> module path), or None."""
    text = read_header(file)[1].get("lrs_modules")
    if not text:
        return None
    try:
        table = json.loads(text)
    except json.JSONDecodeError:
        table = None
    if not (isinstance(table, dict) and all(isinstance(v, str) for v in table.values())):
        raise LrsError(f"{file}: metadata lrs_modules is not a JSON object of kohya names to module paths")
    return table


def _mangle(path: str) -> str:
    return path.replace(".", "_")


def read_mlx(directory: Path, base: Checkpoint | None = None) -> Adapter:
    """An mlx-lm LoRA adapter directory: ΔW = scale·lora_bᵀ·lora_aᵀ."""
    config = read_config(directory)
    kind = config.get("fine_tune_type", "dora" if config.get("use_dora") else "lora")  # older mlx-lm: use_dora
    if kind != "lora":
        raise LrsError(f"{directory}: mlx-lm fine_tune_type {kind!r} is not a LoRA (only 'lora' converts)")
    params = config.get("lora_parameters") or {}
    if not isinstance(params, dict) or "scale" not in params:
        raise LrsError(f"{directory}/{CONFIG_NAME}: lora_parameters has no scale")
    try:
        check_fields(params, MLX_FIELDS, "lora_parameters.")
    except LrsError as exc:
        raise LrsError(f"{directory / CONFIG_NAME}: {exc}") from None
    file = directory / MLX_WEIGHTS
    if not file.is_file():
        raise LrsError(f"{directory}: no {MLX_WEIGHTS}")
    tensors = _load(file)
    _key_layout(tensors, file, "mlx")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, name = key.rsplit(".", 1)
        groups.setdefault(path, {})[name] = t
    pairs: Pairs = {}
    for path, parts in groups.items():
        if set(parts) != {"lora_a", "lora_b"}:
            raise LrsError(f"{file}: module {path} lacks {({'lora_a', 'lora_b'} - set(parts)).pop()}")
        lora_a, lora_b = _linear_pair(file, path, parts["lora_a"], parts["lora_b"])  # in × r, r × out
        pairs[path] = (lora_b.T, lora_a.T, float(params["scale"]))  # mlx-lm's scale multiplies as is (not α/r)
    return lora_adapter(pairs, _plain_config(base, dropout=float(params.get("dropout") or 0.0),
                                             base_model=config.get("model")))


def _plain_config(base: Checkpoint | None, dropout: float = 0.0, base_model: str | None = None) -> dict[str, Any]:
    """Config fields of a LoRA read from a format that carries none."""
    fields: dict[str, Any] = {"dropout": dropout, "base_model": base_model}
    if base is not None:
        fields.update(base_model=base.source.id, fan_in_fan_out=any(t.conv1d for t in linear_targets(base)),
                      provenance={"base": base.source.id, "base_revision": base.source.revision,
                                  "base_hash": base.fingerprint()})
    return fields


# ------------------------------------------------------------------------------------------ plain LoRA


def lora_adapter(pairs: Pairs, fields: dict[str, Any]) -> Adapter:
    """A PEFT LoRA with ΔW = s·B·A per module: the common (r, α) globally, the rest in rank/alpha patterns."""
    ranks = {path: b.shape[1] for path, (b, _, _) in pairs.items()}
    alphas = {path: _tidy(s * ranks[path]) for path, (_, _, s) in pairs.items()}
    (r, alpha), _ = Counter((ranks[p], alphas[p]) for p in pairs).most_common(1)[0]
    config = AdapterConfig(
        method="lora", r=r, alpha=alpha, target_modules=sorted({p.rsplit(".", 1)[-1] for p in pairs}),
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: a for p, a in alphas.items() if a != alpha}, **fields)
    weights = {p: {"lora_A.weight": a.contiguous(), "lora_B.weight": b.contiguous()} for p, (b, a, _) in pairs.items()}
    return Adapter(config, weights)


def _tidy(x: float) -> float:
    """α rounded away from float noise (16.000001 -> 16.0) when that changes it by < 1e-6 relative."""
    rounded = round(x, 6)
    return rounded if abs(rounded - x) <= 1e-6 * abs(x) else x


def to_lora(adapter: Adapter, base: Checkpoint | None = None, rank: int | None = None,
            allow_lossy: bool = False) -> tuple[Adapter, list[dict[str, Any]]]:
    """Plain LoRA with the same ΔW: exact through `pair`, else a truncated SVD of ΔW (needs --base, --allow-lossy)."""
    method = adapter.method
    targets = _base_targets(adapter, base)
    found = {path: _pair(method, params, targets.get(path), path) for path, params in adapter.weights.items()}
    lossy = [p for p, pair in found.items() if pair is None or (rank is not None and pair[0].shape[1] > rank)]
    _check_lossy(adapter, found, lossy, base, rank, allow_lossy)
    pairs: Pairs = {}
    rows = []
    for path, pair in found.items():
        s, err = method.scale(path), 0.0
        if pair is not None:
            pairs[path] = (*pair, s)
        if path in lossy:
            delta = _weight_delta(adapter, path, base, targets[path]) if pair is None \
                else s * (pair[0].float() @ pair[1].float())
            b, a, err = _truncate(delta, min(rank or adapter.config.rank(path), *delta.shape))
            pairs[path] = (b, a, 1.0)
        rows.append({"module": path, "rank": pairs[path][0].shape[1], "error": err, "exact": path not in lossy})
    return lora_adapter(pairs, _converted_fields(adapter, rows)), rows


def _base_targets(adapter: Adapter, base: Checkpoint | None) -> dict[str, Target]:
    """The base's targets for the adapter's modules, after filling parameters only the base can give."""
    if base is None:
        return {}
    targets = {t.path: t for t in linear_targets(base)}
    for path in adapter.weights:
        if path not in targets:
            raise LrsError(f"adapter module {path} is not a linear module of {base.source.id}")
    method = adapter.method
    method.complete(adapter.weights, lambda p: load_weight(base, targets[p]))
    for path, params in adapter.weights.items():
        method.check_fits(targets[path], params)
    return targets


def _pair(method, params, target: Target | None, path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        return method.pair(params, shape=None if target is None else target.shape)
    except LrsError as exc:
        if target is not None:
            raise
        raise LrsError(f"converting {method.name} module {path} needs the base model (--base MODEL): {exc}") from None


def _check_lossy(adapter: Adapter, found: dict, lossy: list[str], base: Checkpoint | None, rank: int | None,
                 allow_lossy: bool) -> None:
    """Refuse, before any work, what needs the base or loses information without --allow-lossy."""
    name = adapter.method.name
    no_pair = [p for p in lossy if found[p] is None]
    if no_pair and base is None:
        raise LrsError(f"{name} module {no_pair[0]}: ΔW is not low-rank (it depends on the base weight); "
                       f"pass --base MODEL (and --rank R, --allow-lossy) to export it by truncated SVD")
    if lossy and not allow_lossy:
        why = "ΔW is not low-rank" if no_pair else f"--rank {rank} truncates ΔW"
        raise LrsError(f"converting {len(lossy)} {name} module(s) to LoRA loses information "
                       f"({why}, e.g. {lossy[0]}); pass --allow-lossy to accept a truncated SVD")


def _weight_delta(adapter: Adapter, path: str, base: Checkpoint, target: Target) -> torch.Tensor:
    """ΔW of a module whose ΔW depends on the base weight W (FOSSIL bat)."""
    return adapter.method.delta(adapter.weights[path], path, target.shape, load_weight(base, target)).float()


def _relative(reference: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(reference.double().norm())
    diff = float((reference.double() - approx.double()).norm())
    return diff / norm if norm > 0 else diff


def _truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-r SVD of ΔW as (B = U·S, A = Vh) and its relative Frobenius error."""
    from .svd import truncated_svd

    u, s, vh = truncated_svd([delta], rank, algorithm="exact", device="cpu")[0]
    b = (u * s).contiguous()
    return b, vh.contiguous(), _relative(delta, b @ vh)


def _converted_fields(adapter: Adapter, rows: list[dict[str, Any]]) -> dict[str, Any]:
    c = adapter.config
    lossy = {row["module"]: row["error"] for row in rows if not row["exact"]}
    provenance = {**c.provenance, "converted_from": {"method": c.method, **dict(c.options)}}
    if lossy:
        provenance["conversion_error"] = lossy
    return {"dropout": c.dropout, "fan_in_fan_out": c.fan_in_fan_out, "base_model": c.base_model,
            "provenance": provenance}


# ------------------------------------------------------------------------------------------ writing


def write_kohya(adapter: Adapter, directory: Path, prefix: str = KOHYA_PREFIX) -> None:
    """OUT/adapter_model.safetensors in kohya's lora_down/lora_up/alpha layout."""
    tensors, modules = {}, {}
    c = adapter.config
    for path, params in adapter.weights.items():
        name = prefix + _mangle(path)
        modules[name] = path
        a, b = params["lora_A.weight"], params["lora_B.weight"]
        alpha = c.scale(path) * a.shape[0]
        tensors.update({f"{name}.lora_down.weight": a, f"{name}.lora_up.weight": b,
                        f"{name}.alpha": torch.tensor(alpha, dtype=torch.float32)})
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(c.r),
                "ss_network_alpha": str(c.alpha), "lrs_modules": json.dumps(modules)}
    from safetensors.torch import save_file  # the 0-d alpha tensors need the reference writer

    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", **metadata})


def write_mlx(adapter: Adapter, directory: Path, num_hidden_layers: int | None = None) -> None:
    """OUT/adapters.safetensors + adapter_config.json as mlx-lm's load_adapters reads them."""
    c = adapter.config
    rank = max(params["lora_A.weight"].shape[0] for params in adapter.weights.values())
    scale = Counter(c.scale(p) for p in adapter.weights).most_common(1)[0][0]
    tensors = {}
    for path, params in adapter.weights.items():
        a, b = params["lora_A.weight"], params["lora_B.weight"] * (c.scale(path) / scale)
        pad = rank - a.shape[0]  # zero rows/columns leave ΔW unchanged
        tensors[f"{path}.lora_a"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).T.contiguous()
        tensors[f"{path}.lora_b"] = torch.nn.functional.pad(b, (0, pad)).T.contiguous()
    save_tensors(tensors, directory / MLX_WEIGHTS)
    layers = [_layer_key(p) for p in adapter.weights]
    first = min((i for i, _ in layers if i is not None), default=None)
    num_layers = -1 if first is None or num_hidden_layers is None else num_hidden_layers - first
    config = {"fine_tune_type": "lora", "model": c.base_model, "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": c.dropout,
                                  "keys": sorted({key for _, key in layers})},
              "lrs": c.lrs_block()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _layer_key(path: str) -> tuple[int | None, str]:
    """model.layers.3.self_attn.q_proj -> (3, 'self_attn.q_proj'): mlx-lm's keys are relative to a layer."""
    m = re.match(r"^.*?\.(\d+)\.(.+)$", path)
    return (int(m.group(1)), m.group(2)) if m else (None, path)


# ------------------------------------------------------------------------------------------ convert


def convert(adapter_path: str | os.PathLike, out: str | os.PathLike, to: str, base: str | os.PathLike | None = None,
            rank: int | None = None, allow_lossy: bool = False, force: bool = False,
            cola_strategy: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:
    """Convert any adapter lrs reads to `to` (peft-lora, peft-miss, kohya, mlx, cola); returns a report."""
    if to not in FORMATS:
        raise LrsError(f"unknown format {to!r} (known: {', '.join(FORMATS)})")
    if rank is not None and rank < 1:
        raise LrsError(f"--rank must be at least 1, got {rank}")
    if to == "gguf" and base is None:
        raise LrsError("--to gguf needs --base MODEL: its config.json names the architecture and the heads "
                       "llama.cpp's tensor layout depends on")
    out = Path(out)
    check_output(out, force, inputs=(adapter_path, base))
    ckpt = Checkpoint(base, allow_pickle=allow_pickle) if base is not None else None
    if to == "gguf":
        family_of(ckpt)  # refuse an architecture llama.cpp's layout is not known for before any work
    adapter, fmt, warnings = read_adapter(adapter_path, ckpt, cola_strategy)
    if adapter.saved:
        raise LrsError(f"{adapter_path} holds whole modules (modules_to_save: {', '.join(adapter.config.modules_to_save)})"
                       f", which --to {to} cannot carry; PEFT and lrs merge read the adapter as it is")
    report: dict[str, Any] = {"source": str(adapter_path), "from": fmt, "method": adapter.config.method,
                              "to": to, "out": str(out), "warnings": warnings}
    config, rows = None, []
    if to in NATIVE:
        result, config, native_warnings = _native(adapter, NATIVE[to], ckpt)
        warnings.extend(native_warnings)
    else:
        result, rows = to_lora(adapter, ckpt, rank, allow_lossy)
    with atomic_output(out, force, file=to == "gguf") as tmp:
        _write(result, to, tmp, ckpt, config)
    errors = [row["error"] for row in rows]
    return report | {"modules": len(result.weights), "rank": result.config.r, "alpha": result.config.alpha,
                     "lossy": any(not row["exact"] for row in rows), "max_error": max(errors, default=0.0),
                     "per_module": rows}


def _native(adapter: Adapter, peft_type: str, base: Checkpoint | None
            ) -> tuple[Adapter, dict[str, Any], list[str]]:
    """The adapter in its own method's format as that format's reference code loads it (see Method.export_native):
    (adapter, its adapter_config.json, warnings), when the method writes `peft_type`."""
    writers = [cls.name for cls in METHODS.values() if cls.peft_type == peft_type]
    if not writers:
        raise LrsError(f"no installed method writes {peft_type} adapters")
    if adapter.method.peft_type != peft_type:
        raise LrsError(f"a {adapter.config.method} adapter cannot be expressed as {peft_type} "
                       f"(only {', '.join(writers)} adapters can); convert it --to peft-lora instead")
    _base_targets(adapter, base)
    weights, config, json_config, warnings = adapter.method.export_native(adapter.weights)
    return Adapter(config, weights), json_config, warnings


def _write(adapter: Adapter, to: str, directory: Path, base: Checkpoint | None,
           config: dict[str, Any] | None = None) -> None:
    if to == "gguf":
        write_gguf(adapter, directory, base)
    elif to == "kohya":
        write_kohya(adapter, directory)
    elif to == "mlx":
        write_mlx(adapter, directory, None if base is None else base.config.get("num_hidden_layers"))
    else:
        write_adapter_files(adapter, directory, config=config)


