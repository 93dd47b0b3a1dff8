"""Remove ops that return their input unchanged in eval mode: dropout, clone, alias, detach,
and pads of zero everywhere (TF-style "same" 1x1 convs pad by 0: a copy of the activation)."""
from __future__ import annotations

from fxopt.core.ops import OpKind, arg, kind_of, pad_parts
from fxopt.core.pass_base import PassInfo, PassResult

PASS = PassInfo("remove_identity", doc="drop eval-mode dropout and value-preserving copies")


def run(gm, ctx) -> PassResult:
    stats = {"dropout": 0, "identity": 0, "zero_pad": 0, "skipped_training_dropout": 0}
    for node in list(gm.graph.nodes):
        kind = kind_of(node)
        if kind is OpKind.DROPOUT:
            # dropout(x, p, train): only an eval-mode dropout is the identity
            if arg(node, 2, "train", True):
                stats["skipped_training_dropout"] += 1
                continue
            stats["dropout"] += 1
        elif kind is OpKind.IDENTITY:
            # a clone that changes the memory format is kept: later ops may rely on it
            if node.kwargs.get("memory_format") is not None:
                continue
            stats["identity"] += 1
        elif kind is OpKind.PAD and all(isinstance(v, int) and v == 0 for v in pad_parts(node)["amounts"]):
            stats["zero_pad"] += 1
        else:
            continue
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    changed = stats["dropout"] + stats["identity"] + stats["zero_pad"] > 0
    return PassResult(changed, stats)
