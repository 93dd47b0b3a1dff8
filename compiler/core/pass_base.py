"""What a pass is: a declaration, a context, and a result.

A pass module under passes/ holds

    PASS = PassInfo("fold_batchnorm", requires=(), options={}, doc="...")
    def run(gm, ctx, **options) -> PassResult

and keeps no state of its own: whatever it needs is in `ctx`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PassInfo:
    """A pass's name (= its module name), the passes that must run before it, and its options."""
    name: str
    requires: tuple = ()
    options: dict = field(default_factory=dict)
    doc: str = ""


@dataclass
class PassResult:
    """Whether the graph changed, and counts of what the pass did and skipped (and why)."""
    changed: bool
    stats: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """Everything a pass may use: example inputs, user options, and data passes hand on.

    `state` carries results from one pass to a later one (calibration ranges,
    for instance), keyed by the producing pass's name.
    """
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    probe: tuple | None = None     # (args, kwargs) drift is measured on; default: the example
    options: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    seed: int = 0
    ran: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def warn(self, message: str | Warning) -> None:
        """Record `message` and issue it (a Warning instance keeps its category)."""
        import warnings
        self.warnings.append(str(message))
        warnings.warn(message, stacklevel=3)

    @property
    def probe_inputs(self) -> tuple:
        return self.probe if self.probe is not None else (self.example_args, self.example_kwargs)

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)
