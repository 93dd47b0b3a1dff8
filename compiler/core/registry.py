"""Find passes by name: the name of a pass is the name of its module in passes/.

Passes from elsewhere (a user's own, or a test's) join with `register_pass`:

    register_pass(my_module)        # my_module.PASS.name is its name from now on
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from fxopt.core.errors import PipelineError
import fxopt.passes

_registered: dict[str, ModuleType] = {}


def pass_names() -> list[str]:
    """Every known pass, sorted."""
    builtin = {m.name for m in pkgutil.iter_modules(fxopt.passes.__path__) if not m.name.startswith("_")}
    return sorted(builtin | set(_registered))


def get_pass(name: str) -> ModuleType:
    """The module of pass `name`; an unknown name lists the known ones."""
    if name in _registered:
        return _registered[name]
    if name not in pass_names():
        raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(pass_names())}")
    module = importlib.import_module(f"fxopt.passes.{name}")
    _check(module, name)
    return module


def register_pass(module) -> None:
    """Make a pass defined outside passes/ usable in pipelines under its PASS.name."""
    name = getattr(getattr(module, "PASS", None), "name", None)
    if name is None:
        raise PipelineError("a pass must define PASS = PassInfo(name, ...) and run(gm, ctx)")
    _check(module, name)
    _registered[name] = module


def unregister_pass(name: str) -> None:
    _registered.pop(name, None)


def _check(module, name: str) -> None:
    info = getattr(module, "PASS", None)
    if info is None or info.name != name or not callable(getattr(module, "run", None)):
        raise PipelineError(f"pass {name} must define PASS = PassInfo({name!r}, ...) and run(gm, ctx)")
