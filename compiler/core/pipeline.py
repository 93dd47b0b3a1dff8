"""Pipelines are data: an ordered list of pass names with options.

A pipeline prints as one line and parses back, so a user can reproduce or
shorten one from the command line:

    >>> p = Pipeline.parse("fold_batchnorm,prune_channels{ratio=0.3}")
    >>> str(p)
    'fold_batchnorm,prune_channels{ratio=0.3}'

A target is a named pipeline.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from fxopt.core.errors import PipelineError
from fxopt.core.registry import get_pass, pass_names

# The front every target shares: clean the graph, then fold what can be folded.
_FP32 = ("eliminate_dead_code,remove_identity,fold_padding,fold_constants,fold_batchnorm,"
         "fuse_epilogues,fuse_parallel_linears,eliminate_dead_code")

_INT8 = ("smooth_activations,calibrate_ranges,quantize_int8,lower_to_kernels,propagate_nonfinite,"
         "eliminate_dead_code")

TARGETS: dict[str, str] = {
    "cpu-fp32": _FP32,
    "cpu-int8": f"{_FP32},{_INT8}",
    "cpu-int4": f"{_FP32},{_INT8}".replace("quantize_int8", "quantize_int4,quantize_int8"),
    "cpu-bf16": f"{_FP32},quantize_bf16,lower_to_kernels,propagate_nonfinite,eliminate_dead_code",
}
TARGET_DOCS = {
    "cpu-fp32": "graph clean-up and fusion; outputs equal the original within fp32 round-off",
    "cpu-int8": "cpu-fp32, then int8 weights and activations lowered to the Numba kernels",
    "cpu-int4": "cpu-int8, but linears take int4 weights in groups of 32 along K (quantize_int4{group_size=64} "
                "or 128 for coarser groups; a linear whose K the group size does not divide stays int8); "
                "activations int8, convs, embeddings and attention as cpu-int8",
    "cpu-bf16": "cpu-fp32, then linears in bf16 (weights and activations rounded to bf16, fp32 accumulation: "
                "the same numbers on every CPU); convs, attention, layer norms and embeddings stay fp32; a linear "
                "the bf16 kernel runs slower than fp32 stays fp32 (latency_aware)",
}


@dataclass(frozen=True)
class PassSpec:
    name: str
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        inner = ",".join(f"{k}={_fmt_value(v)}" for k, v in self.options.items())
        return f"{self.name}{{{inner}}}"


@dataclass(frozen=True)
class Pipeline:
    passes: tuple

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    @staticmethod
    def parse(text: str) -> "Pipeline":
        """Parse `a,b{k=v,k2=v2},c`; every name must be a known pass and every option one it takes."""
        specs = []
        for name, body in _split(text):
            options = dict(_parse_option(name, item) for item in _split_top(body) if item) if body else {}
            specs.append(PassSpec(name, options))
        pipeline = Pipeline(tuple(specs))
        pipeline.validate()
        return pipeline

    def validate(self) -> None:
        for spec in self.passes:
            info = get_pass(spec.name).PASS
            unknown = set(spec.options) - set(info.options)
            if unknown:
                valid = ", ".join(sorted(info.options)) or "none"
                raise PipelineError(
                    f"pass {spec.name} has no option {', '.join(sorted(unknown))}; its options: {valid}")


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and quotes: 'a{x=(1,2)},b' -> ['a{x=(1,2)}', 'b']."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced {ch!r} at position {i} in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth or quote:
        raise PipelineError(f"cannot parse pipeline {text!r}: unclosed bracket or quote")
    parts.append(text[start:])
    return [p.strip() for p in parts]


_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\{(.*)\})?$", re.S)


def _split(text: str):
    if not text.strip():
        raise PipelineError("empty pipeline; give pass names separated by commas, e.g. 'fold_batchnorm,fuse_epilogues'")
    for item in _split_top(text.strip()):
        m = _NAME.match(item)
        if not m:
            raise PipelineError(f"cannot parse pipeline item {item!r}: expected name or name{{key=value,...}}")
        yield m.group(1), m.group(2)


def _parse_option(pass_name: str, item: str):
    if "=" not in item:
        raise PipelineError(f"option {item!r} of pass {pass_name} must be key=value")
    key, raw = (s.strip() for s in item.split("=", 1))
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return key, value


def _fmt_value(v) -> str:
    return v if isinstance(v, str) else repr(v)


def target_pipeline(target: str) -> Pipeline:
    """The pipeline of a named target, or of a pipeline string given in its place."""
    if target in TARGETS:
        return Pipeline.parse(TARGETS[target])
    if "," in target or "{" in target or target in pass_names():
        return Pipeline.parse(target)
    raise PipelineError(f"unknown target {target!r}; valid targets: {', '.join(TARGETS)}, "
                        f"or a pipeline string of passes ({', '.join(pass_names())})")
