"""The installed package imports from anywhere, not only from the repository root."""
import subprocess
import sys


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
