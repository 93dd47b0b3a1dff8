"""Lottery tickets (Frankle and Carbin): iterative magnitude pruning with rewinding.

    ticket, history = fxopt.lottery_ticket(model, train_fn, eval_fn, rounds=5, prune_rate=0.2)
    print(history)                     # per round: sparsity, ticket, random reinit, dense
    fast = fxopt.optimize(ticket, (x,))

Masks are torch.nn.utils.prune's reparametrization (weight_orig * weight_mask in a
forward pre-hook), so the pruned weights stay zero while the user's train_fn trains;
the returned ticket has it removed: plain modules whose pruned weights are zeros.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import numbers
import random

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune
from tqdm.auto import tqdm

from fxopt.pruning.lottery_history import LotteryHistory, LotteryRound

PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)
SCOPES = ("uniform", "global")


def lottery_ticket(model: nn.Module, train_fn, eval_fn, rounds: int = 5, prune_rate: float = 0.2,
                   rewind_to: int = 0, compare_random: bool = True, *, scope: str = "uniform",
                   seed: int | None = 0, higher_is_better: bool = True, progress: bool = True):
    """Find a sparse subnetwork of `model` that trains, from its early weights, as well as the whole.

    `model` is the network at initialization (untrained); it is never modified. A copy is
    trained with `train_fn(model)` (your loop; it trains the model it is given in place and
    builds its optimizer from `model.parameters()` on each call), then each round prunes
    `prune_rate` of the surviving weights of every Linear and Conv layer by magnitude
    (scope="uniform": each layer loses that fraction, as in the paper; "global": the smallest
    across all layers), rewinds the survivors (and every other parameter and buffer) to their
    early values and trains again. After r rounds each layer's sparsity is 1 - (1 - prune_rate)^r
    (67.2 % after five rounds of 20 %). Biases are not pruned.

    rewind_to=0 rewinds to the initial weights. rewind_to=k > 0 rewinds to the weights after
    k steps (or epochs) of the dense training: train_fn is then called as train_fn(model, tick)
    and calls tick() after each optimizer step (or each epoch; the unit is yours). The weights
    at the k-th tick of the dense run are the rewind point; in later rounds tick.start is k,
    so a loop may resume there (`for epoch in range(tick.start, epochs)`) or train in full.

    compare_random: each round also trains the same mask from a random re-initialization
    (every submodule's reset_parameters(), a new draw per round): the control the ticket must
    beat. eval_fn(model) -> float scores a trained network (higher_is_better says its sense).
    seed: the run is reproducible and the caller's torch, numpy and random states are restored
    after it; each training is seeded per round (ticket and control alike). seed=None uses
    the global generators as they are.

    Returns (ticket, history): the last round's trained ticket, in eval mode, and a
    LotteryHistory (print it for the table, history.plot(path) for a figure).

        ticket, history = fxopt.lottery_ticket(MLP(), lambda m: train(m, data), lambda m: acc(m))
    """
    layers = _check(model, train_fn, eval_fn, rounds, prune_rate, rewind_to, scope, seed)
    with _rng_scope(seed) as reseed:
        return _Run(model, train_fn, eval_fn, rewind_to, scope, reseed).run(
            rounds, prune_rate, compare_random, higher_is_better, progress, layers)


class Tick:
    """Counts the steps (or epochs) of a train_fn(model, tick); keeps the weights at the k-th."""

    def __init__(self, model: nn.Module, rewind_to: int, start: int = 0, record: bool = False):
        self.model, self.rewind_to, self.start, self.count = model, rewind_to, start, start
        self.record, self.state = record, None

    def __call__(self):
        self.count += 1
        if self.record and self.count == self.rewind_to:
            self.state = _snapshot(self.model)


class _Run:
    def __init__(self, model, train_fn, eval_fn, rewind_to, scope, reseed):
        self.init = copy.deepcopy(model)             # unpruned structure for the random controls
        self.work = copy.deepcopy(model)
        self.train_fn, self.eval_fn, self.rewind_to, self.scope, self.reseed = \
            train_fn, eval_fn, rewind_to, scope, reseed

    def run(self, rounds, prune_rate, compare_random, higher_is_better, progress, names):
        layers = {name: self.work.get_submodule(name) for name in names}
        bar = tqdm(total=rounds + 1, desc="lottery dense", unit="round", disable=not progress, leave=False)
        rewind_state = self._train_dense()
        history = [LotteryRound(0, 0.0, self._score(self.work), None, {n: 0.0 for n in layers})]
        bar.update()
        for r in range(1, rounds + 1):
            bar.set_description(f"lottery round {r}/{rounds}")
            _prune(layers, prune_rate, self.scope)
            _rewind(self.work, rewind_state)
            self._train(self.work, r, start=self.rewind_to)
            ticket = self._score(self.work)
            control = self._control(layers, r) if compare_random else None
            per_layer = {n: _sparsity([m]) for n, m in layers.items()}
            history.append(LotteryRound(r, _sparsity(layers.values()), ticket, control, per_layer))
            bar.set_postfix(sparsity=f"{history[-1].sparsity:.1%}", ticket=f"{ticket:.4f}",
                            control="-" if control is None else f"{control:.4f}")
            bar.update()
        bar.close()
        for module in layers.values():
            prune.remove(module, "weight")           # a plain Parameter holding the zeros
        return self.work.eval(), LotteryHistory(history, prune_rate, self.scope, self.rewind_to, higher_is_better)

    def _train_dense(self) -> dict:
        if self.rewind_to == 0:
            state = _snapshot(self.work)
            self._train(self.work, 0)
            return state
        tick = self._train(self.work, 0, record=True)
        if tick.state is None:
            raise ValueError(f"rewind_to={self.rewind_to}, but train_fn called tick() only {tick.count} times "
                             "while training the dense model; call tick() after each step (or epoch), or "
                             f"give a rewind_to of at most {tick.count}")
        return tick.state

    def _train(self, model, round_, start=0, record=False):
        tick = Tick(model, self.rewind_to, start, record)
        self.reseed(round_, 0)
        out = self.train_fn(model, tick) if self.rewind_to else self.train_fn(model)
        if isinstance(out, nn.Module) and out is not model:
            raise ValueError("train_fn returned a different module than the one it was given; "
                             "lottery_ticket keeps the model it passes (masks and all): train it in place")
        return tick

    def _control(self, layers, round_) -> float:
        """The same mask on a fresh random initialization, trained like the ticket."""
        control = copy.deepcopy(self.init)
        self.reseed(round_, 1)
        with torch.no_grad():
            for module in control.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
        for name, module in layers.items():
            prune.custom_from_mask(control.get_submodule(name), "weight", module.weight_mask.clone())
        self._train(control, round_, start=self.rewind_to)
        return self._score(control)

    def _score(self, model) -> float:
        value = self.eval_fn(model)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"eval_fn returned {type(value).__name__} {value!r:.80}; it must return one number "
                            "(e.g. accuracy as a float), higher is better unless higher_is_better=False")
        return float(value)


def _prune(layers: dict, rate: float, scope: str):
    """Prune `rate` of each layer's (or, global, all layers') surviving weights by magnitude."""
    # Rank the trained weights as they are now: module.weight is only refreshed by a
    # forward, so after the last optimizer step it is one step stale.
    scores = {m: _current(m).detach().abs() for m in layers.values()}
    if scope == "global":
        total_alive = sum(int(_mask(m).sum()) for m in layers.values())
        prune.global_unstructured([(m, "weight") for m in layers.values()], prune.L1Unstructured,
                                  importance_scores={(m, "weight"): s for m, s in scores.items()},
                                  amount=round(rate * total_alive))
    else:
        for m, s in scores.items():
            prune.l1_unstructured(m, "weight", amount=rate, importance_scores=s)


def _current(module) -> torch.Tensor:
    if hasattr(module, "weight_orig"):
        return module.weight_orig * module.weight_mask
    return module.weight


def _mask(module) -> torch.Tensor:
    return module.weight_mask if hasattr(module, "weight_mask") else torch.ones_like(module.weight)


def _sparsity(modules) -> float:
    masks = [_mask(m) for m in modules]
    return 1.0 - float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)


def _snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rewind(model, state: dict):
    """Copy a snapshot of the unpruned model into the pruned one: a pruned `weight` goes to
    `weight_orig` (its mask keeps the pruned entries at zero); everything else by name."""
    current = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in state.items():
            current.get(name + "_orig", current.get(name)).copy_(value)
        for module in model.modules():
            if hasattr(module, "weight_orig"):
                module.weight = module.weight_orig * module.weight_mask


@contextlib.contextmanager
def _rng_scope(seed):
    """reseed(round, kind) seeds torch, numpy and random for one training; the caller's
    states come back afterwards. seed=None: no seeding, nothing restored."""
    if seed is None:
        yield lambda *_: None
        return

    def reseed(round_, kind):
        s = int(np.random.SeedSequence([seed, round_, kind]).generate_state(1)[0])
        torch.manual_seed(s)
        np.random.seed(s)
        random.seed(s)

    saved = (np.random.get_state(), random.getstate())
    with torch.random.fork_rng(devices=[]):
        try:
            yield reseed
        finally:
            np.random.set_state(saved[0])
            random.setstate(saved[1])


def _check(model, train_fn, eval_fn, rounds, prune_rate, rewind_to, scope, seed) -> list[str]:
    """The prunable layers' names, or an error naming the bad argument and the fix."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, fn in (("train_fn", train_fn), ("eval_fn", eval_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable ({name}(model)), got {type(fn).__name__}")
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1 (rounds of pruning after the dense training), got {rounds!r}")
    if isinstance(prune_rate, bool) or not isinstance(prune_rate, numbers.Real) or not 0 < prune_rate < 1:
        raise ValueError(f"prune_rate must be a fraction in (0, 1) of the surviving weights pruned per round "
                         f"(0.2 in the paper), got {prune_rate!r}")
    if isinstance(rewind_to, bool) or not isinstance(rewind_to, numbers.Integral) or rewind_to < 0:
        raise ValueError(f"rewind_to must be 0 (the initial weights) or a number k > 0 of train_fn's tick() "
                         f"calls (steps or epochs), got {rewind_to!r}")
    if rewind_to and not _takes_two(train_fn):
        raise TypeError(f"rewind_to={rewind_to} needs train_fn(model, tick), calling tick() after each step "
                        "or epoch; this train_fn takes one argument (or use rewind_to=0)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0, or None to use the global generators as they are; "
                         f"got {seed!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} ('uniform': each layer loses prune_rate), got {scope!r}")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE):
            continue
        if hasattr(module, "weight_orig"):
            raise ValueError(f"layer {name!r} already carries torch.nn.utils.prune's mask; call "
                             f"prune.remove(model.get_submodule({name!r}), 'weight') first")
        if isinstance(module.weight, nn.parameter.UninitializedParameter):
            raise ValueError(f"layer {name!r} is lazy and not initialized yet; call the model once on an input")
        names.append(name)
    if not names:
        raise ValueError(f"model {type(model).__name__} has no Linear or Conv layer to prune; lottery_ticket "
                         "prunes the weights of nn.Linear and nn.Conv1d/2d/3d modules")
    return names


def _takes_two(fn) -> bool:
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        return False
    except ValueError:            # no signature to read (some builtins): let the call decide
        return True
    return True
