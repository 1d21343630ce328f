"""The command line starts quickly (no torch before the arguments are parsed), suggests near names for typos, and
the light tables it reads (method options, data names, backends) agree with what they stand for."""
import ast
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sslcore.data
import sslcore.methods.options
from sslcore.checks import BACKENDS
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
    (["benchmark", "--help"], 0, "--methods"),
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


def test_help_takes_less_than_importing_torch():
    """The one wall-clock check, generous on purpose (the goal, < 0.5 s, holds on a quiet machine; a shared one
    slows both sides alike): ``sslcore pretrain --help`` takes less than half of ``import torch`` alone."""
    _, _, wall = _imported("pretrain", "--help")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    assert wall < 0.5 * (time.perf_counter() - start), wall


@pytest.mark.parametrize("command, says", [("transfer", "--views"), ("oversmoothing", "--vit-scale"),
                                            ("tokenize", "--n-clusters"), ("tcas", "--tokenizer"),
                                            ("mim-study", "--n-clusters"), ("tcas-sweep", "--rates"),
                                            ("ar-vs-mlm", "--equalise")])
def test_every_studys_help_imports_no_torch(command, says):
    """The studies whose modules import torch take their arguments from ``experiments/arguments.py``: their help
    and usage errors import nothing heavy either."""
    run, modules, _ = _imported(command, "--help")
    assert run.returncode == 0 and says in run.stdout, run.stderr[-2000:]
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


@pytest.mark.parametrize("args, says", [(["oversmoothing", "--vit-sacle", "1"], "did you mean '--vit-scale'"),
                                        (["oversmoothing", "--vit-scale", "inf"], "must be a number >= 0"),
                                        (["tcas-sweep", "--rates", "0.5"], "at least two distinct rates"),
                                        (["transfer", "--views", "1"], "--views must be distinct integers >= 2")])
def test_a_studys_usage_errors_import_no_torch(args, says):
    """(``--vit-sacle`` is not a prefix: argparse takes prefixes, allow_abbrev.)"""
    run, modules, _ = _imported(*args)
    assert run.returncode == 2 and says in run.stderr, run.stderr[-2000:]
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


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


LEVELS = {"kernels": 1, "methods": 3, "cli": 4, "__main__": 4, "train": 4, "data": 4, "experiments": 4}  # others: 2
ROOT = Path(__file__).resolve().parents[1]


def _level(module: str) -> int:
    """DESIGN.md's level of ``sslcore.X...`` (the package itself re-exports, lazily: the top)."""
    parts = module.split(".")
    return 4 if len(parts) == 1 else LEVELS.get(parts[1], 2)


def _imports(path: Path, module: str):
    """The sslcore modules ``path`` (the module ``module``) imports, anywhere in it (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "sslcore")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "sslcore":
                yield from ((f"{base}.{a.name}" if node.module is None else base) for a in node.names)


def test_imports_point_down_the_levels():
    """DESIGN.md: kernels (1) < losses, layers, functional, ... (2) < methods (3) < cli, train, data, studies (4)."""
    files = [(p, "sslcore." + ".".join(p.relative_to(ROOT / "sslcore").with_suffix("").parts))
             for p in (ROOT / "sslcore").rglob("*.py")]
    files += [(p, "sslcore.kernels." + p.stem) for p in (ROOT / "kernels").glob("*.py")]
    up = [f"{m} (level {_level(m)}) imports {t} (level {_level(t)})" for p, m in files
          for t in _imports(p, m.removesuffix(".__init__")) if _level(t) > _level(m)]
    assert not up, "\n".join(up)
    assert any(t == "sslcore.functional" for t in _imports(ROOT / "sslcore/methods/clustermim.py",
                                                            "sslcore.methods.clustermim"))  # the scan sees imports
