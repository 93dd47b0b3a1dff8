"""What one call of an execution plan spends where (Plan.profile builds it)."""
from __future__ import annotations

import statistics


class Profile:
    """Per-step times of a plan on one input: op, layer, output shape and dtype, us (median
    over the timed calls), % of the call, whether the step is a kernel; and the time of a
    plain call outside the steps (binding inputs, moving arrays between torch and numpy,
    building the output). str() is a table, slowest steps first."""

    def __init__(self, plan, runs: list, outputs: list, timed_call: float, call: float):
        """runs: per timed call, each step's seconds; timed_call, call: median seconds of a
        call timing each step and of a plain one."""
        self.rows = []
        for i, (step, (shape, dtype)) in enumerate(zip(plan.steps, outputs)):
            node = step.node
            self.rows.append({"op": step.op, "layer": node.meta.get("fxopt_layer", node.name),
                              "shape": shape, "dtype": dtype, "kernel": step.kernel,
                              "us": statistics.median_high([run[i] for run in runs]) * 1e6})
        self.repeats = len(runs)                 # timed calls (and as many plain ones)
        self.call_us = call * 1e6                # median plain call, as a user makes it
        self.timed_call_us = timed_call * 1e6    # median call timing each step
        # the steps' (and the kernel steps') share of a call: their sum within each timed call,
        # the median over calls. A sum of per-step medians would fall short of it: a step's
        # time is skewed (a median below its mean), and hundreds of steps add that up.
        kernels = [i for i, r in enumerate(self.rows) if r["kernel"]]
        self.steps_us = statistics.median_high([sum(run) for run in runs]) * 1e6
        self.kernel_us = statistics.median_high([sum(run[i] for i in kernels) for run in runs]) * 1e6

    @property
    def outside_us(self) -> float:
        """Time of a plain call not spent in any step."""
        return max(self.call_us - self.steps_us, 0.0)

    @property
    def outside_kernels_pct(self) -> float:
        """% of a plain call not spent in kernel steps (other ops and glue)."""
        return 100.0 * max(self.call_us - self.kernel_us, 0.0) / (self.call_us or 1.0)

    def __str__(self) -> str:
        total = self.call_us or 1.0
        lines = [f"{'op':<28} {'layer':<40} {'output':<22} {'dtype':<8} {'us':>9} {'%':>6}"]
        for r in sorted(self.rows, key=lambda r: -r["us"]):
            lines.append(f"{r['op'][:28]:<28} {str(r['layer'])[:40]:<40} {str(r['shape'])[:22]:<22} "
                         f"{r['dtype']:<8} {r['us']:9.1f} {100 * r['us'] / total:6.1f}")
        lines.append(f"{'outside steps':<28} {'':<40} {'':<22} {'':<8} {self.outside_us:9.1f} "
                     f"{100 * self.outside_us / total:6.1f}")
        lines.append(f"call {self.call_us:.1f} us (median; {self.timed_call_us:.1f} us when timing each step); "
                     f"kernel steps {self.kernel_us:.1f} us; outside kernels {self.outside_kernels_pct:.1f} %")
        return "\n".join(lines)
