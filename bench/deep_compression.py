"""Deep Compression on the digits: prune -> share -> Huffman-coded file, sizes and accuracy.

    python -m fxopt.bench.deep_compression            # MLP of LeNet-300-100's shape, and the digits CNN

Prints, per model, the paper's table as the saved file's report holds it (per layer:
weights, kept, bits per value, coded bytes; total by stage: dense fp32 -> pruned (fp32
values + 8-bit relative index) -> shared (bits per value + 8-bit index + codebook) ->
coded), the file's size against the dense fp32 state dict, the test accuracy of the dense and the compressed model, and whether the
file loaded in a new process predicts the same.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

import fxopt
from fxopt import examples as ex


class LeNet300(nn.Module):
    """LeNet-300-100's shape on 8x8 digits: 64 -> 300 -> 100 -> 10."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                 nn.Linear(100, 10))

    def forward(self, x):
        return self.net(x)


CONFIGS = {
    # the MLP: distillation at T=4 over 40 epochs between the 3 pruning steps, then trained
    # centroids and biases on a 6-bit grid (seed 0: 96% pruned -0.0, 97% -0.44, 97.5% -0.89 points)
    "mlp": dict(build=LeNet300, epochs=30, prune={"structure": "weights", "ratio": 0.97, "scope": "global",
                                                  "schedule": "iterative", "steps": 3},
                share={"bits": 4, "bias_bits": 6, "finetune": {"epochs": 10, "lr": 0.2}},
                finetune={"epochs": 40, "lr": 3e-3, "temperature": 4.0}),
    "cnn": dict(build=lambda: ex.DigitsCNN(), epochs=15, prune={"structure": "weights", "ratio": 0.93,
                                                              "scope": "global", "schedule": "iterative", "steps": 3},
                share={"conv": 5, "linear": 4}, finetune={"epochs": 10, "lr": 1e-3, "temperature": 2.0}),
}


def state_dict_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point())


def size_table(path) -> str:
    """The saved file's size table (fxopt.core.size_table, as the report shows it)."""
    return fxopt.artifact.serialize.read_report(path).sections["compression"]


def same_in_new_process(path, x, want) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        xp, out = os.path.join(tmp, "x.pt"), os.path.join(tmp, "y.pt")
        torch.save(x, xp)
        code = ("import sys, torch, fxopt; m = fxopt.load(sys.argv[1]); "
                "torch.save(m(torch.load(sys.argv[2])).argmax(-1), sys.argv[3])")
        subprocess.run([sys.executable, "-c", code, path, xp, out], check=True)
        return bool(torch.equal(torch.load(out), want))


def run(name: str, out_dir: str, seed: int = 0) -> dict:
    cfg = CONFIGS[name]
    data = ex.digits()
    torch.manual_seed(seed)
    model = ex.train(cfg["build"](), data, epochs=cfg["epochs"], seed=seed)
    dense = ex.accuracy(model, data.x_test, data.y_test)
    batches = [(x,) for x, _ in data.batches(batch_size=32, seed=seed)]
    fast = fxopt.optimize(model, (data.x_test[:8],), calibration_data=batches, prune=cfg["prune"],
                          finetune=cfg["finetune"], share_weights=cfg["share"], latency_repeats=0,
                          latency_aware=False, seed=seed)
    acc = ex.accuracy(fast, data.x_test, data.y_test)
    path = os.path.join(out_dir, f"{name}.fxopt")
    fxopt.save(fast, path, compress="huffman")
    same = same_in_new_process(path, data.x_test, fast(data.x_test).argmax(-1))
    dense_bytes, file_bytes = state_dict_bytes(model), os.path.getsize(path)
    ratio = dense_bytes / file_bytes
    print(f"{name}:\n{size_table(path)}\nfile {file_bytes:,} B (dense fp32 state dict {dense_bytes:,} B)")
    print(f"  accuracy dense {100 * dense:.2f}%  compressed {100 * acc:.2f}%  ({100 * (acc - dense):+.2f} points)"
          f"  file {ratio:.1f}x smaller  new-process predictions equal: {same}")
    return {"ratio": ratio, "dense": dense, "accuracy": acc, "same": same, "file": file_bytes}


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(CONFIGS)
    torch.set_num_threads(1)
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            run(name, tmp)


if __name__ == "__main__":
    main()
