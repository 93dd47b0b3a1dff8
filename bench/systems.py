"""Every system `fxopt bench models` can compare, by name, with its label in the tables.

    run = SYSTEMS["ov_int8"](model_copy, inputs, ctx)   # fxopt.bench.peers.Prepared
"""
from fxopt.bench import openvino_peers as ov
from fxopt.bench import peers

SYSTEMS = {"torch_fp32": peers.torch_fp32, "torch_int8": peers.torch_int8, "ort_fp32": peers.ort_fp32,
           "ort_int8": peers.ort_int8, "ort_static_int8": peers.ort_static_int8,
           "ov_default": ov.ov_default, "ov_int8": ov.ov_int8, "fxopt": peers.fxopt_int8}
# fxopt with non-default options, for the benchmarks that ask for them (bench.pretrained)
VARIANTS = {"fxopt_fp32_stem": peers.fxopt_int8_fp32_stem}
LABELS = {"torch_fp32": "torch fp32", "torch_int8": "torch dynamic int8", "ort_fp32": "ORT fp32",
          "ort_int8": "ORT dynamic int8", "ort_static_int8": "ORT static int8",
          "ov_default": "OpenVINO default", "ov_int8": "OpenVINO int8 (NNCF)", "fxopt": "fxopt cpu-int8",
          "fxopt_fp32_stem": "fxopt int8, fp32 stem"}
