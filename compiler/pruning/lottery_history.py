"""The record of a lottery-ticket run (fxopt.lottery_ticket): one row per round, a table, a plot.

    print(history)                 # round, sparsity, ticket, random reinit, dense
    history.plot("lottery.png")    # needs matplotlib: pip install fxopt[plot]
    history.rounds[-1].ticket      # the last ticket's metric
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LotteryRound:
    """One round: round 0 is the dense model; round r has pruned r times."""
    round: int
    sparsity: float                 # zero fraction of all prunable weights (linear and conv)
    ticket: float                   # eval_fn of the trained ticket (round 0: the dense model)
    control: float | None           # eval_fn of the same mask, randomly re-initialized and trained
    layers: dict = field(default_factory=dict)   # layer name -> zero fraction of its weight


@dataclass
class LotteryHistory:
    rounds: list[LotteryRound]
    prune_rate: float
    scope: str
    rewind_to: int
    higher_is_better: bool = True

    @property
    def dense(self) -> float:
        """The dense model's metric (round 0)."""
        return self.rounds[0].ticket

    def __str__(self) -> str:
        rewind = "initialization" if self.rewind_to == 0 else f"tick {self.rewind_to} of the dense training"
        scope = "per layer" if self.scope == "uniform" else "globally"
        better = "higher" if self.higher_is_better else "lower"
        head = (f"lottery ticket: {self.prune_rate:.0%} of the surviving weights pruned {scope} per round, "
                f"rewound to {rewind}; metric: {better} is better")
        cols = ("round", "sparsity", "ticket", "random reinit", "dense", "ticket - dense")
        rows = [(str(r.round), f"{r.sparsity:.1%}", f"{r.ticket:.4f}",
                 "-" if r.control is None else f"{r.control:.4f}", f"{self.dense:.4f}",
                 f"{r.ticket - self.dense:+.4f}") for r in self.rounds]
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (cols, *rows)]
        return "\n".join([head, *lines])

    def plot(self, path: str) -> str:
        """Save metric against sparsity (ticket, random reinit, dense) as an image at `path`."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("LotteryHistory.plot needs matplotlib, an optional extra: "
                              "pip install fxopt[plot]") from e
        fig = Figure(figsize=(6, 4))     # no pyplot: the caller's backend and figures stay untouched
        ax = fig.subplots()
        x = [100 * r.sparsity for r in self.rounds]
        ax.plot(x, [r.ticket for r in self.rounds], "o-", label="ticket (rewound)")
        control = [(100 * r.sparsity, r.control) for r in self.rounds if r.control is not None]
        if control:
            ax.plot(*zip(*control), "s--", label="random reinit, same mask")
        ax.axhline(self.dense, color="0.5", linestyle=":", label="dense")
        ax.set_xlabel("sparsity of prunable weights (%)")
        ax.set_ylabel(f"metric ({'higher' if self.higher_is_better else 'lower'} is better)")
        ax.set_title(f"lottery ticket, {self.prune_rate:.0%} per round")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        return path
