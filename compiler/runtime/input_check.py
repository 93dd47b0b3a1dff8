"""The input check a loaded model runs first, rebuilt from data instead of generated code.

torch.export guards a captured module with generated Python (`_guards_fn`);
fxopt.save cannot carry code, so it records each input's shape instead: an
int for a fixed size, a symbol name for a dynamic one (the same symbol on two
inputs means their sizes must match). Load puts an InputCheck where the guard
was, so a wrong input fails with a message naming it rather than deep inside
a kernel.

    specs = input_specs(gm)   # [{"name": "input_ids", "shape": ["s0", "s1"], "max": [None, 512]}, ...]
    InputCheck(specs)(ids, mask)       # ValueError if a fixed size or a shared size differs
"""
from __future__ import annotations

import re

import torch
from torch import fx, nn

from fxopt.core.errors import ArtifactError

GUARD = "_guards_fn"
_SYMBOL = re.compile(r"^[A-Za-z_]\w*$")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")


class InputCheck(nn.Module):
    """Checks the device, dtype, rank, fixed sizes, size limits and shared dynamic sizes of a
    graph's inputs. check() is the per-call form (the execution plan calls it directly):
    plain comparisons against rules read from the specs once, and the messages only when
    one fails."""

    def __init__(self, specs: list):
        super().__init__()
        self.specs = specs
        self._rules = [None if spec is None else _rules(spec) for spec in specs]
        counts: dict = {}
        for rules in self._rules:
            for _, symbol in (rules[3] if rules else ()):
                counts[symbol] = counts.get(symbol, 0) + 1
        self._tied = {symbol for symbol, n in counts.items() if n > 1}   # dims two inputs share

    def forward(self, *inputs) -> None:
        self.check(*inputs)

    def __getstate__(self):            # copies and pickles rebuild the generated check
        state = self.__dict__.copy()
        state.pop("_fast", None)
        return state

    def fast_check(self):
        """check() as one generated expression over these rules (the plan's first step): a
        call costs about a microsecond, where the loop over rules costs several."""
        fast = self.__dict__.get("_fast")
        if fast is None:
            fast = self.__dict__["_fast"] = _compile(self._rules, self._tied, self.check, self._explain)
        return fast

    def check(self, *inputs) -> None:
        seen, tied = {}, self._tied
        for rules, spec, x in zip(self._rules, self.specs, inputs):
            if rules is None or isinstance(x, fx.Proxy):        # a proxy: the graph is being traced
                continue
            if not isinstance(x, torch.Tensor):
                raise _not_a_tensor(spec, x)
            dtype, rank, fixed, symbols, limits = rules
            shape = x.shape
            if (dtype is not None and x.dtype is not dtype) or len(shape) != rank or not x.is_cpu:
                return self._explain(inputs)
            for d, size in fixed:
                if shape[d] != size:
                    return self._explain(inputs)
            for d, largest in limits:
                if shape[d] > largest:
                    return self._explain(inputs)
            for d, symbol in symbols:
                if symbol in tied and seen.setdefault(symbol, shape[d]) != shape[d]:
                    return self._explain(inputs)
        return None

    def _explain(self, inputs) -> None:
        """The error naming the first input that breaks its spec."""
        seen: dict = {}
        for spec, x in zip(self.specs, inputs):
            if spec is not None and isinstance(x, torch.Tensor):
                _check_one(spec, x, seen)


def _compile(all_rules: list, tied: set, loop, explain):
    """def check(x0, x1, ...): one `or` of comparisons, in the order the loop makes them (an
    input's rank before its sizes, so indexing never fails), then the shared sizes. Inputs
    that are not plain tensors take the loop."""
    names = [f"x{i}" for i in range(len(all_rules))]
    env = {"_T": torch.Tensor, "_loop": loop, "_explain": explain}
    checked = [i for i, rules in enumerate(all_rules) if rules is not None]
    lines = [f"def check({', '.join(n + '=None' for n in names)}):"]
    if checked:
        lines.append(f"    if {' or '.join(f'type(x{i}) is not _T' for i in checked)}:")
        lines.append(f"        return _loop({', '.join(names)})")
        lines += [f"    s{i} = x{i}.shape" for i in checked]
    tests, first = [], {}
    for i in checked:
        dtype, rank, fixed, symbols, limits = all_rules[i]
        if dtype is not None:
            env[f"_d{i}"] = dtype
            tests.append(f"x{i}.dtype is not _d{i}")
        tests += [f"len(s{i}) != {rank}", f"not x{i}.is_cpu"]
        tests += [f"s{i}[{d}] != {size}" for d, size in fixed]
        tests += [f"s{i}[{d}] > {largest}" for d, largest in limits]
        for d, symbol in symbols:
            if symbol in tied:
                j, dj = first.setdefault(symbol, (i, d))
                if j != i or dj != d:
                    tests.append(f"s{i}[{d}] != s{j}[{dj}]")
    if tests:
        lines.append(f"    if {' or '.join(tests)}:")
        lines.append(f"        return _explain(({', '.join(names)},))")
    lines.append("    return None")
    exec(compile("\n".join(lines) + "\n", "<fxopt input check>", "exec"), env)   # our own source
    return env["check"]


def _rules(spec: dict) -> tuple:
    """(dtype or None, rank, ((dim, fixed size), ...), ((dim, symbol), ...), ((dim, limit), ...))."""
    shape = spec["shape"]
    return (getattr(torch, spec["dtype"]) if "dtype" in spec else None, len(shape),
            tuple((d, s) for d, s in enumerate(shape) if isinstance(s, int)),
            tuple((d, s) for d, s in enumerate(shape) if isinstance(s, str)),
            tuple((d, b) for d, b in enumerate(spec.get("max") or ()) if b is not None))


def _not_a_tensor(spec: dict, x) -> TypeError:
    """The error for a value that is not a tensor where the model takes one (it would reach
    a kernel op, which could only say that its argument has the wrong type)."""
    module = type(x).__module__.split(".")[0]
    kind = type(x).__name__ if module == "builtins" else f"{module}.{type(x).__name__}"
    fix = ("convert it with torch.from_numpy(...)" if kind == "numpy.ndarray" else
           "pass each tensor as the model's own argument, as in the example inputs it was optimized with"
           if isinstance(x, (list, tuple, dict)) else "pass a tensor (torch.as_tensor converts numbers and arrays)")
    return TypeError(f"input '{spec['name']}' must be a torch.Tensor (shape {_wanted(spec['shape'])} "
                     f"(* = any size), {spec.get('dtype', 'any dtype')}), got {kind}: {fix}")


def _wanted(shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else "*" for d in shape) + "]"


def _check_one(spec: dict, x: torch.Tensor, seen: dict) -> None:
    name, shape, largest = spec["name"], spec["shape"], spec.get("max") or ()
    wanted = _wanted(shape)
    if x.device.type != "cpu":
        raise ValueError(f"input '{name}' is on {x.device}; fxopt models run on the CPU: pass it as .cpu()")
    got = str(x.dtype).removeprefix("torch.")
    if spec.get("dtype", got) != got:
        raise TypeError(f"input '{name}' must be {spec['dtype']} like the example the model was optimized "
                        f"with, got {got} (shape {wanted}); convert it with .to(torch.{spec['dtype']})")
    if x.dim() != len(shape):
        raise ValueError(f"input '{name}' must have {len(shape)} dims {wanted} (* = any size), "
                         f"got shape {list(x.shape)}")
    for d, (want, got) in enumerate(zip(shape, x.shape)):
        if isinstance(want, int) and want != got:
            raise ValueError(f"input '{name}' dim {d} must be {want}, got shape {list(x.shape)}: the model "
                             f"fixed that size when it was optimized (shape {wanted}, * = any size). To call "
                             f"it with size {got} there, optimize it again with example_inputs of the size "
                             f"you will call it with")
        if d < len(largest) and largest[d] is not None and got > largest[d]:
            raise ValueError(f"input '{name}' dim {d} is {got}, but the model takes at most {largest[d]} "
                             f"there (a limit of the model, e.g. its position table, found when it was "
                             f"captured; shape {wanted}): pass at most {largest[d]}")
        if isinstance(want, str):
            first = seen.setdefault(want, (name, d, got))
            if first[2] != got:
                raise ValueError(f"input '{name}' dim {d} is {got} but input '{first[0]}' dim "
                                 f"{first[1]} is {first[2]}; the model needs them equal")


def input_specs(gm: fx.GraphModule) -> list | None:
    """Each placeholder's {"name", "shape"} (None where unknown); None if no shape is known."""
    guard = getattr(gm, GUARD, None)
    if isinstance(guard, InputCheck):
        return guard.specs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = gm.meta.get("fxopt_capture", {}).get("input_names") or []
    if len(names) != len(placeholders):
        names = [n.name for n in placeholders]
    specs = [_spec(name, n.meta.get("val")) for name, n in zip(names, placeholders)]
    return specs if any(specs) else None


def _spec(name: str, val):
    if not isinstance(val, torch.Tensor):
        return None
    shape, largest = [], []
    for size in val.shape:
        text = str(size)
        # Why None: a size that is an expression of symbols is checked by the ops, not here.
        shape.append(int(text) if text.isdigit() else text if _SYMBOL.match(text) else None)
        largest.append(_upper_bound(size) if isinstance(shape[-1], str) else None)
    spec = {"name": name, "shape": shape, "dtype": str(val.dtype).removeprefix("torch.")}
    if any(b is not None for b in largest):
        spec["max"] = largest
    return spec


def _upper_bound(size):
    """The largest value torch.export found a dynamic size may take (e.g. a position table's
    length), or None if unbounded. Lower bounds are not kept: export assumes sizes >= 2 to
    keep 0 and 1 apart, which batch 1 does not break."""
    node = getattr(size, "node", None)
    env = getattr(node, "shape_env", None)
    if env is None:
        return None
    bound = env.var_to_range.get(node.expr)
    upper = getattr(bound, "upper", None)
    try:
        return int(upper) if upper is not None and upper.is_finite else None
    except (TypeError, AttributeError):
        return None


def install(gm: fx.GraphModule, specs) -> None:
    """Validate `specs` (read from a file, or input_specs of a graph) and make an InputCheck
    the graph's first step, in place of torch.export's generated guard if it has one."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not isinstance(specs, list) or len(specs) != len(placeholders):
        raise ArtifactError("corrupt input specs: not one per graph input")
    for spec in specs:
        if spec is not None and not _valid(spec):
            raise ArtifactError(f"corrupt input spec {spec!r:.80}")
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == GUARD]
    gm.add_submodule(GUARD, InputCheck(specs))
    if not calls:
        with gm.graph.inserting_after(placeholders[-1]):
            gm.graph.call_module(GUARD, tuple(placeholders))
    else:
        for call in calls:
            call.args = tuple(placeholders)
    gm.recompile()


def _valid(spec) -> bool:
    largest = spec.get("max", []) if isinstance(spec, dict) else None
    return (isinstance(spec, dict) and isinstance(spec.get("name"), str)
            and isinstance(spec.get("shape"), list) and set(spec) <= {"name", "shape", "dtype", "max"}
            and spec.get("dtype", "float32") in _DTYPES
            and all(d is None or (type(d) is int and d >= 0) or (isinstance(d, str) and _SYMBOL.match(d))
                    for d in spec["shape"])
            and isinstance(largest, list) and len(largest) <= len(spec["shape"])
            and all(b is None or (type(b) is int and b >= 0) for b in largest))
