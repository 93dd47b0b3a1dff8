"""Remove nodes whose values nothing uses (and the weights only they read)."""
from __future__ import annotations

from fxopt.core.ir import finish
from fxopt.core.pass_base import PassInfo, PassResult

PASS = PassInfo("eliminate_dead_code", doc="remove unused nodes and weights")


def run(gm, ctx) -> PassResult:
    before = len(gm.graph.nodes)
    finish(gm)
    removed = before - len(gm.graph.nodes)
    return PassResult(changed=removed > 0, stats={"removed": removed})
