"""Find passes by name: the name of a pass is the name of its module in passes/."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

import fxopt.passes
from fxopt.errors import PipelineError


def pass_names() -> list[str]:
    """Every registered pass, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(fxopt.passes.__path__)
                  if not m.name.startswith("_"))


def get_pass(name: str) -> ModuleType:
    """The module of pass `name`; an unknown name lists the known ones."""
    if name not in pass_names():
        raise PipelineError(f"unknown pass {name!r}; known passes: {', '.join(pass_names())}")
    module = importlib.import_module(f"fxopt.passes.{name}")
    info = getattr(module, "PASS", None)
    if info is None or info.name != name or not callable(getattr(module, "run", None)):
        raise PipelineError(f"passes/{name}.py must define PASS = PassInfo({name!r}, ...) and run(gm, ctx)")
    return module
