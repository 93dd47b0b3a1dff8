"""OpenVINO, the peer users deploy on Intel CPUs, as `fxopt bench models` systems.

    run = ov_default(model_copy, inputs, ctx)   # OpenVINO's default precision on this CPU
    run = ov_int8(model_copy, inputs, ctx)      # int8 through NNCF post-training quantization

Both read the same dynamic-shape ONNX export the ONNX Runtime systems use (one export per
model family), compile for "CPU" with `ctx.threads` inference threads and the LATENCY hint,
and are called through a compiled model's infer request, as OpenVINO's own benchmark_app
does. The default precision is what `ov.Core` picks: bf16 on CPUs with AMX (or AVX512-BF16),
fp32 elsewhere; the row records it. int8 is NNCF's `nncf.quantize` with its defaults (mixed
preset; `model_type=TRANSFORMER` for the transformer families, as NNCF's documentation
asks), calibrated on the spec's calibration batches, the data every system gets.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from fxopt.bench.peers import Context, Prepared, _quiet, _same_shape, export_onnx

TRANSFORMERS = ("bert",)     # model families NNCF quantizes with model_type=TRANSFORMER


def _core():
    import openvino as ov
    return ov.Core()


def _compile(ov_model, ctx: Context):
    import openvino.properties as props
    import openvino.properties.hint as hints
    core = _core()
    config = {props.inference_num_threads: ctx.threads,
              hints.performance_mode: hints.PerformanceMode.LATENCY}
    compiled = core.compile_model(ov_model, "CPU", config)
    return compiled, str(compiled.get_property(hints.inference_precision))


def _call(compiled, inputs, ctx: Context):
    """fn() -> the main output as a torch tensor; the output is picked by shape, as for ORT."""
    names = {name for port in compiled.inputs for name in port.get_names()}
    feeds = {k: v.numpy() for k, v in inputs.items() if k in names}
    index = 0
    for i, port in enumerate(compiled.outputs):
        shape = port.get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        if _same_shape(dims, ctx.reference_shape):
            index = i
            break
    request = compiled.create_infer_request()

    def fn():
        request.infer(feeds)
        # Why copy: the request reuses its output buffer on the next call.
        return torch.from_numpy(np.array(request.get_output_tensor(index).data, copy=True))
    return fn


def _read(model, inputs, ctx: Context):
    reused = "onnx_fp32" in ctx.cache
    path = export_onnx(model, inputs, ctx)
    return _core().read_model(path), reused


def ov_default(model, inputs, ctx: Context) -> Prepared:
    """OpenVINO at its default precision for this CPU (bf16 with AMX, else fp32)."""
    ov_model, reused = _read(model, inputs, ctx)
    compiled, precision = _compile(ov_model, ctx)
    return Prepared(_call(compiled, inputs, ctx), {
        "setup": f"read_model(ONNX export), compile_model(CPU, LATENCY, {ctx.threads} threads)",
        "inference_precision": precision, "export_s": ctx.cache["export_s"], "export_reused": reused})


def ov_int8(model, inputs, ctx: Context) -> Prepared:
    """OpenVINO int8: NNCF post-training quantization of the ONNX export, then compiled."""
    if "ov_int8" not in ctx.cache:
        ov_model, _ = _read(model, inputs, ctx)
        ctx.cache["ov_int8"] = _quantize(ov_model, ctx)
    quantized, quantize_s, model_type = ctx.cache["ov_int8"]
    compiled, precision = _compile(quantized, ctx)
    return Prepared(_call(compiled, inputs, ctx), {
        "setup": f"nncf.quantize(defaults, {model_type}, {len(ctx.calibration)} calibration batches); "
                 f"compile_model(CPU, LATENCY, {ctx.threads} threads)",
        "inference_precision": precision, "quantize_s": quantize_s, "export_s": ctx.cache["export_s"]})


def _quantize(ov_model, ctx: Context):
    import nncf
    names = {name for port in ov_model.inputs for name in port.get_names()}
    batches = [{k: v.numpy() for k, v in batch.items() if k in names} for batch in ctx.calibration]
    kwargs = {}
    if ctx.family in TRANSFORMERS:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    t0 = time.perf_counter()
    with _quiet():
        quantized = nncf.quantize(ov_model, nncf.Dataset(batches), subset_size=len(batches), **kwargs)
    return quantized, time.perf_counter() - t0, "TRANSFORMER" if kwargs else "default model type"
