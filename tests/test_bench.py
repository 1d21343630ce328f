"""The benchmark harness without a GPU: the prepared GPU run's plan and its TTGIR report, the tables."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import gpu, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_dry_run_prints_the_plan(tmp_path, capsys):
    assert gpu.main(["--dry-run", "--out", str(tmp_path / "run")]) == 0
    plan = capsys.readouterr().out
    for step in ("gpu tests", "ttgir evidence", "bench infonce", "bench kmeans", "bench contranorm"):
        assert f"- {step}, at most" in plan
    assert "-m pytest -m gpu" in plan
    assert "{'M': 65536, 'D': 256}" in plan and "{'N': 10000000, 'K': 8192, 'D': 128}" in plan
    assert "{'L': 4096, 'D': 768, 'B': 32}" in plan and "{'N': 131072, 'D': 256}" in plan
    assert plan.index("bench infonce") < plan.index("bench kmeans") < plan.index("bench contranorm")
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_gpu_run_refuses_a_machine_without_cuda(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "gpu", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                              if k != "TRITON_INTERPRET"})
    assert out.returncode == 2 and "--dry-run" in out.stderr


def test_ttgir_evidence_for_hopper(tmp_path):
    """The report the GPU run prints, here from an sm_90a compile: the wgmma and async copies show."""
    pytest.importorskip("triton")
    code = ("from triton.backends.compiler import GPUTarget; from bench import gpu; "
            "gpu.ttgir_evidence(gpu.Log(None), GPUTarget('cuda', 90, 32))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [x for x in out.stdout.splitlines() if x.startswith(("infonce", "kmeans", "contranorm"))]
    assert [x.split("[")[0] for x in lines] == ["infonce_lse_fwd", "kmeans_assign", "contranorm_grads"]
    for line in lines[:2]:  # the matmul kernels: wgmma, pipelined async copies, the row tile before the loop
        counts = dict(kv.rsplit(" ", 1) for kv in line.split(": ", 1)[1].split("; ")[:4])
        assert int(counts["wgmma"]) > 0 and int(counts["async copies"]) > 0
        assert int(counts["loads before the first loop"]) > 0


def test_markdown_shows_passes_only_where_counted():
    row = dict(op="contranorm", impl="sslcore-torch", dtype="fp32", shape={"L": 64}, median_ms=1.0,
               peak_extra_mib=None, tflops=0.1, frac_bf16_peak=None, status="ok", note="", passes=7.0)
    table = report.markdown([row, dict(row, impl="torch-eager", passes=None)])
    assert "| passes |" in table and "| 7.00 |" in table
    assert "passes" not in report.markdown([dict(row, op="infonce", passes=None)])


def test_ddp_bench_rows(tmp_path):
    """python -m bench infonce --world-size: rows per world size and mode; the ring keeps 1/W of the keys."""
    out = subprocess.run([sys.executable, "-m", "bench", "infonce", "--world-size", "1,2", "--quick", "--json-dir",
                          str(tmp_path), "--file", "ddp.jsonl"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = report.load_jsonl(tmp_path / "ddp.jsonl")
    assert [(r["shape"]["W"], r["impl"]) for r in rows] == [(1, "sslcore-gather"), (1, "sslcore-ring"),
                                                           (2, "sslcore-gather"), (2, "sslcore-ring")]
    by = {(r["shape"]["W"], r["impl"]): r for r in rows}
    assert by[2, "sslcore-ring"]["saved_mib"] < by[2, "sslcore-gather"]["saved_mib"]
    assert by[2, "sslcore-ring"]["flops"] == by[1, "sslcore-ring"]["flops"] / 2  # 1/W of the loss work
    assert "| saved MiB |" in out.stdout


def test_every_row_names_its_stack_and_commit(tmp_path):
    """Rows record the torch, Triton and CUDA versions and the commit; a copy without .git (the GPU machine's)
    takes the commit from $SSLCORE_COMMIT."""
    code = ("import json; from bench.harness import environment; print(json.dumps(environment()))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    row = json.loads(here.stdout)
    assert set(row) >= {"device", "torch", "triton", "cuda", "commit"} and row["torch"] and row["triton"]
    assert row["commit"], "git describe of this checkout"
    copy = tmp_path / "copy"  # the tree as the device tool copies it: no .git
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv*", "runs"))
    bare = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(copy)})
    assert json.loads(bare.stdout)["commit"] is None
    given = subprocess.run([sys.executable, "-c", code], cwd=copy, capture_output=True, text=True,
                           env={**env, "PYTHONPATH": str(copy), "SSLCORE_COMMIT": "abc123def456"})
    assert json.loads(given.stdout)["commit"] == "abc123def456"
