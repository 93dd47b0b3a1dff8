"""Helpers shared by everything that runs a captured graph on data: the Taylor
criterion and fine-tuning.

    inputs, target = split_item(batch)            # (inputs, target) or inputs
    out = call(gm, inputs)                        # inputs as tuple, dict or tensor
    logits = first_tensor(out)                    # logits / last_hidden_state
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxopt.core.capture import normalize_inputs


def split_item(item):
    """(inputs, target) of a data item: a pair whose first element is a tuple/list/dict
    of model inputs carries a target; anything else is model inputs alone."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list, dict)):
        return item[0], item[1]
    return item, None


def call(model: nn.Module, inputs, params: dict | None = None):
    """model(*args, **kwargs) for inputs in any example_inputs form; `params`
    (name -> tensor) replaces weights for this call only."""
    args, kwargs = normalize_inputs(inputs)
    if params:
        return torch.func.functional_call(model, params, args, kwargs, strict=False)
    return model(*args, **kwargs)


def first_tensor(out) -> torch.Tensor:
    """The first floating tensor of a model output (logits, last_hidden_state, ...)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"model output {type(out).__name__} holds no floating-point tensor")
