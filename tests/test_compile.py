"""Every kernel variant compiles ahead of time, as the binary a launch builds (tests/aot.py), for
sm_80 and sm_90a without a GPU: shared memory within the arch's opt-in limit, no spills; in every
kernel whose main loop is a matmul, the tensor-core instructions (mma.sync on sm_80; wgmma at least 64
wide on sm_90a) and a hot loop whose instruction issue stays within a budget of its tensor-core time."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(__file__))
import aot  # noqa: E402

SMEM_LIMIT = {80: 166_912, 90: 232_448}  # opt-in shared memory per block (bytes): A100, H100/H200
# The hot loop's instruction issue over its tensor-core time at peak (tests/aot.py's ``issue_per_tc``),
# kept within a budget so a change that bloats the loop fails here.  Values when set: InfoNCE forward
# 0.26-1.13, backward 0.53-1.12 (1.1 where D is streamed: 384 and 768 on Hopper); k-means 0.26-0.92 (3.6 and 3.8).
ISSUE_BUDGET = {"infonce_lse_fwd": 1.25, "infonce_lse_bwd": 1.25, "kmeans_assign": 1.1}
CASES = aot.cases()


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, aot.__file__], capture_output=True, text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("case", CASES, ids=[aot.case_id(c) for c in CASES])
def test_compiles_as_launched(compiled, case):
    res = compiled[aot.case_id(case)]
    cc = case[5]
    assert "error" not in res, res.get("error")
    assert res["shared"] <= SMEM_LIMIT[cc], f"{res['shared']} B of shared memory"
    assert res["spills"] and not any(res["spills"]), f"ptxas reports spills {res['spills']}"
    assert res["divisible"], "the launch-time divisibility attributes were not applied"
    if not res["mma_expected"]:
        return
    assert res["tensor_core"], "no tensor-core instruction in the PTX"
    if case[1] == "fp32" and case[4].startswith("kmeans_assign"):  # TF32 on the tensor cores, never FFMA
        assert res["mma_types"] == ["TF32"], f"fp32 runs {res['mma_types']} tensor-core instructions"
    if cc == 90:  # every wgmma at least 64 wide: the S (X.C^T) tile and the message tile
        assert res["wgmma_n"] and min(res["wgmma_n"]) >= 64, f"wgmma widths {res['wgmma_n']}"
    budget = ISSUE_BUDGET[case[4].split("[")[0]]
    assert res["loop"]["issue_per_tc"] <= budget, f"hot loop {res['loop']} over the issue budget {budget}"


def test_hot_loop_analysis_reads_sass():
    """The loop finder on a hand-written SASS excerpt: one loop of 4 instructions, 2 HGMMA 64x64x16."""
    sass = """
        /*0000*/  MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0020*/  HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/  FADD R2, R2, R3 ;
        /*0040*/  @!P0 BRA `(.L_x_1) ;
        /*0050*/  EXIT ;
"""
    loop = aot.hot_loop(sass, 90, 8)
    assert loop["instructions"] == 4 and loop["mma"] == 2
    # 4 instructions x 8 warps / 4 schedulers = 8 clocks; 2 x 65536 MAC x 2 warpgroups / 2048 = 128 clocks
    assert loop["issue_per_tc"] == pytest.approx(8 / 128, abs=1e-3)


def test_launch_signature_marks_what_the_launcher_marks():
    """Aligned pointers and ints divisible by 16 get divisibility 16, an int equal to 1 becomes a constant."""
    import torch

    from sslcore.kernels._backend import KernelSpec
    from sslcore.kernels.kmeans import _assign_kernel
    t = torch.empty(16)
    args = dict(X=t, C_NEG=t, C_EXACT=t, HALF_NORM=t, LABEL=t, DIST=t, N=1, K=8192, D=100, stride_x=100, stride_c=32,
                stride_e=7, size_bucket=5)
    meta = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=128, D_CHUNKS=1, EVEN_K=True, EVEN_D=False, UPCAST=False,
                PRECISION="ieee")
    sig, const, attrs = aot.launch_signature(KernelSpec("k", _assign_kernel, args, meta, 4, 2, True))
    names = _assign_kernel.arg_names
    assert const == {**meta, "N": 1} and sig["N"] == "constexpr" and sig["K"] == "i32"
    assert {names[k[0]] for k in attrs} == {"X", "C_NEG", "C_EXACT", "HALF_NORM", "LABEL", "DIST", "K", "stride_c"}
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d", [128, 256, 100])
def test_kmeans_specs_are_what_a_launch_passes(monkeypatch, dtype, d):
    """The k-means launch on a GPU (its launcher replaced by a recorder, the interpreter switched off) passes
    the constexprs of ``aot_specs``: the compile test builds the binary that runs (fp32: TF32, whatever
    ``torch.backends.cuda.matmul.allow_tf32`` says; before, fp32 compiled as TF32 and launched as IEEE)."""
    import torch

    import sslcore.kernels._tiles as tiles
    import sslcore.kernels.kmeans as km

    seen = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: seen.update(meta)

    for module in (tiles, km):
        monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(km, "_assign_tuned", Recorder())
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    km._assign_op(torch.randn(300, d).to(dt), torch.randn(8192, d).to(dt))
    expected = km.aot_specs(dtype, d)[0].constexprs
    tuned = {"BLOCK_M", "BLOCK_N", "EVEN_K"}  # set per config by the autotuner and its heuristic
    assert seen == {k: v for k, v in expected.items() if k not in tuned}
