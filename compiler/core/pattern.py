"""The one pattern-matching helper every pass uses.

A pattern is a tree of `Pat`s over data inputs: each names what the node must
be (an OpKind, or a predicate), what its first inputs must match, and whether
its value may feed only this pattern (`single_user`, needed whenever a rewrite
removes the inner node). Matches come back as {name: Node}.

    conv_bn = Pat(is_eval_batch_norm, Pat(OpKind.CONV, name="conv", single_user=True), name="bn")
    for m in find_all(gm, conv_bn):
        fold(m["conv"], m["bn"])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from torch.fx import GraphModule, Node

from fxopt.core.ops import OpKind, kind_of

Test = Union[OpKind, Callable[[Node], bool], None]


@dataclass(frozen=True)
class Pat:
    """Match a node by kind or predicate, then its first len(inputs) args in order."""
    test: Test = None
    inputs: tuple = field(default=())
    name: str | None = None
    single_user: bool = False

    def __init__(self, test: Test = None, *inputs: "Pat", name: str | None = None,
                 single_user: bool = False):
        object.__setattr__(self, "test", test)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "single_user", single_user)


ANY = Pat()


def match(node, pat: Pat) -> dict | None:
    """Bindings {name: node} if `node` matches `pat`, else None."""
    if not isinstance(node, Node):
        return None if pat.test is not None or pat.inputs else {}
    if not _test(node, pat.test):
        return None
    if pat.single_user and len(node.users) != 1:
        return None
    bound = {pat.name: node} if pat.name else {}
    if len(node.args) < len(pat.inputs):
        return None
    for arg, sub in zip(node.args, pat.inputs):
        sub_bound = match(arg, sub)
        if sub_bound is None:
            return None
        bound.update(sub_bound)
    return bound


def _test(node: Node, test: Test) -> bool:
    if test is None:
        return True
    if isinstance(test, OpKind):
        return kind_of(node) is test
    return bool(test(node))


def find_all(gm: GraphModule, pat: Pat) -> list[dict]:
    """Every match of `pat` rooted at some node, in graph order.

    Matches are found up front; a pass that rewrites should check that a
    later match's nodes are still in the graph (see `alive`).
    """
    found = []
    for node in gm.graph.nodes:
        bound = match(node, pat)
        if bound is not None:
            found.append(bound)
    return found


def alive(gm: GraphModule, bound: dict) -> bool:
    """True while every node of a match is still in the graph."""
    return all(n.graph is gm.graph and not getattr(n, "_erased", False) for n in bound.values())
