"""What optimize did: a per-pass table, readable as text and as a dict.

    print(fast.fxopt_report)            # the table
    fast.fxopt_report.to_dict()         # plain data (JSON-able)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from fxopt.core.drift import Drift


@dataclass
class PassRecord:
    index: int
    name: str
    options: dict
    status: str = "ok"            # ok | disabled
    seconds: float | None = 0.0   # None (and nodes None): a compacted saved report left it out
    changed: bool = False
    stats: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    nodes: int | None = 0
    ir: str = ""
    drift: Drift | None = None

    def to_dict(self, with_ir: bool = False) -> dict:
        d = {"index": self.index, "pass": self.name, "options": dict(self.options),
             "status": self.status, "seconds": self.seconds, "changed": self.changed,
             "stats": dict(self.stats), "nodes": self.nodes, "counts": dict(self.counts),
             "drift": self.drift.as_dict() if self.drift else None}
        if with_ir:
            d["ir"] = self.ir
        return d


@dataclass
class Report:
    pipeline: str
    records: list = field(default_factory=list)
    stopped_after: str | None = None
    sections: dict = field(default_factory=dict)   # later stages add their own tables
    layers: list = field(default_factory=list)     # per-layer rows (plain dicts)
    summary: dict = field(default_factory=dict)    # size, MACs, latency before/after

    def add(self, record: PassRecord) -> None:
        self.records.append(record)

    def record(self, name: str) -> PassRecord:
        """The (last) record of pass `name`."""
        for r in reversed(self.records):
            if r.name == name:
                return r
        raise KeyError(f"no pass {name!r} in this report; passes: {[r.name for r in self.records]}")

    def to_dict(self, with_ir: bool = False) -> dict:
        return {"pipeline": self.pipeline, "stopped_after": self.stopped_after,
                "passes": [r.to_dict(with_ir) for r in self.records],
                "layers": self.layers, "summary": self.summary, "sections": self.sections}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """Rebuild a report from its to_dict() data (e.g. read back from a saved model).

            Report.from_dict(fast.fxopt_report.to_dict())   # prints the same table
        """
        report = cls(d["pipeline"], stopped_after=d.get("stopped_after"),
                     sections=dict(d.get("sections") or {}), layers=list(d.get("layers") or []),
                     summary=dict(d.get("summary") or {}))
        for r in d.get("passes", []):
            # a compressed file's report is compacted (fxopt.artifact.compress): no options,
            # timings, node or op counts, drift
            drift = Drift(**r["drift"]) if r.get("drift") else None
            report.add(PassRecord(r["index"], r["pass"], dict(r.get("options", {})), r["status"],
                                  r.get("seconds"), r["changed"], dict(r["stats"]), dict(r.get("counts", {})),
                                  r.get("nodes"), r.get("ir", ""), drift))
        return report

    def __str__(self) -> str:
        header = ("#", "pass", "ms", "changed", "nodes", "cosine", "sqnr dB", "max abs", "stats")
        rows = [header]
        for r in self.records:
            d = r.drift
            rows.append((
                str(r.index), r.name, _fmt_ms(r) if r.status == "ok" else r.status,
                "yes" if r.changed else "-", "-" if r.nodes is None else str(r.nodes),
                f"{d.cosine:.6f}" if d else "-", _fmt_db(d.sqnr_db) if d else "-",
                f"{d.max_abs:.2e}" if d else "-", _fmt_stats(r.stats)))
        if self.records and all(r.seconds is None for r in self.records):
            # compacted (a compressed file's): no timing, node count or drift columns; a
            # disabled pass says so where the others say whether they changed the graph
            rows = [(row[0], row[1], row[2] if row[2] != "-" else row[3], row[8]) for row in rows]
            rows[0] = ("#", "pass", "changed", "stats")
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [f"pipeline: {self.pipeline}"]
        for k, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.stopped_after:
            lines.append(f"(stopped after {self.stopped_after})")
        for title, text in self.sections.items():
            lines += ["", f"{title}:", str(text)]
        return "\n".join(lines)

    __repr__ = __str__


def _fmt_ms(r: PassRecord) -> str:
    return "-" if r.seconds is None else f"{r.seconds * 1e3:.1f}"


def _fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) and x > 0 else f"{x:.1f}"


def _fmt_stats(stats: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in stats.items() if v)
