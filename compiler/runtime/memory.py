"""Activation memory of an execution plan (plan.py): kernel outputs in one arena per input
shape, laid out by liveness, so that steady-state calls allocate nothing and fault in no
new pages.

    planned = planned_buffers(gm)                 # {node: (first step, last step)}
    memory = Memory(list(planned.values()))
    m = memory.arena(signature)                   # this thread's buffers for these shapes
"""
from __future__ import annotations

import threading

import numpy as np

from fxopt.core.ir import storage_roots, storage_roots_of
from fxopt.kernels import api as K
from fxopt.runtime import kernel_ops

_ARENA_OPS = (*kernel_ops.LINEARS, kernel_ops.layer_norm)     # kernels that write into `out`


def planned_buffers(gm) -> dict:
    """{node: (first step, last step)} for the kernel outputs the arena holds: those no graph
    output can alias (the user gets fresh tensors), live from their step to the last use of
    anything that may alias them (views, splits, torch views of them)."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    candidates = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _ARENA_OPS]
    if not candidates:
        return {}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    escaping = storage_roots_of(output.args)
    last = {n: order[n] for n in candidates}
    for node in gm.graph.nodes:
        uses = [order[u] for u in node.users]
        if not uses:
            continue
        for root in storage_roots(node):
            if root in last:
                last[root] = max(last[root], *uses)
    return {n: (order[n], last[n]) for n in candidates if n not in escaping}


def in_arena(call):
    """A kernel step writing into its buffer j of the call's arena m (see Memory). A step
    returning (output, flag), as a linear's screened call does, keeps the flag."""
    def step(m, j, *args):
        got = call(*args, out=m.buffers[j])
        if m.shapes is not None:                 # the first call of these input shapes
            y = got[0] if type(got) is tuple else got
            m.shapes[j] = (y.size // y.shape[-1] if y.shape[-1] else 0, y.shape[-1]), y.dtype
        return got
    step.__wrapped__ = call
    return step


class _Arena:
    """The planned buffers of one input-shape signature on one thread."""
    __slots__ = ("buffers", "shapes", "nbytes")

    def __init__(self, n: int):
        self.buffers = [None] * n       # None: the step allocates
        self.shapes = [None] * n        # noted by the first call, then laid out
        self.nbytes = 0


class Memory:
    """Activation buffers planned by liveness: per input-shape signature (and per thread,
    so that threads calling one model never share a buffer), the first call notes each
    planned output's shape, the second lays them out in one block, offsets chosen so that
    buffers live at the same time never overlap, and every later call writes into it:
    no allocation and no page faults for these outputs. A few signatures are kept per
    thread (MAX_SIGNATURES); the oldest goes first."""
    MAX_SIGNATURES = 8
    ALIGN = 64

    def __init__(self, intervals: list):
        self.intervals = intervals
        self._local = threading.local()

    def arena(self, signature) -> _Arena:
        arenas = getattr(self._local, "arenas", None)
        if arenas is None:
            arenas = self._local.arenas = {}
        m = arenas.get(signature)
        if m is None:
            if len(arenas) >= self.MAX_SIGNATURES:
                del arenas[next(iter(arenas))]
            m = arenas[signature] = _Arena(len(self.intervals))
        elif m.shapes is not None:
            self._lay_out(m)
        return m

    def _lay_out(self, m: _Arena) -> None:
        sizes = [0 if s is None else -(-int(np.prod(s[0])) * s[1].itemsize // self.ALIGN) * self.ALIGN
                 for s in m.shapes]
        offsets = place(sizes, self.intervals)
        total = max([o + n for o, n in zip(offsets, sizes)] or [0])
        block = K.aligned_empty((max(total, 1),), np.uint8)
        block.fill(0)                   # fault the pages in now, not during calls
        for j, (shape, offset) in enumerate(zip(m.shapes, offsets)):
            if shape is not None and sizes[j]:
                nbytes = int(np.prod(shape[0])) * shape[1].itemsize
                m.buffers[j] = block[offset:offset + nbytes].view(shape[1]).reshape(shape[0])
        m.shapes, m.nbytes = None, total

    def nbytes(self) -> int:
        """Bytes of the arenas this thread holds."""
        return sum(m.nbytes for m in getattr(self._local, "arenas", {}).values())


def place(sizes: list, intervals: list) -> list:
    """Offsets for buffers of `sizes` bytes live over `intervals` (first, last step, both
    included): the largest first, each at the lowest offset where it overlaps no placed
    buffer that is live at the same time."""
    offsets = [0] * len(sizes)
    placed = []
    for j in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if not sizes[j]:
            continue
        first, last = intervals[j]
        busy = sorted((offsets[i], offsets[i] + sizes[i]) for i in placed
                      if intervals[i][0] <= last and first <= intervals[i][1])
        at = 0
        for start, end in busy:
            if at + sizes[j] <= start:
                break
            at = max(at, end)
        offsets[j] = at
        placed.append(j)
    return offsets
