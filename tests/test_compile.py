"""Every autotune config of every Triton kernel compiles ahead of time for sm_80 and sm_90a
without a GPU: shared memory fits, ptxas reports no spills, the PTX holds tensor-core
instructions (mma.sync on sm_80, wgmma on sm_90a).  See tests/aot.py."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(__file__))
import aot  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block, bytes
CASES = aot.cases()


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, aot.__file__], capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-{c[1]}-D{c[2]}-sm{c[5]}" for c in CASES])
def test_compiles_without_spills(compiled, case):
    _, dtype, d, _, name, cc = case
    res = compiled[f"{name}-{dtype}-D{d}-sm{cc}"]
    assert "error" not in res, res.get("error")
    assert res["shared"] <= SMEM_LIMIT[cc], f"{res['shared']} B of shared memory"
    assert res["tensor_core"], "no tensor-core instruction in the PTX"
    assert res["spills"] and not any(res["spills"]), f"ptxas reports spills {res['spills']}"
