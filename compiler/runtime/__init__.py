"""How an optimized graph runs: the lowered ops that call the Numba kernels.

kernel_ops (torch ops of the fxopt namespace over packed weights, calling
fxopt.kernels), input_check (the entry check of a loaded model, rebuilt from data).
"""
