"""The `fxopt` command.

    fxopt passes                                   targets and their pipelines
    fxopt inspect tests/zoo.py:bert --print-ir-after fold_batchnorm
    fxopt bisect mypkg.models:build --target cpu-fp32 --tol 1e-4
    fxopt optimize tests/zoo.py:bert --target cpu-int8 --calib data.pt -o bert.fxopt
    fxopt report bert.fxopt                        the stored report of a saved model
    fxopt demo                                     digits CNN, before and after
    fxopt warmup                                   compile the kernels for this CPU ahead of time
    fxopt bench gemm|prune|models|lottery|int4|bf16  benchmarks (see bench/)
    fxopt --version                                fxopt, torch and numba versions
    fxopt COMMAND --help                           every option and its default

A model is given as `module.path:factory` or `path/to/file.py:factory`; the
factory returns `(model, example_inputs)` (further items are ignored) or just
a model, whose input shape then comes from --input-shape.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import warnings

from fxopt.core.errors import FxoptError, NoCalibrationWarning

BENCHES = {"gemm": "fxopt.bench.gemm", "prune": "fxopt.bench.prune", "models": "fxopt.bench.models",
           "lottery": "fxopt.bench.lottery", "int4": "fxopt.bench.int4", "bf16": "fxopt.bench.bf16"}

BENCH_HELP = """run a benchmark. Each prints the versions, threads and CPU with its numbers, prints
rows as they are measured, and writes files only when given --out PATH.

  gemm    int8 GEMM kernels against torch fp32 and torch dynamic int8 (fbgemm) on BERT
          and ResNet-50 GEMM shapes: GOP/s, % of the measured multiply-accumulate peak,
          convs end to end, call overhead. Under a minute on 2 cores (warm kernel
          cache); --quick (BERT shapes only, 7 repeats): about 15 seconds.
  prune   latency of structured pruning (0, 30, 50%) on a BERT-base encoder and a
          ResNet-50, fp32 and int8. Roughly 10-20 minutes on 2 cores; --models bert
          --layers 2 --repeats 3: about a minute.
  models  whole models (BERT-base, ResNet-50, MobileNetV2) through fxopt against torch,
          ONNX Runtime and OpenVINO, fp32 and int8: latency, speedup, cosine, memory. Tens
          of minutes on 2 cores; --small (tiny configs): a few minutes.
  lottery lottery tickets on an MLP of LeNet-300-100's shape on the digits: per round the
          sparsity and the accuracy of the ticket, a random re-init and the dense model
          (five seeds, about 2 minutes).
  int4    a 4096 x 4096 linear through optimize, cpu-int4 against cpu-int8 at M = 1, 8, 128
          (interleaved medians; a few minutes); --bert adds BERT-base fidelity to fp32 and
          file size against int8 (about 10 minutes).
  bf16    cpu-bf16 against eager fp32 and cpu-int8 on three linears (1x4096x4096, 8x768x768,
          128x768x3072) and BERT-base from config (8x128, 1x32 tokens: time and min cosine to
          fp32); prints the CPU and the bf16 kernel path (--quick: about a minute).

`fxopt bench KIND --help` lists a benchmark's options."""

CALIB_HELP = """calibration data (--calib):
  a .pt/.pth file written with torch.save (loaded weights-only: tensors in lists,
  tuples and dicts), holding either
    a list of inputs, one item per model call, each like the example inputs
    (a tensor, a tuple of positional tensors, or a dict of keyword tensors):
        torch.save([x1, x2, x3], "batches.pt")
    or one batched tensor, cut into batches of --calib-batch rows:
        torch.save(x_all, "calib.pt")
  or module:function (or file.py:function) returning such a list.
A few batches of real inputs are enough. Without --calib, static activation ranges
come from the example inputs alone and real inputs outside them are clipped."""


def main(argv=None) -> int:
    parser = _parser()
    ns = parser.parse_args(argv)      # a benchmark's own options reach it through ns.args
    _compile_notice(ns)
    try:
        with _warnings_in_cli_terms(ns):
            return ns.func(ns) or 0
    except FxoptError as e:
        print(f"fxopt: error: {e}", file=sys.stderr)
        return 2


def _compile_notice(ns) -> None:
    """Say that kernels will compile before loading the model (importing its library and
    building it can take seconds): an int8 target and an empty kernel cache."""
    if not getattr(ns, "target", None) or str(getattr(ns, "model", "")).endswith(".fxopt"):
        return
    from fxopt.core.pipeline import target_pipeline
    from fxopt.driver.compile_notice import NOTICE
    try:
        names = target_pipeline(ns.target).names
    except FxoptError:
        return          # optimize says what is wrong with the target
    NOTICE.before(names)


@contextlib.contextmanager
def _warnings_in_cli_terms(ns):
    """Show warnings whose advice names a Python argument in the command line's terms.

    Only the wording changes: a warning the user's filters hide stays hidden.
    """
    show = warnings.showwarning

    def reword(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, NoCalibrationWarning):
            print(f"fxopt: warning: {_no_calibration_advice(ns)}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    warnings.showwarning = reword
    try:
        yield
    finally:
        warnings.showwarning = show


def _no_calibration_advice(ns) -> str:
    if hasattr(ns, "calib"):
        return ("no --calib was given, so static activation ranges were calibrated on the example inputs "
                "only; real inputs outside those ranges will be clipped. Give --calib FILE.pt with a few "
                "batches of real inputs (`fxopt optimize --help` shows the format).")
    return (f"static activation ranges were calibrated on the example inputs only: `fxopt {ns.command}` "
            "takes no calibration data (`fxopt optimize --calib FILE.pt` does).")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxopt", description="make PyTorch models small and fast on CPUs")
    p.add_argument("--version", action=_Version, help="print the versions of fxopt, torch and numba, and exit")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("passes", help="list targets, their pipelines, and every pass",
                       description="list targets, their pipelines, and every pass")
    s.set_defaults(func=_cmd_passes)

    for name, func, help_ in (("inspect", _cmd_inspect, "run a pipeline and print the per-pass table"),
                              ("bisect", _cmd_bisect, "find the first pass and node over a drift tolerance")):
        s = sub.add_parser(name, help=help_, description=help_)
        _model_arguments(s, "cpu-fp32")
        s.set_defaults(func=func)
        if name == "inspect":
            s.add_argument("--print-ir-after", default="", metavar="PASSES",
                           help="print the IR after these passes (comma-separated) or 'all' (default: none)")
            s.add_argument("--dump-dir", metavar="DIR",
                           help="write NNN_<pass>.txt/.png for every stage to DIR (default: no dump)")
            s.add_argument("--stop-after", metavar="PASS", help="stop the pipeline after PASS (default: run all)")
            s.add_argument("--disable", default="", metavar="PASSES",
                           help="passes to skip, comma-separated (default: none)")
        else:
            s.add_argument("--tol", type=float, default=1e-4,
                           help="drift tolerance: a pass fails when max_abs is above it, or sqnr (dB) or "
                                "cosine below it (default: %(default)s)")
            s.add_argument("--metric", default="max_abs", choices=("max_abs", "sqnr", "cosine"),
                           help="drift metric compared with --tol (default: %(default)s)")

    s = sub.add_parser("optimize", help="optimize a model and save it to one file",
                       description="optimize a model and save it to one file", epilog=CALIB_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(s, "cpu-int8")
    s.add_argument("--calib", metavar="FILE.pt|module:function",
                   help="calibration data, see below (default: none: static ranges come from the example "
                        "inputs alone, with a warning)")
    s.add_argument("--calib-batch", type=int, default=8, metavar="N",
                   help="rows per batch when --calib holds one batched tensor (default: %(default)s)")
    s.add_argument("--prune", type=float, metavar="RATIO",
                   help="structured pruning: the fraction of channels, neurons and heads to remove, "
                        "e.g. 0.3 (default: no pruning)")
    s.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="where to write the optimized model (.fxopt); required")
    s.set_defaults(func=_cmd_optimize)

    s = sub.add_parser("profile", help="time each step of an optimized model's execution plan",
                       description="time each step of an optimized model's execution plan")
    _model_arguments(s, "cpu-int8", saved=True)
    s.add_argument("--inputs", metavar="FILE.pt",
                   help="inputs: torch.save of a tensor, a tuple of them or a dict of keyword inputs; "
                        "required for a saved model (default: the factory's example inputs)")
    s.add_argument("--repeats", type=int, default=None,
                   help="timed calls (default: about 2 s of them, 20 to 200)")
    s.add_argument("--top", type=int, default=30, help="rows shown, slowest first; 0 = all (default: %(default)s)")
    s.set_defaults(func=_cmd_profile)

    s = sub.add_parser("report", help="print the report stored in a saved model",
                       description="print the report stored in a saved model")
    s.add_argument("path", help="a model written by `fxopt optimize` or fxopt.save (.fxopt)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("demo", help="train a small CNN on sklearn's digits, optimize it, compare",
                       description="train a small CNN on sklearn's digits, optimize it, compare")
    s.add_argument("--target", default=None,
                   help="target name or pipeline string (default: cpu-int8 when available, else cpu-fp32)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("warmup", help="compile every kernel for this CPU now (2-4 minutes on 2 cores, once), "
                                      "into the cache folder (~/.cache/fxopt or $FXOPT_CACHE_DIR), e.g. in a "
                                      "Docker build step; later processes compile nothing",
                       description="compile every kernel for this CPU now, into the cache folder")
    s.set_defaults(func=_cmd_warmup)

    s = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHES), description=BENCH_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("which", choices=sorted(BENCHES), help="the benchmark to run (see above)")
    s.add_argument("args", nargs=argparse.REMAINDER,
                   help="the benchmark's own options; `fxopt bench KIND --help` lists them")
    s.set_defaults(func=_cmd_bench)
    return p


class _Version(argparse.Action):
    """--version: imports torch and numba only when asked."""

    def __init__(self, option_strings, dest, help=None):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """`fxopt 0.1.0 (torch 2.13.0+cpu, numba 0.68.1)`"""
    import numba
    import torch
    from fxopt.core.version import VERSION
    return f"fxopt {VERSION} (torch {torch.__version__}, numba {numba.__version__})"


def _model_arguments(s, default_target: str, saved: bool = False) -> None:
    s.add_argument("model", help=("a saved model (.fxopt), or " if saved else "") +
                   "module.path:factory or path/to/file.py:factory; the factory returns "
                   "(model, example_inputs) or just a model (then give --input-shape)")
    s.add_argument("--target", default=default_target,
                   help="target name (`fxopt passes` lists them) or pipeline string (default: %(default)s)")
    s.add_argument("--input-shape", metavar="D0,D1,...",
                   help="shape of a random example input, e.g. 1,3,224,224, for a factory that returns "
                        "only a model (default: the factory's example inputs)")


def _cmd_passes(ns) -> int:
    from fxopt.core.pipeline import TARGET_DOCS, TARGETS
    from fxopt.core.registry import get_pass, pass_names
    print("targets:")
    for name, text in TARGETS.items():
        print(f"  {name}: {TARGET_DOCS.get(name, '')}\n    {text}")
    print("passes:")
    for name in pass_names():
        info = get_pass(name).PASS
        opts = ", ".join(f"{k}={v!r}" for k, v in info.options.items())
        print(f"  {name}{' {' + opts + '}' if opts else ''}: {info.doc}")
    return 0


def _cmd_warmup(ns) -> int:
    import fxopt
    done = fxopt.warmup()
    if done["compiled"]:
        print(f"fxopt warmup: compiled {done['compiled']} kernels in {done['seconds']:.0f} s into {done['cache']}")
    else:
        print(f"fxopt warmup: every kernel was already compiled in {done['cache']} ({done['seconds']:.0f} s)")
    return 0


def _cmd_inspect(ns) -> int:
    import fxopt
    model, example = load_factory(ns.model, ns.input_shape)
    fast = fxopt.optimize(model, example, target=ns.target, print_ir_after=_names(ns.print_ir_after),
                          dump_dir=ns.dump_dir, stop_after=ns.stop_after, disable=_names(ns.disable))
    print(fast.fxopt_report)
    if ns.dump_dir:
        print(f"stages written to {ns.dump_dir}")
    return 0


def _cmd_bisect(ns) -> int:
    import fxopt
    model, example = load_factory(ns.model, ns.input_shape)
    found = fxopt.bisect(model, example, target=ns.target, tol=ns.tol, metric=ns.metric)
    print(found.report)
    print()
    print(found)
    return 1 if found.found else 0


def _cmd_optimize(ns) -> int:
    import fxopt
    model, example = load_factory(ns.model, ns.input_shape)
    options = {"prune": ns.prune} if ns.prune else {}
    calib = load_calibration(ns.calib, ns.calib_batch) if ns.calib else None
    fast = fxopt.optimize(model, example, target=ns.target, calibration_data=calib, **options)
    print(fast.fxopt_report)
    fxopt.save(fast, ns.output)
    print(f"saved to {ns.output}")
    return 0


def _cmd_profile(ns) -> int:
    import torch
    import fxopt
    if ns.model.endswith(".fxopt"):
        if not ns.inputs:
            raise SystemExit("fxopt profile: a saved model needs --inputs FILE.pt (torch.save of a tensor, "
                             "a tuple of tensors or a dict of keyword inputs)")
        model, example = fxopt.load(ns.model), None
    else:
        original, example = load_factory(ns.model, ns.input_shape)
        model = fxopt.optimize(original, example, target=ns.target, report_layers=False, latency_repeats=0)
    if ns.inputs:
        example = torch.load(ns.inputs, weights_only=True)
    args, kwargs = (((), example) if isinstance(example, dict) else
                    (tuple(example), {}) if isinstance(example, (tuple, list)) else ((example,), {}))
    with torch.no_grad():
        prof = fxopt.profile(model, *args, repeats=ns.repeats, **kwargs)
    text = str(prof).splitlines()
    rows = text[1:-2]
    if ns.top and len(rows) > ns.top:
        rows = rows[:ns.top] + [f"... {len(rows) - ns.top} faster steps not shown (--top 0 shows all)"]
    print("\n".join([text[0], *rows, *text[-2:]]))
    return 0


def _cmd_report(ns) -> int:
    from fxopt.artifact.serialize import read_report
    print(read_report(ns.path))
    return 0


def load_calibration(spec: str, batch: int = 8):
    """Calibration inputs from a .pt file (loaded weights-only) or a module:function."""
    import torch
    if spec.endswith((".pt", ".pth")):
        if not os.path.exists(spec):
            raise FxoptError(f"no such calibration file: {spec}")
        data = torch.load(spec, weights_only=True)
        if isinstance(data, torch.Tensor):
            return [(chunk,) for chunk in data.split(batch)]
        if isinstance(data, (list, tuple)):
            return list(data)
        raise FxoptError(f"{spec} holds a {type(data).__name__}; save a list of inputs or one batched tensor")
    where, _, name = spec.rpartition(":")
    if not where:
        raise FxoptError(f"--calib {spec!r}: give a .pt file or module:function")
    fn = getattr(_import(where), name, None)
    if fn is None:
        raise FxoptError(f"{where} has no attribute {name!r}")
    return fn()


def _cmd_demo(ns) -> int:
    from fxopt.demo import run_demo
    run_demo(target=ns.target)
    return 0


def _cmd_bench(ns) -> int:
    try:
        module = importlib.import_module(BENCHES[ns.which])
    except ModuleNotFoundError as e:
        raise FxoptError(f"benchmark {ns.which!r} is not available in this build ({e})") from e
    # a benchmark runs for minutes: show each line as it is measured, also through a pipe
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    return module.main(ns.args) or 0


def _names(text: str) -> tuple:
    return tuple(t for t in (text or "").split(",") if t)


def load_factory(spec: str, input_shape: str | None = None):
    """Import `module:factory` (or `file.py:factory`), call it, return (model, example_inputs)."""
    import torch
    if ":" not in spec:
        raise FxoptError(f"model {spec!r} must be module.path:factory or path/to/file.py:factory")
    where, name = spec.rsplit(":", 1)
    module = _import(where)
    factory = getattr(module, name, None)
    if factory is None:
        raise FxoptError(f"{where} has no attribute {name!r}")
    made = factory()
    if isinstance(made, torch.nn.Module):
        if not input_shape:
            raise FxoptError(f"{spec} returned only a model: give --input-shape, e.g. --input-shape 1,3,224,224")
        return made, (torch.randn(*_shape(input_shape)),)
    if isinstance(made, (tuple, list)) and len(made) >= 2 and isinstance(made[0], torch.nn.Module):
        return made[0], made[1]
    raise FxoptError(f"{spec} must return a model or (model, example_inputs), got {type(made).__name__}")


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if not dims or min(dims) < 1:
        raise FxoptError(f"--input-shape {text!r}: give positive integers separated by commas, "
                         "e.g. --input-shape 1,3,224,224")
    return dims


def _import(where: str):
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.exists(path):
            raise FxoptError(f"no such file: {where}")
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as e:
        raise FxoptError(f"cannot import {where!r}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
