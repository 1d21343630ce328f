"""The installed package imports from anywhere, not only from the repository root; the wheel and sdist build,
pass ``twine check`` and work installed into a fresh virtual environment."""
import site
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_outside_the_repository(tmp_path):
    # A package-dir entry for sslcore itself once made setuptools' editable finder treat sslcore
    # as a namespace package: sslcore/__init__.py never ran outside the repository.
    code = ("import sslcore, sslcore.kernels; from sslcore import NTXentLoss, KMeans; "
            "assert sslcore.__file__ and sslcore.kernels.__file__.endswith('__init__.py'); print('ok')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_import_sslcore_leaves_timm_and_plotting_unimported_and_registers_models_when_timm_comes():
    """``import sslcore`` stays light (timm alone took 5 s of its 8.5 s); the ContraNorm ViTs still reach timm's
    registry whichever of the two is imported first."""
    heavy = ("timm", "torchvision", "matplotlib", "sklearn")
    code = ("import sys, sslcore; print(sorted(m for m in %r if m in sys.modules)); import timm; "
            "print(timm.is_model('contranorm_vit_tiny_patch16_224'))" % (heavy,))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.split("\n")[:2] == ["[]", "True"], run.stderr
    code = "import timm, sslcore; print(timm.is_model('contranorm_vit_small_patch16_224'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr


def test_the_wheel_and_sdist_build_check_and_install_into_a_fresh_environment(tmp_path):
    """``python -m build`` (without isolation: the test environment's setuptools) makes both; ``twine check``
    passes; the wheel installed alone into a new venv (its dependencies reached through a path entry to this
    environment's site-packages, whose .pth files -- the editable install of the source tree -- are not
    processed) imports sslcore and sslcore.kernels from the venv, runs a loss, and its ``sslcore`` script works."""
    dist = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    wheel, sdist = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheel) == len(sdist) == 1
    run = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel[0]), str(sdist[0])],
                         capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.count("PASSED") == 2, run.stdout + run.stderr
    env = tmp_path / "fresh"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    run = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel[0])],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    code = ("import torch, sslcore, sslcore.kernels; from sslcore import NTXentLoss; "
            f"assert sslcore.__file__.startswith({str(env)!r}) and sslcore.kernels.__file__.startswith({str(env)!r}); "
            "loss = NTXentLoss(backend='torch')(torch.randn(8, 16), torch.randn(8, 16)); "
            "assert torch.isfinite(loss); print('ok')")
    run = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    run = subprocess.run([str(env / "bin" / "sslcore"), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "pretrain" in run.stdout, run.stderr
