"""Modules that can be called like the function they are named after.

`compressadvise.verify` is both a function of the package API and a module. Importing the
module (any `from .verify import ...`) binds the package attribute to the module, shadowing the
lazily exported function; a module whose class forwards calls keeps `ca.verify(...)` working
whichever of the two the attribute holds.
"""
from __future__ import annotations

import sys
import types
from typing import Any


def callable_module(module_name: str) -> None:
    """Make `sys.modules[module_name]` callable: calls go to its function of the same name."""
    module = sys.modules[module_name]
    name = module_name.rsplit(".", 1)[-1]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, name)(*args, **kwargs)

    module.__class__ = _CallableModule
