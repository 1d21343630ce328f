"""The benchmark harness without a GPU: the prepared GPU run (its plan, a rehearsal of the whole run on the
CPU, its caps, bounds and resume), the CPU rows and the tables."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu, harness, report
from bench.harness import Bound, Case, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOAL_SHAPES = {"infonce": {"M": 65536, "D": 256}, "kmeans-assign": {"N": 10**7, "K": 8192, "D": 128},
               "kmeans-fit": {"N": 10**7, "K": 8192, "D": 128, "iters": 20},
               "contranorm": {"L": 4096, "D": 768, "B": 32}, "contranorm-graph": {"N": 131072, "D": 256}}
PEERS = {"infonce": "inf-cl", "kmeans-assign": "flash-kmeans", "kmeans-fit": "flash-kmeans",
         "contranorm": "torch-sdpa", "contranorm-graph": "torch-sdpa"}


def test_goal_rows_first_then_the_others_and_torch_compile_last():
    """The goal group is sslcore and its strongest peer at each goal shape (the issue's), the k-means fits
    last; the other rows exclude torch.compile, which has a group of its own, the goal shapes first, and
    hold sslcore's k-means++ (an op with no goal) after the goal shapes' anchors."""
    groups = gpu.run_rows()
    goal = [(c.op, c.impl, harness.DTYPE_NAMES[c.dtype], c.shape) for c in groups["goal"]]
    want = []
    for op in (op for op in gpu.OP_ORDER if op in GOAL_SHAPES):
        dtype = "fp16" if PEERS[op] == "flash-kmeans" else "bf16"  # flash-kmeans takes no bf16
        want += [(op, "sslcore-triton", "bf16", GOAL_SHAPES[op]), (op, PEERS[op], dtype, GOAL_SHAPES[op])]
    assert goal == want
    assert all(c.device == "cuda" and c.goal for c in groups["goal"])
    assert {c.impl for c in groups["compile"]} == {"torch-compile"}
    assert "torch-compile" not in {c.impl for c in groups["other"]} and not any(c.goal for c in groups["other"])
    init = [(c.impl, harness.DTYPE_NAMES[c.dtype], c.shape) for c in groups["other"] if c.op == "kmeans-init"]
    assert init == [("sslcore-triton", "bf16", {"N": 10**7, "K": 1024, "D": 128})]
    at = [c.op for c in groups["other"]].index("kmeans-init")
    assert at > 0 and all(c.shape == GOAL_SHAPES[c.op] for c in groups["other"][:at])
    first = [c.shape for c in groups["compile"][:3]]
    assert first == [GOAL_SHAPES["infonce"], GOAL_SHAPES["contranorm"], GOAL_SHAPES["contranorm-graph"]]
    keys = [gpu.case_key(c) for g in groups.values() for c in g]
    assert len(keys) == len(set(keys)), "every row once"


@pytest.mark.parametrize("minutes", [gpu.BUDGET_MIN, 0.5, 2, 4, 5.5, 10, 15])
def test_caps_add_up_to_at_most_the_budget(tmp_path, minutes):
    steps = gpu.plan(tmp_path, 60 * minutes)
    assert [s.name for s in steps] == list(gpu.CAPS)
    assert sum(s.cap_s for s in steps) <= 60 * minutes
    assert all(s.cap_s == 0 or s.cap_s >= gpu.MIN_STEP_S for s in steps)
    if minutes == gpu.BUDGET_MIN:  # the default plan: every capped step but the last, the goal rows in time
        assert [s.cap_s for s in steps] == [*list(gpu.CAPS.values())[:-1], 0]
        assert steps[0].estimate_s <= steps[0].cap_s
    done = gpu.plan(tmp_path, 60 * minutes, {"goal rows"})  # --resume: a done step gets nothing
    assert done[0].done and done[0].cap_s == 0 and sum(s.cap_s for s in done) <= 60 * minutes


def test_gpu_dry_run_prints_the_plan(tmp_path, capsys):
    assert gpu.main(["--dry-run", "--out", str(tmp_path / "run")]) == 0
    plan = capsys.readouterr().out
    names = list(gpu.CAPS)
    for i, (name, cap) in enumerate(gpu.CAPS.items(), 1):
        assert f"| {i} | {name} | {cap or 'time left over'} | " in plan
    assert [plan.index(f"\n{name}: ") for name in names] == sorted(plan.index(f"\n{name}: ") for name in names)
    assert "-m pytest" in plan and all(t in plan for t in gpu.SMOKE_TESTS) and "bench gpu --ttgir" in plan
    assert "infonce sslcore-triton bf16 M=65536 D=256: bound 30 s warm-up, 45 s in all; estimate" in plan
    assert "contranorm-graph sslcore-triton bf16 N=131072 D=256" in plan
    assert "kmeans-fit sslcore-triton bf16 N=10000000 K=8192 D=128 iters=20" in plan
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_smoke_tests_collect_and_are_marked_gpu():
    """A renamed test fails here, not on the GPU: every smoke id collects under -m gpu, one per family."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                          *gpu.SMOKE_TESTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:]
    collected = [x for x in out.stdout.splitlines() if "::" in x]
    assert collected == list(gpu.SMOKE_TESTS)
    assert {t.split("::")[0] for t in gpu.SMOKE_TESTS} == set(gpu.gpu_test_files())


def test_gpu_run_refuses_a_machine_without_cuda(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "gpu", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                              if k != "TRITON_INTERPRET"})
    assert out.returncode == 2 and "--dry-run" in out.stderr and "--rehearse" in out.stderr


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """``python -m bench gpu --rehearse``: the whole run, every step a process under its cap, at tiny shapes on
    CPU tensors with the Triton interpreter (and Triton's compile for sm_90a in the TTGIR step)."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench", "gpu", "--rehearse", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout, time.perf_counter() - t


def test_rehearsal_runs_every_step_and_measures_every_row(rehearsal, monkeypatch):
    out, stdout, seconds = rehearsal
    monkeypatch.setenv(harness.REHEARSE_ENV, "1")
    planned = [gpu.case_key(c) for g in gpu.run_rows().values() for c in g]
    steps = gpu.read_jsonl(out / gpu.STEPS)
    assert [s["step"] for s in steps] == list(gpu.CAPS) and all(s["status"] == "ok" and s["done"] for s in steps)
    assert steps[0]["cap_s"] == gpu.CAPS["goal rows"] and steps[-1]["cap_s"] > 0  # time left over for the tests
    rows = report.load_jsonl(out / gpu.RESULTS)
    assert sorted(gpu.key(r["op"], r["impl"], r["dtype"], r["shape"]) for r in rows) == sorted(planned)
    for r in rows:
        assert {"device", "torch", "triton", "cuda", "commit"} <= set(r) and r["torch"] == torch.__version__
        if r["impl"] in ("inf-cl", "flash-kmeans"):
            continue  # "not installed" here (their rows run where the wheels are carried)
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["compile_s"] >= 0 and r["timer"]
    assert not (out / gpu.CURRENT).exists()
    table = (out / gpu.TABLE).read_text()
    assert "## Steps" in table and "| compile s |" in table and "Planned rows without a result" not in table
    log = (out / gpu.LOG).read_text()
    assert stdout in log or stdout.strip().splitlines()[-1] in log
    evidence = [x for x in log.splitlines() if x.startswith(("infonce", "kmeans_assign", "contranorm_grads"))]
    assert [x.split("[")[0].removesuffix("_tma") for x in evidence] == ["infonce_lse_fwd", "kmeans_assign",
                                                                          "contranorm_grads"]
    for line in evidence[:2]:  # sm_90a matmul kernels: wgmma fed by pipelined copies (TMA on InfoNCE's goal path,
        # whose row tile comes by descriptor inside the warp-specialised loop; k-means: async copies, the row tile
        # loaded before the loop)
        counts = dict(kv.rsplit(" ", 1) for kv in line.split(": ", 1)[1].split("; ")[:4])
        assert int(counts["wgmma"]) > 0
        tma = "_tma[" in line
        assert int(counts["TMA loads" if tma else "async copies"]) > 0, line
        assert tma or int(counts["loads before the first loop"]) > 0, line


def test_resume_skips_done_rows_and_done_steps(rehearsal, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(rehearsal[0], out)
    rows = report.load_jsonl(out / gpu.RESULTS)
    other = [r for r in rows if r["op"] == "kmeans-assign" and r["impl"] == "torch-chunked"]  # "other rows"
    kept = [r for r in rows if r not in other]
    (out / gpu.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in kept))
    steps = [s for s in gpu.read_jsonl(out / gpu.STEPS) if s["step"] != "other rows"]  # as if cut short there
    (out / gpu.STEPS).write_text("".join(json.dumps(s) + "\n" for s in steps))
    done = subprocess.run([sys.executable, "-m", "bench", "gpu", "--rehearse", "--resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    again = report.load_jsonl(out / gpu.RESULTS)
    assert again[:len(kept)] == kept and [(r["impl"], r["dtype"]) for r in again[len(kept):]] == [
        (r["impl"], r["dtype"]) for r in other]
    ran = [s["step"] for s in gpu.read_jsonl(out / gpu.STEPS)[len(steps):]]
    assert ran == ["other rows"]
    assert done.stdout.count("done in an earlier run") == len(gpu.CAPS) - 1
    assert "already in results.jsonl (ok)" in done.stdout


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in "ZX"


def _wait_dead(pid: int, seconds: float = 10.0) -> bool:
    until = time.perf_counter() + seconds
    while _alive(pid) and time.perf_counter() < until:
        time.sleep(0.05)
    return not _alive(pid)


SLEEPER = ("import subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session={new})\n"
           "print('child', child.pid, flush=True)\n"
           "{rest}\n")


def test_a_step_past_its_cap_is_killed_with_its_children_and_the_run_goes_on(tmp_path, monkeypatch):
    """The step (and the sleeping child it spawned, which holds the output pipe) is killed at its cap; the row
    it was measuring gets that status; the next step runs."""
    monkeypatch.setattr(gpu, "MIN_STEP_S", 0.5)
    case = Case("infonce", "sslcore-triton", torch.bfloat16, {"M": 8, "D": 4}, 1.0, lambda: None, "cuda")
    current = json.dumps(harness.row(case, "running"))
    hang = SLEEPER.format(new=False, rest=f"open({str(tmp_path / gpu.CURRENT)!r}, 'w').write({current!r})\n"
                                          "time.sleep(120)")
    steps = [gpu.Step("hang", [sys.executable, "-c", hang], 0, "", cap_s=2.0),
             gpu.Step("next", [sys.executable, "-c", "print('next step ran')"], 0, "", cap_s=5.0)]
    log = gpu.Log(tmp_path / gpu.LOG)
    t = time.perf_counter()
    gpu.execute(steps, tmp_path, 7.0, log)
    assert time.perf_counter() - t < 60, "the runner waited for the sleepers"
    text = (tmp_path / gpu.LOG).read_text()
    child = int(text.split("child ", 1)[1].split()[0])
    assert _wait_dead(child), "the step's child outlived its cap"
    ends = gpu.read_jsonl(tmp_path / gpu.STEPS)
    assert [(e["step"], e["status"], e["done"]) for e in ends] == [("hang", "stopped at its cap of 2 s", False),
                                                                   ("next", "ok", True)]
    assert "next step ran" in text
    row, = report.load_jsonl(tmp_path / gpu.RESULTS)
    assert row["status"] == "stopped: its step reached its cap of 2 s during this row"
    assert row["impl"] == "sslcore-triton"
    assert not (tmp_path / gpu.CURRENT).exists()


def test_the_output_reader_does_not_wait_for_a_process_outside_the_group(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "READER_GRACE_S", 0.5)
    log = gpu.Log(tmp_path / gpu.LOG)
    escaped = SLEEPER.format(new=True, rest="")  # the step exits at once; its child, in a session of its own,
    t = time.perf_counter()                      # keeps the pipe open for two minutes
    status, done, last = gpu.run_step("escape", [sys.executable, "-c", escaped], 30, log)
    child = int(last.split()[1])
    try:
        assert (status, done) == ("ok", True) and time.perf_counter() - t < 30
        assert "still held open by a process outside its group" in (tmp_path / gpu.LOG).read_text()
    finally:
        os.kill(child, 9)


def test_a_row_past_its_bound_gets_that_status():
    """The warm-up (setup and first call: compile, autotune) and the whole row are bounded; compile_s is the
    warm-up less the median."""
    def case(first_s, then_s):
        calls = []

        def setup():
            def step():
                time.sleep(first_s if not calls else then_s)
                calls.append(1)
            return step
        return Case("op", "impl", torch.float32, {"N": 1}, 1.0, setup, "cpu")
    slow_warmup = run_case(case(30, 0), bound=Bound(0.3, 60))
    assert slow_warmup["status"] == "stopped: warm-up over its bound of 0.3 s" and slow_warmup["median_ms"] is None
    slow_runs = run_case(case(0, 0.3), bound=Bound(30, 0.8))
    assert slow_runs["status"].startswith("stopped: over its bound of 0.8 s (warm-up ")
    ok = run_case(case(0.5, 0.001), bound=Bound(30, 60))
    assert ok["status"] == "ok" and ok["compile_s"] >= 0.3 and ok["median_ms"] < 500


def test_cpu_rows_and_the_readme(tmp_path, monkeypatch, capsys):
    """``python -m bench infonce --quick`` (this machine's CPU rows) and ``python -m bench readme`` of its file."""
    from bench.__main__ import main
    monkeypatch.setattr(harness, "BUDGET_S", 0.01)
    main(["infonce", "--quick", "--json-dir", str(tmp_path), "--file", "cpu.jsonl"])
    rows = report.load_jsonl(tmp_path / "cpu.jsonl")
    assert {r["impl"] for r in rows} == {"sslcore-torch", "torch-eager"} and all(r["status"] == "ok" for r in rows)
    assert all(r["compile_s"] is not None and r["device"].startswith("CPU") for r in rows)
    capsys.readouterr()
    main(["readme", str(tmp_path / "cpu.jsonl")])
    text = capsys.readouterr().out
    assert "`cpu.jsonl`" in text and "**infonce**" in text and "| compile s |" in text


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


def test_bench_data_rows_per_decoder(tmp_path, capsys):
    """``python -m bench data --quick``: a row per format, size and decoder, images/s per worker in the table."""
    from bench.__main__ import main
    from bench.data import decoders
    main(["data", "--quick", "--json-dir", str(tmp_path), "--file", "data.jsonl"])
    rows = report.load_jsonl(tmp_path / "data.jsonl")
    assert {(r["shape"]["format"].split()[0], r["shape"]["size"], r["impl"]) for r in rows} == {
        (f, s, d) for f in ("jpeg", "png") for s in (32, 224) for d in decoders()}
    assert set(decoders()) == {"auto", "torchvision", "pillow"} | ({"nvjpeg"} if torch.cuda.is_available() else set())
    assert all(r["status"] == "ok" and r["img_s"] > 0 and r["op"] == "imagefolder decode" for r in rows)
    assert "| img/s per worker |" in capsys.readouterr().out
