"""Render a graph as a picture (PNG) with networkx and matplotlib.

Nodes are laid out in topological layers, weights left out. matplotlib is an
optional extra (`pip install fxopt[plot]`); without it a note file is written
in the picture's place so a dump never silently misses a stage.
"""
from __future__ import annotations

import os

import networkx as nx
from torch.fx import GraphModule

from fxopt.core.ir import op_name

_COLORS = {"placeholder": "#9ecae1", "output": "#a1d99b"}


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """The data-flow graph of gm's computation (no weights, no guards)."""
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            continue
        label = node.name if node.op in ("placeholder", "output") else op_name(node)
        g.add_node(node.name, label=label, op=node.op)
        for src in node.all_input_nodes:
            if src.op not in ("get_attr", "call_module"):
                g.add_edge(src.name, node.name)
    return g


def render_graph(gm: GraphModule, path: str, title: str = "") -> str:
    """Write a PNG picture of gm's data flow to `path`; returns the path written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note = os.path.splitext(path)[0] + ".png.txt"
        with open(note, "w") as f:
            f.write("graph picture skipped: install matplotlib (pip install fxopt[plot])\n")
        return note
    g = to_networkx(gm)
    for layer, names in enumerate(nx.topological_generations(g)):
        for name in names:
            g.nodes[name]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal", scale=-1)
    depth = max((d["layer"] for _, d in g.nodes(data=True)), default=0) + 1
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.35 * depth)))
    colors = [_COLORS.get(d["op"], "#fdd0a2") for _, d in g.nodes(data=True)]
    nx.draw_networkx(g, pos, ax=ax, labels=nx.get_node_attributes(g, "label"),
                     node_color=colors, node_size=300, font_size=6, arrowsize=6)
    ax.set_title(title)
    ax.axis("off")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
