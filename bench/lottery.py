"""Lottery tickets on an MLP of LeNet-300-100's shape (64 -> 300 -> 100 -> 10) on sklearn's digits.

    python -m fxopt.bench.lottery                        # seeds 0-4, five rounds of 20 %
    python -m fxopt.bench.lottery --seeds 0 --rewind-to 2 --plot lottery.png

Per seed: the model is built from that seed, fxopt.lottery_ticket(seed=seed) runs the
rounds, and the table gives per round the sparsity and the test accuracy of the ticket,
of the same mask randomly re-initialized, and of the dense model. The summary gives
mean and spread (sample std) over the seeds, and in how many seeds the ticket is within
0.5 point of dense and above the random control. Training as in the paper's LeNet
(Adam, lr 1.2e-3) with batches of 64, a fixed number of epochs; test accuracy on the
449 held-out images (one image is 0.22 point).
"""
from __future__ import annotations

import argparse
import platform
import statistics

import torch
from torch import nn

import fxopt
from fxopt.examples import Digits, accuracy, digits


def lenet_300_100(seed: int = 0, inputs: int = 64, classes: int = 10) -> nn.Module:
    """LeNet-300-100's shape for flattened 8x8 digits, initialized from `seed`."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                          nn.Linear(100, classes))
    torch.random.set_rng_state(gen_state)
    return model


def make_train_fn(data: Digits, epochs: int = 20, lr: float = 1.2e-3, batch_size: int = 64):
    """train_fn(model, tick=None): Adam, cross-entropy, one tick per epoch. The batch order
    comes from torch's global generator, which lottery_ticket seeds per round."""
    def train_fn(model: nn.Module, tick=None):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(tick.start if tick else 0, epochs):
            for x, y in data.batches(batch_size, seed=int(torch.randint(2 ** 31, ()))):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            if tick:
                tick()
        model.eval()
    return train_fn


def run_seed(seed: int, data: Digits, rounds: int = 5, prune_rate: float = 0.2, rewind_to: int = 0,
             epochs: int = 20, lr: float = 1.2e-3, scope: str = "uniform", progress: bool = False):
    """(ticket, history) of one seed."""
    return fxopt.lottery_ticket(lenet_300_100(seed), make_train_fn(data, epochs, lr),
                                lambda m: accuracy(m, data.x_test, data.y_test), rounds=rounds,
                                prune_rate=prune_rate, rewind_to=rewind_to, scope=scope, seed=seed,
                                progress=progress)


def _spread(values) -> str:
    values = [100 * v for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def summary(histories) -> str:
    """Per round over the seeds: sparsity, accuracies in % (mean ± std), and how many seeds
    have the ticket within 0.5 point of dense and above the random control."""
    cols = ("round", "sparsity", "ticket %", "random reinit %", "dense %", "ticket - dense (pt)",
            "within 0.5 pt", "ticket > reinit")
    rows = []
    for r in range(len(histories[0].rounds)):
        got = [h.rounds[r] for h in histories]
        controls = [g.control for g in got if g.control is not None]
        within = sum(g.ticket >= h.dense - 0.005 for g, h in zip(got, histories))
        above = sum(g.control is not None and g.ticket > g.control for g in got)
        rows.append((str(r), f"{got[0].sparsity:.1%}", _spread([g.ticket for g in got]),
                     _spread(controls) if controls else "-", _spread([h.dense for h in histories]),
                     _spread([g.ticket - h.dense for g, h in zip(got, histories)]),
                     f"{within}/{len(got)}", f"{above}/{len(got)}" if controls else "-"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (cols, *rows))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fxopt bench lottery", description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="seeds, one model and run each (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=5, help="pruning rounds (default: %(default)s)")
    ap.add_argument("--prune-rate", type=float, default=0.2,
                    help="fraction of the surviving weights pruned per round (default: %(default)s)")
    ap.add_argument("--rewind-to", type=int, default=0,
                    help="epochs of dense training to rewind to (default: %(default)s, the initial weights)")
    ap.add_argument("--scope", default="uniform", choices=("uniform", "global"),
                    help="prune each layer by the rate, or the smallest across layers (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs per round (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1.2e-3, help="Adam learning rate (default: %(default)s)")
    ap.add_argument("--plot", default=None, help="save the first seed's history as this PNG (default: no plot)")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"1 thread; LeNet-300-100 shape on digits, Adam lr {ns.lr}, {ns.epochs} epochs, batch 64")
    data = digits()
    histories = []
    for seed in ns.seeds:
        _, history = run_seed(seed, data, ns.rounds, ns.prune_rate, ns.rewind_to, ns.epochs, ns.lr, ns.scope,
                              progress=True)
        print(f"\nseed {seed}\n{history}", flush=True)
        histories.append(history)
    print(f"\nover {len(histories)} seed(s) ({', '.join(map(str, ns.seeds))}), test accuracy in %, mean ± std\n"
          f"{summary(histories)}")
    if ns.plot:
        print(f"plot: {histories[0].plot(ns.plot)}")


if __name__ == "__main__":
    main()
