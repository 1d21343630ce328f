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
