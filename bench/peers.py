"""The systems `fxopt bench models` compares, each set up from its own copy of the model.

    run = ort_int8(model_copy, inputs, ctx)
    out = run.fn()          # the main output tensor, on the timed inputs
    run.info                # what was set up and how long it took

Every system uses `ctx.threads` threads: torch through torch.set_num_threads
(set once by the caller), ONNX Runtime through its session options with
intra-op spinning off, fxopt kernels through torch's count.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import torch

ORT_SPIN = "session.intra_op.allow_spinning"


@dataclass
class Context:
    """What every system's setup may need, shared across systems of one model."""
    threads: int
    tmpdir: str                 # one per model family: its ONNX files live here
    output: str                 # name of the main output (e.g. "last_hidden_state")
    calibration: list
    export_inputs: dict         # batch >= 2, so export does not specialize batch to 1
    dynamic_dims: tuple         # input dims exported as dynamic: (0,) or (0, 1)
    reference_shape: tuple = ()
    family: str = ""            # the spec's family: "bert", "resnet50", ...
    cache: dict = field(default_factory=dict)   # per family: ONNX paths, export/quantize times


@dataclass
class Prepared:
    fn: object                  # () -> torch.Tensor, the main output
    info: dict


def main_output(out, name: str) -> torch.Tensor:
    """The named output of a model call (ModelOutput, dict, tuple or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        return out[name]
    if hasattr(out, name):
        return getattr(out, name)
    return out[0]


def _torch_call(model, inputs, name):
    def fn():
        with torch.inference_mode():
            return main_output(model(**inputs), name)
    return fn


def torch_fp32(model, inputs, ctx: Context) -> Prepared:
    """Eager PyTorch, fp32: the baseline."""
    return Prepared(_torch_call(model, inputs, ctx.output), {"setup": "eager, inference_mode"})


def quantize_dynamic_int8(model):
    """torch.ao's dynamic int8 of every nn.Linear (qint8 weights, fbgemm): the peer we measure against."""
    with warnings.catch_warnings():
        # torch 2.13 deprecates torch.ao.quantization and the quantized tensors
        # quantize_dynamic builds its weights from, and says so on every call: notes about
        # torch's API, not about fxopt or the measurement. Only these two are hidden.
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"torch\.quantize_per_tensor, torch\.quantize_per_channel", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def torch_int8(model, inputs, ctx: Context) -> Prepared:
    """torch.ao dynamic int8: nn.Linear only (convs stay fp32), qint8 weights."""
    q = quantize_dynamic_int8(model)
    info = {"setup": "quantize_dynamic({nn.Linear}, qint8), eager",
            "engine": torch.backends.quantized.engine}
    return Prepared(_torch_call(q, inputs, ctx.output), info)


def export_onnx(model, inputs, ctx: Context) -> str:
    """fp32 ONNX of the model (torch.onnx.export, dynamo exporter), once per model family.

    Batch (and sequence) are dynamic, as in fxopt's captured graph, so one
    file serves every input size of the family.
    """
    if "onnx_fp32" in ctx.cache:
        return ctx.cache["onnx_fp32"]
    path = os.path.join(ctx.tmpdir, "fp32.onnx")
    dims = {k: {d: torch.export.Dim.DYNAMIC for d in ctx.dynamic_dims} for k in ctx.export_inputs}
    t0 = time.perf_counter()
    # Why quiet: the exporter prints progress lines that would break up the table.
    with _quiet():
        program = torch.onnx.export(model, (), kwargs=ctx.export_inputs, dynamo=True,
                                    external_data=False, dynamic_shapes=dims, verbose=False)
        program.save(path)
    ctx.cache["onnx_fp32"] = path
    ctx.cache["export_s"] = time.perf_counter() - t0
    return path


def ort_session(path: str, threads: int):
    """An ORT CPU session with `threads` intra-op threads, 1 inter-op, no spinning."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Why: spinning idle threads would steal the cores from the next system measured.
    so.add_session_config_entry(ORT_SPIN, "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _ort_call(path, inputs, ctx: Context, reference_shape):
    sess = ort_session(path, ctx.threads)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v.numpy() for k, v in inputs.items() if k in names}
    # Why by shape: the exporter names outputs after graph nodes ("layer_norm_24"),
    # not after the model's output fields.
    index = 0
    for i, out in enumerate(sess.get_outputs()):
        if _same_shape(out.shape, reference_shape):
            index = i
            break

    def fn():
        return torch.from_numpy(sess.run(None, feeds)[index])
    return fn, sess.get_outputs()[index].name


def _same_shape(onnx_shape, shape) -> bool:
    """ONNX output shape (ints and symbols) against a concrete shape."""
    return len(onnx_shape) == len(shape) and all(
        not isinstance(a, int) or a == b for a, b in zip(onnx_shape, shape))


def ort_fp32(model, inputs, ctx: Context) -> Prepared:
    """ONNX Runtime fp32 on the exported model, all graph optimizations."""
    reused = "onnx_fp32" in ctx.cache
    path = export_onnx(model, inputs, ctx)
    fn, out_name = _ort_call(path, inputs, ctx, ctx.reference_shape)
    return Prepared(fn, {"setup": "dynamic-shape export; " + _ort_setup(ctx.threads),
                         "output_name": out_name, "export_s": ctx.cache["export_s"],
                         "export_reused": reused})


def ort_int8(model, inputs, ctx: Context) -> Prepared:
    """ONNX Runtime dynamic int8 (quantize_dynamic) after ORT's quantization pre-processing."""
    reused = "onnx_int8" in ctx.cache
    dst = quantize_onnx(export_onnx(model, inputs, ctx), ctx)
    fn, out_name = _ort_call(dst, inputs, ctx, ctx.reference_shape)
    setup = (f"quantize_dynamic(weight_type=QInt8, per_channel=False, reduce_range="
             f"{ctx.cache['reduce_range']}), {ctx.cache['pre_note']}; " + _ort_setup(ctx.threads))
    return Prepared(fn, {"setup": setup, "weight_type": "QInt8 (U8S8)", "output_name": out_name,
                         "export_s": ctx.cache["export_s"], "quantize_s": ctx.cache["quantize_s"],
                         "export_reused": reused})


def ort_static_int8(model, inputs, ctx: Context) -> Prepared:
    """ONNX Runtime static int8 (quantize_static, QDQ format), calibrated on the spec's batches."""
    dst = quantize_onnx_static(export_onnx(model, inputs, ctx), ctx)
    fn, out_name = _ort_call(dst, inputs, ctx, ctx.reference_shape)
    setup = (f"quantize_static(QDQ, U8S8, per_channel=True, reduce_range={ctx.cache['static_reduce_range']}, "
             f"MinMax on {len(ctx.calibration)} batches), {ctx.cache['pre_note']}; " + _ort_setup(ctx.threads))
    return Prepared(fn, {"setup": setup, "output_name": out_name, "export_s": ctx.cache["export_s"],
                         "quantize_s": ctx.cache["static_quantize_s"]})


class _Batches:
    """ORT's CalibrationDataReader protocol over the calibration batches (numpy feeds)."""

    def __init__(self, batches, names):
        self._feeds = iter([{k: v.numpy() for k, v in b.items() if k in names} for b in batches])

    def get_next(self):
        return next(self._feeds, None)


def quantize_onnx_static(src: str, ctx: Context) -> str:
    """ORT static int8 of the fp32 export (QDQ, as ORT recommends for CPU), once per family."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    def quantize(pre, dst):
        names = {i.name for i in ort_session(pre, ctx.threads).get_inputs()}
        ctx.cache["static_reduce_range"] = not cpu_has_vnni()     # as for the dynamic one
        with _quiet(), _chdir(ctx.tmpdir):     # calibration writes its augmented model to the cwd
            quantize_static(pre, dst, _Batches(ctx.calibration, names), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=ctx.cache["static_reduce_range"])
    return _quantized(src, ctx, "onnx_static", "int8_static.onnx", "static_quantize_s", quantize)


def quantize_onnx(src: str, ctx: Context) -> str:
    """ORT dynamic int8 of the fp32 export, once per model family."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(pre, dst):
        # ORT's guidance for x86: uint8 activations with int8 weights (U8S8); 7-bit
        # weights (reduce_range) only on CPUs without VNNI, where vpmaddubsw saturates.
        ctx.cache["reduce_range"] = not cpu_has_vnni()
        with _quiet():
            quantize_dynamic(pre, dst, weight_type=QuantType.QInt8, per_channel=False,
                             reduce_range=ctx.cache["reduce_range"])
    return _quantized(src, ctx, "onnx_int8", "int8.onnx", "quantize_s", quantize)


def _quantized(src: str, ctx: Context, key: str, file: str, seconds_key: str, quantize) -> str:
    """quantize(pre-processed export, destination) once per model family: the file's path,
    kept in ctx.cache[key], and the seconds it took in ctx.cache[seconds_key]."""
    if key in ctx.cache:
        return ctx.cache[key]
    t0 = time.perf_counter()
    pre, ctx.cache["pre_note"] = _preprocess(src, os.path.join(ctx.tmpdir, "fp32_pre.onnx"))
    dst = os.path.join(ctx.tmpdir, file)
    quantize(pre, dst)
    ctx.cache[seconds_key] = time.perf_counter() - t0
    ctx.cache[key] = dst
    return dst


def _preprocess(src: str, dst: str) -> tuple[str, str]:
    """ORT's recommended pre-processing (shape inference + graph optimization), or src on failure.

    Symbolic shape inference fails on some dynamic-shape exports (BERT's), so
    it is retried without it before giving up on pre-processing.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process
    error = None
    for skip_symbolic in (False, True):
        try:
            # Why chdir: a failed symbolic shape inference dumps its partial
            # model into the current directory.
            with _quiet(), _chdir(os.path.dirname(dst)):
                quant_pre_process(src, dst, skip_symbolic_shape=skip_symbolic)
            return dst, "quant_pre_process" + (" (no symbolic shape inference)" if skip_symbolic else "")
        except Exception as e:  # pre-processing is an optimization; fall back
            error = e
    return src, f"quant_pre_process failed ({type(error).__name__}), raw export quantized"


@contextlib.contextmanager
def _chdir(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _ort_setup(threads: int) -> str:
    return (f"intra_op_num_threads={threads}, inter_op_num_threads=1, sequential, "
            f"ORT_ENABLE_ALL, {ORT_SPIN}=0")


def fxopt_int8(model, inputs, ctx: Context, target: str = "cpu-int8") -> Prepared:
    """fxopt cpu-int8 (or `target`) with the spec's calibration batches; optimize and first call timed."""
    import fxopt
    t0 = time.perf_counter()
    with _quiet():
        fast = fxopt.optimize(model, inputs, target=target, calibration_data=ctx.calibration,
                              latency_repeats=0)
    optimize_s = time.perf_counter() - t0
    fn = _torch_call(fast, inputs, ctx.output)
    t0 = time.perf_counter()
    fn()
    first_call_s = time.perf_counter() - t0
    report = fast.fxopt_report
    layers = getattr(report, "layers", None) or []
    passes = {}
    for r in getattr(report, "records", []):
        passes[r.name] = passes.get(r.name, 0.0) + r.seconds
    int8 = sum(1 for r in layers if r.get("precision") == "int8")
    # where a call's time goes: kernel steps of the execution plan against everything else
    # (over about 2 s of calls: Plan.profile)
    with torch.inference_mode():
        prof = fxopt.profile(fast, **inputs)
    info = {"setup": f"fxopt.optimize(target={target!r}, latency_repeats=0), inference_mode",
            "outside_kernels_pct": prof.outside_kernels_pct, "kernel_ms": prof.kernel_us / 1e3,
            "profile_call_ms": prof.call_us / 1e3, "profile_repeats": prof.repeats,
            "optimize_s": optimize_s, "first_call_s": first_call_s,
            "layers_int8": int8, "layers_total": len(layers),
            # where optimize's time goes: per pass, and the rest (capture, per-pass drift, layer report)
            "pass_seconds": passes, "outside_passes_s": optimize_s - sum(passes.values()),
            "fp32_layers": sorted({r["op"] for r in layers if r.get("precision") != "int8"})}
    return Prepared(fn, info)


def fxopt_int8_fp32_stem(model, inputs, ctx: Context) -> Prepared:
    """fxopt cpu-int8 with the image model's first conv kept fp32 (quantize_int8's image_stem)."""
    import fxopt
    target = fxopt.TARGETS["cpu-int8"].replace("quantize_int8", "quantize_int8{image_stem=fp32}")
    return fxopt_int8(model, inputs, ctx, target)


def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@contextlib.contextmanager
def _quiet():
    """Swallow prints, warnings and INFO/WARNING logs of a setup step (errors still raise)."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"), logging.getLogger("torch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
