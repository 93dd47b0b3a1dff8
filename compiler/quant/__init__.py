"""Quantization: calibration and the quantized ops.

histogram (streaming histograms), observers (min/max, percentile, MSE, entropy
ranges), calibrate (streaming inputs through a graph to observe chosen values),
qops (the quantize/dequantize and quantized reference ops of the fxopt namespace),
bias_correction (removing the mean shift int8 weights add).
"""
