"""Ahead-of-time compilation of every kernel specialisation the dispatch can launch, for GPUs this machine lacks.

The autograd Functions run forward and backward on meta tensors (no memory, no arithmetic) over the dtypes,
dropout settings and small, skinny and large shapes of `CASES`, with `matmul.launch` recording each launch
instead of running it; an autotuned kernel contributes every config its pruning keeps for that shape. Each
distinct specialisation is then compiled with `triton.compile` for a named GPU target (PTX and cubin, with
the ptxas that triton ships), and its resources are read back: shared memory from the compiled metadata,
registers and spills (local memory) from `cuobjdump -res-usage`.

    python -m lowrank_surgery.kernels.aot --arch 80 90 --jobs 2 --json report.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from . import matmul as mm

# Largest dynamic shared memory one block may use (bytes): A100 (sm_80) and H100/H200 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DROPOUTS = (0.0, 0.1)
# (tokens, in, out, R): a tiny layer, LoRA r=16 on a 7B projection, r=64 on its MLP, CoLA's stacked rank 256.
LOWRANK_CASES = [(64, 64, 48, 8), (8192, 4096, 4096, 16), (8192, 4096, 11008, 64), (8192, 11008, 4096, 256)]
# (tokens, in, out, r, mini_r): FOSSIL balance at r = 8, 16, 64 and mini.
FOLD_CASES = [(64, 70, 48, 8, None), (8192, 4096, 4096, 16, None), (8192, 4096, 11008, 64, 8)]
# (tokens, in, out, r): FOSSIL bat at the block sizes the kernel takes (bat.MAX_R).
BAT_CASES = [(64, 64, 48, 8), (8192, 4096, 4096, 16), (8192, 4096, 4096, 64)]
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Spec:
    """One compiled variant of a kernel: its argument types, constexpr values and launch shape."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int


def _arg_type(value: object) -> str:
    """Triton's signature type for a launch argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool) or value is None:
        raise TypeError(f"unexpected launch argument {value!r}")
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def _specs_of(kernel, args: tuple, meta: dict) -> list[Spec]:
    """The specs one recorded launch can compile to (every config an autotuned kernel keeps for its shape)."""
    configs = [None]
    if isinstance(kernel, mm.triton.runtime.Autotuner):
        configs = mm.fitting_configs(kernel.configs, dict(zip(kernel.arg_names, args)))
        kernel = kernel.fn
    names = kernel.arg_names
    signature = tuple((n, _arg_type(a)) for n, a in zip(names, args))
    specs = []
    for c in configs:
        consts = {**meta, **(c.kwargs if c else {})}
        specs.append(Spec(kernel.__name__, signature, tuple(sorted(consts.items())),
                          c.num_warps if c else 4, c.num_stages if c else 3))
    return specs


@contextlib.contextmanager
def recording() -> Iterator[set[Spec]]:
    """Within the block, kernel launches are not run but recorded as specs into the yielded set."""
    found: set[Spec] = set()
    mm._recorder = lambda kernel, args, meta: found.update(_specs_of(kernel, args, meta))
    try:
        yield found
    finally:
        mm._recorder = None


def _meta(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _run(function, x: torch.Tensor, *args) -> None:
    """Forward and backward of one autograd Function on meta tensors."""
    y = function.apply(x, *args)
    y.backward(torch.empty_like(y))


def launch_specs() -> set[Spec]:
    """Every specialisation the kernels launch over `CASES`, each dtype and dropout on/off."""
    from .bat import MAX_R, BatLinear
    from .fold import FoldLinear
    from .lowrank import LowRankLinear

    with recording() as found:
        for dtype in DTYPES:
            for p in DROPOUTS:
                for tokens, inp, out, R in LOWRANK_CASES:
                    x, w = _meta(tokens, inp, dtype=dtype, grad=True), _meta(out, inp, dtype=dtype)
                    A, B = _meta(R, inp, dtype=dtype, grad=True), _meta(out, R, dtype=dtype, grad=True)
                    _run(LowRankLinear, x, w, None, A, B, 2.0, p, 1)
                for tokens, inp, out, r, mini_r in FOLD_CASES:
                    x, w = _meta(tokens, inp, dtype=dtype, grad=True), _meta(out, inp, dtype=dtype)
                    _run(FoldLinear, x, w, None, _meta(r, mini_r or out, dtype=dtype, grad=True), r, mini_r, p, 1)
            for tokens, inp, out, r in BAT_CASES:
                assert r <= MAX_R
                for bias in (None, _meta(out, dtype=dtype)):
                    x, w = _meta(tokens, inp, dtype=dtype, grad=True), _meta(out, inp, dtype=dtype)
                    _run(BatLinear, x, w, bias, _meta(out // r, r, r, dtype=dtype, grad=True))
        mm.launch(mm._mask_kernel, None, _meta(1024, dtype=torch.float32), 1024, 1, 0.1, 1 / 0.9, BLOCK=1024)
    return found


def _kernels() -> dict:
    from .bat import _bat_kernel

    return {k.__name__: k for k in (mm._mm_body, mm._mask_kernel, _bat_kernel)}


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile `spec` for sm_`arch`; its resources: shared memory, warps, registers, spilled (local) bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernels()[spec.kernel]
    consts = dict(spec.constexprs)
    signature = {name: "constexpr" for name in consts} | dict(spec.signature)
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    seconds = time.perf_counter() - start
    usage = _resource_usage(compiled.asm["cubin"])
    return {"kernel": spec.kernel, "arch": arch, "constexprs": consts, "signature": dict(spec.signature),
            "num_warps_wanted": spec.num_warps, "num_stages": spec.num_stages,
            "num_warps": compiled.metadata.num_warps, "shared": compiled.metadata.shared,
            "ptx_bytes": len(compiled.asm["ptx"]), "cubin_bytes": len(compiled.asm["cubin"]), "seconds": seconds,
            **usage}


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local (spill) bytes of a cubin, as cuobjdump reports them."""
    from triton.backends.nvidia import compiler

    tool = os.path.join(os.path.dirname(compiler.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])}


def _compile_job(job: tuple[Spec, int]) -> dict:
    return compile_spec(*job)


def compile_all(archs: list[int], jobs: int = 1) -> list[dict]:
    """Compile every launchable specialisation for each arch; one report row per (spec, arch)."""
    work = [(spec, arch) for spec in sorted(launch_specs(), key=repr) for arch in archs]
    if jobs <= 1:
        return [_compile_job(job) for job in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80: A100, 90: H100)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the report rows here")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, default=str)
    worst = max(rows, key=lambda r: r["shared"] / SHARED_LIMIT[r["arch"]])
    print(f"compiled {len(rows)} kernel variants for sm_{', sm_'.join(map(str, args.arch))}; "
          f"most shared memory: {worst['shared']} bytes ({worst['kernel']}, sm_{worst['arch']}); "
          f"most registers: {max(r['registers'] for r in rows)}; spilled: {sum(r['local'] > 0 for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
