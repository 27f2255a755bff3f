"""Every kernel specialisation the dispatch can launch compiles for A100 (sm_80) and H100 (sm_90), without a GPU.

The compile runs in a child process: the other kernel tests switch Triton to its interpreter (TRITON_INTERPRET=1)
for this process, and interpreted kernels cannot be compiled.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.slow

from lowrank_surgery.kernels.aot import SHARED_LIMIT  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "lowrank_surgery.kernels.aot", "--arch", "80", "90", "--jobs", "2",
                    "--json", str(path)], env=env, check=True, capture_output=True, text=True)
    return json.loads(path.read_text())


def test_every_launch_compiles_for_both_targets(report):
    by_arch = {arch: {json.dumps([r["kernel"], r["constexprs"], r["signature"], r["num_stages"],
                                  r["num_warps_wanted"]], sort_keys=True) for r in report if r["arch"] == arch}
               for arch in (80, 90)}
    assert by_arch[80] == by_arch[90] and len(by_arch[80]) > 100
    kernels = {r["kernel"] for r in report}
    assert kernels == {"_mm_body", "_bat_kernel", "_mask_kernel"}
    for dtype in ("*fp32", "*bf16", "*fp16"):
        assert any(r["signature"]["x_ptr"] == dtype for r in report if r["kernel"] == "_mm_body"), dtype
    modes = {(r["constexprs"]["Y_MODE"], r["constexprs"]["DROP_X"], r["constexprs"]["DROP_C"], r["constexprs"]["ACC"])
             for r in report if r["kernel"] == "_mm_body"}
    assert {(0, True, False, False), (0, False, True, True), (1, True, False, False), (2, False, True, True)} <= modes


def test_compiled_kernels_fit_the_hardware(report):
    for r in report:
        where = f"{r['kernel']} {r['constexprs']} on sm_{r['arch']}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], where
        assert r["local"] == 0, f"{where} spills {r['local']} bytes"
        assert r["num_warps"] == r["num_warps_wanted"], where
        assert r["registers"] <= 255 and r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, where
