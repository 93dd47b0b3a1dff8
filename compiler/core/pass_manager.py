"""Run a pipeline over a graph and record what every pass did.

For every pass the manager records wall time, whether the graph changed, the
pass's statistics, node counts by op, numeric drift against the unoptimized
model on the example inputs, and the IR after it. Instruments plug in here,
never into passes: print the IR after named passes, dump every stage to a
folder, stop after a pass, disable passes.

    pm = PassManager(pipeline, ctx, reference=eager_outputs, dump_dir="stages/")
    gm, report = pm.run(gm)
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from fxopt.core import ir
from fxopt.core.drift import Drift, drift
from fxopt.core.errors import FxoptError, PassError, PipelineError
from fxopt.core.pass_base import PassContext, PassResult
from fxopt.core.pipeline import Pipeline
from fxopt.core.printer import format_ir
from fxopt.core.registry import get_pass
from fxopt.core.report import PassRecord, Report


@dataclass
class Instruments:
    """Debugging switches; every one is optional.

    print_ir_after: pass names (or "all") whose output IR is printed.
    dump_dir: folder that receives NNN_<pass>.txt (and .png) for every stage.
    stop_after: the pipeline stops after this pass.
    disable: passes skipped (recorded as disabled).
    drift: measure drift against the reference after every pass.
    """
    print_ir_after: tuple = ()
    dump_dir: str | None = None
    stop_after: str | None = None
    disable: tuple = ()
    drift: bool = True
    printer: object = print


@dataclass
class PassManager:
    pipeline: Pipeline
    ctx: PassContext = field(default_factory=PassContext)
    reference: object = None
    instruments: Instruments = field(default_factory=Instruments)
    keep_snapshots: bool = False   # keep the graph before every pass (for bisect)
    snapshots: dict = field(default_factory=dict)

    def __post_init__(self):
        names = self.pipeline.names
        for option, value in (("stop_after", self.instruments.stop_after),):
            if value is not None and value not in names:
                raise PipelineError(f"{option}={value!r} is not in the pipeline: {', '.join(names)}")
        unknown = [d for d in self.instruments.disable if d not in names]
        if unknown:
            raise PipelineError(f"cannot disable {', '.join(unknown)}: not in the pipeline "
                                f"({', '.join(names)})")

    def run(self, gm: GraphModule) -> tuple[GraphModule, Report]:
        """Run every pass in order; returns the rewritten graph and the report."""
        ir.ensure_ids(gm)
        report = Report(pipeline=str(self.pipeline))
        report.add(self._record_input(gm))
        for index, spec in enumerate(self.pipeline, start=1):
            if spec.name in self.instruments.disable:
                report.add(PassRecord(index, spec.name, spec.options, status="disabled"))
                continue
            record = self._run_one(gm, index, spec, report)
            report.add(record)
            self._instrument(gm, record)
            if spec.name == self.instruments.stop_after:
                report.stopped_after = spec.name
                break
        return gm, report

    def _record_input(self, gm: GraphModule) -> PassRecord:
        record = PassRecord(0, "input", {}, status="ok", counts=ir.node_counts(gm),
                            nodes=_n_nodes(gm), ir=format_ir(gm))
        record.drift = self._drift(gm)
        self._instrument(gm, record)
        return record

    def _run_one(self, gm: GraphModule, index: int, spec, report: Report) -> PassRecord:
        module = get_pass(spec.name)
        # "a|b": either pass will do (lower_to_kernels lowers quantize_int8's or quantize_bf16's ops)
        missing = [r for r in module.PASS.requires if not any(a in self.ctx.ran for a in r.split("|"))]
        if missing:
            raise PipelineError(f"pass {spec.name} requires {', '.join(missing)} to run before it; "
                                f"pipeline: {self.pipeline}")
        options = {**module.PASS.options, **spec.options}
        before = snapshot(gm)
        if self.keep_snapshots:
            self.snapshots[index] = before
        start = time.perf_counter()
        try:
            result = module.run(gm, self.ctx, **options)
            if not isinstance(result, PassResult):
                raise PassError(f"pass {spec.name} returned {type(result).__name__}, not PassResult")
            ir.finish(gm)
            ir.lint(gm)
        except FxoptError as e:
            if not isinstance(e, PassError):
                raise  # the user's input is wrong, not the pass: the error already says what to do
            raise self._failure(spec.name, index, report, before, e) from e
        except Exception as e:
            raise self._failure(spec.name, index, report, before, e) from e
        seconds = time.perf_counter() - start
        self.ctx.ran.append(spec.name)
        record = PassRecord(index, spec.name, spec.options, status="ok", seconds=seconds,
                            changed=result.changed, stats=dict(result.stats),
                            counts=ir.node_counts(gm), nodes=_n_nodes(gm), ir=format_ir(gm))
        previous = next((r.drift for r in reversed(report.records) if r.drift is not None), None)
        if not result.changed and previous is not None:
            record.drift = previous  # the same graph computes the same values: no need to run it
            return record
        try:
            record.drift = self._drift(gm)
        except Exception as e:
            raise self._failure(spec.name, index, report, before, e, "running the graph it produced") from e
        return record

    def _failure(self, name, index, report, before, error, doing="running it") -> PassError:
        ran = [r.name for r in report.records if r.index > 0 and r.status == "ok"]
        where = ""
        if self.instruments.dump_dir:
            path = os.path.join(self.instruments.dump_dir, f"{index:03d}_{name}.before.txt")
            _write(path, format_ir(before))
            where = f"; the IR before it is in {path}"
        err = PassError(
            f"pass {name} (#{index} in {self.pipeline}) failed while {doing}: "
            f"{type(error).__name__}: {error}. Passes that ran before it: "
            f"{', '.join(ran) or 'none'}{where}. Replay with the graph in "
            f"error.graph_before, or disable the pass (disable=[{name!r}]).")
        err.graph_before = before
        err.ir_before = format_ir(before)
        err.pass_name = name
        return err

    def _drift(self, gm: GraphModule) -> Drift | None:
        if not self.instruments.drift or self.reference is None:
            return None
        with torch.no_grad():
            args, kwargs = self.ctx.probe_inputs
            out = gm(*args, **kwargs)
        return drift(self.reference, out)

    def _instrument(self, gm: GraphModule, record: PassRecord) -> None:
        wanted = self.instruments.print_ir_after
        if wanted == "all" or "all" in wanted or record.name in wanted:
            self.instruments.printer(f"// IR after {record.name}\n{record.ir}")
        if self.instruments.dump_dir:
            stem = os.path.join(self.instruments.dump_dir, f"{record.index:03d}_{record.name}")
            _write(stem + ".txt", record.ir)
            from fxopt.core.render import render_graph
            render_graph(gm, stem + ".png", title=f"after {record.name}")


def snapshot(gm: GraphModule) -> GraphModule:
    """A copy of the graph sharing gm's weights: passes never edit weights in place."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen  # in/out pytree specs: read-only, shared
    copied = GraphModule(gm, graph)
    copied.meta = dict(gm.meta)
    return copied


def _n_nodes(gm: GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
