"""Import machinery that imports nothing heavy itself: lazy package attributes (PEP 562) and the hook that
registers the ContraNorm ViTs with timm when timm is imported.  ``import sslcore`` and the ``sslcore``
command's parser import no torch through these (docs/architecture.md, "The command line")."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


def lazy_attributes(package: str, exports: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a name to the module (relative to the
    package) that defines it, imported on first use; any other public name that is a submodule is imported
    as that submodule (``sslcore.dist``)."""
    def __getattr__(name: str):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})
    return __getattr__, __dir__


class _RegisterAfterImport(importlib.abc.Loader):
    """timm's own loader, then ``sslcore.layers.register_timm_models`` once timm's package has executed."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        importlib.import_module("sslcore.layers").register_timm_models()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: timm's loader answers
        return getattr(self.loader, name)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """A one-shot finder: when ``import timm`` first happens, hand back timm's spec with its loader wrapped."""

    def find_spec(self, name, path=None, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


def register_timm_models_when_imported() -> None:
    """The ContraNorm ViTs reach timm's registry whichever of timm and sslcore is imported first, and importing
    sslcore alone imports neither timm nor torch."""
    if "timm" in sys.modules:
        importlib.import_module("sslcore.layers").register_timm_models()
    elif not any(isinstance(finder, _TimmImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
