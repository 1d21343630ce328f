"""The command line starts quickly (no torch before the arguments are parsed), suggests near names for typos, and
the light tables it reads (method options, data names, backends) agree with what they stand for."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sslcore.data
import sslcore.methods.options
from sslcore.checks import BACKENDS
from sslcore.cli import main
from sslcore.kernels import BACKENDS as KERNEL_BACKENDS
from sslcore.methods import METHODS, option_parameters, option_table_source

HEAVY = ("torch", "numpy", "timm", "sklearn", "triton", "torchvision", "matplotlib")


def _imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str], float]:
    """Run ``python -X importtime -m sslcore ARGS`` in a fresh interpreter: the result, the top-level packages it
    imported, and its wall time."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "sslcore", *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    modules = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s*(\S+)$", run.stderr, re.M)}
    return run, modules, wall


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "pretrain"),
    (["pretrain", "--help"], 0, "--method"),
    (["eval", "--help"], 0, "--checkpoint"),
    (["export", "--help"], 0, "--checkpoint"),
    (["report", "--help"], 0, "--readme"),
    (["pretrian"], 2, "did you mean 'pretrain'?"),
    (["pretrain", "--methd", "simclr"], 2, "did you mean '--method'"),
    (["pretrain", "--method", "simclrr"], 2, "did you mean 'simclr'"),
    (["pretrain", "--data", "digit"], 2, "did you mean 'digits'?"),
    (["pretrain", "-o", "proj_dimm=128"], 2, "did you mean 'proj_dim'"),
    (["pretrain", "--method", "moco", "-o", "queue_size=0"], 2, "option 'queue_size' of method 'moco' must be"),
    (["pretrain", "--lr", "2"], 2, "argument --lr: must be a number in (0, 1], got '2'"),
])
def test_help_and_usage_errors_import_no_torch(args, code, says):
    run, modules, wall = _imported(*args)
    assert run.returncode == code and says in (run.stdout + run.stderr), run.stderr[-2000:]
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    # Generous on purpose (a shared 2-core machine): the goal is < 0.5 s on a quiet one; importing torch alone
    # takes 5 s or more here, so this still fails if torch comes back before parsing.
    assert wall < 4, wall


def test_the_work_imports_after_parsing(tmp_path):
    """A study's own arguments are added when it is parsed (its module imported then): its help still works."""
    with pytest.raises(SystemExit) as e:
        main(["benchmark", "--help"])
    assert e.value.code == 0


def test_option_table_is_current():
    text = Path(sslcore.methods.options.__file__).read_text()
    assert text == option_table_source(), "run: python -m sslcore.methods.options (the methods' options changed)"
    for name in METHODS:  # and the domains it holds are the signatures' own
        assert sslcore.methods.options.OPTIONS[name] == {k: p.annotation for k, p in option_parameters(name).items()}


def test_light_tables_match_what_they_name():
    from sslcore.data.augment import build_recipe  # noqa: F401 -- the recipes' module imports its names
    from sslcore.data.datasets import DATASETS

    assert BACKENDS == KERNEL_BACKENDS
    assert tuple(DATASETS) == sslcore.data.DATA_NAMES


def test_methods_registry_resolves_on_use():
    assert "simclr" in METHODS and "nosuch" not in METHODS
    from sslcore.methods import SimCLR  # the package's lazy names and the registry give the same class

    assert METHODS["simclr"] is SimCLR and dict(METHODS.items())["simclr"] is SimCLR
    with pytest.raises(ValueError, match="did you mean 'moco'"):
        sslcore.methods.get_method("mocco")
