"""Module attributes imported on first use (PEP 562), so importing a package stays cheap."""

from __future__ import annotations

import importlib


def lazy_module(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: ``__getattr__`` imports ``exports[name]`` (a submodule) on
    first use; ``__dir__`` lists the module's globals and every export."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        vars(importlib.import_module(package))[name] = value  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
