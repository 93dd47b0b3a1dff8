"""Deep Compression on the digits: prune -> share -> Huffman-coded file, sizes and accuracy.

    python -m fxopt.bench.deep_compression            # MLP of LeNet-300-100's shape, and the digits CNN

Prints, per model, the paper's table (per layer: weights, kept, bits per value,
coded bytes; total by stage: dense fp32 state dict -> pruned (fp32 values + 8-bit
relative index) -> shared (bits per value + 8-bit index + codebook) -> the saved
file), the test accuracy of the dense and the compressed model, and whether the
file loaded in a new process predicts the same.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import safetensors
import torch
from torch import nn

import fxopt
from fxopt import examples as ex
from fxopt.artifact import compress


class LeNet300(nn.Module):
    """LeNet-300-100's shape on 8x8 digits: 64 -> 300 -> 100 -> 10."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                                 nn.Linear(100, 10))

    def forward(self, x):
        return self.net(x)


CONFIGS = {
    "mlp": dict(build=LeNet300, epochs=30, prune={"structure": "weights", "ratio": 0.96, "scope": "global",
                                                  "schedule": "iterative", "steps": 3},
                share={"bits": 4}, finetune={"epochs": 20, "lr": 2e-3, "temperature": 2.0}),
    "cnn": dict(build=lambda: ex.DigitsCNN(), epochs=15, prune={"structure": "weights", "ratio": 0.93,
                                                              "scope": "global", "schedule": "iterative", "steps": 3},
                share={"conv": 5, "linear": 4}, finetune={"epochs": 10, "lr": 1e-3, "temperature": 2.0}),
}


def state_dict_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.is_floating_point())


def coded_layers(path) -> list:
    with safetensors.safe_open(path, framework="pt") as f:
        return compress.coded_layers(f.metadata(), f.get_tensor("storage.0").numpy())


def size_table(name, model, fast, path) -> tuple[str, dict]:
    shared = fast.meta.get("fxopt_shared", {})
    codecs = coded_layers(path)
    lines = [f"{name}: {'layer':<10} {'weights':>8} {'kept':>6} {'kept%':>6} {'bits':>4} {'coded B':>8}"]
    stages = {"dense fp32": state_dict_bytes(model), "pruned": 0, "shared": 0}
    bias = sum(m.bias.numel() * 4 for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               and m.bias is not None)
    for (layer, info), codec in zip(shared.items(), codecs):
        coded = codec["gaps"][1] + codec["values"][1]
        bits = max(1, (info["values"]).bit_length())
        lines.append(f"{'':<{len(name) + 2}}{layer:<10} {info['total']:>8} {info['kept']:>6} "
                     f"{100 * info['kept'] / info['total']:>5.1f}% {bits:>4} {coded:>8}")
        stages["pruned"] += info["kept"] * (4 + 1)
        stages["shared"] += (info["kept"] * (bits + 8) + 7) // 8 + info["values"]
    stages["pruned"] += bias
    stages["shared"] += bias
    stages["coded file"] = os.path.getsize(path)
    dense = stages["dense fp32"]
    lines += [f"  {stage:<12} {b:>9} bytes  {dense / b:6.1f}x" for stage, b in stages.items()]
    return "\n".join(lines), stages


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
                          latency_aware=False, seed=seed, sparse=False)   # Huffman codes the dense layout
    acc = ex.accuracy(fast, data.x_test, data.y_test)
    path = os.path.join(out_dir, f"{name}.fxopt")
    fxopt.save(fast, path, compress="huffman")
    table, stages = size_table(name, model, fast, path)
    same = same_in_new_process(path, data.x_test, fast(data.x_test).argmax(-1))
    ratio = stages["dense fp32"] / stages["coded file"]
    print(table)
    print(f"  accuracy dense {100 * dense:.2f}%  compressed {100 * acc:.2f}%  ({100 * (acc - dense):+.2f} points)"
          f"  file {ratio:.1f}x smaller  new-process predictions equal: {same}")
    return {"ratio": ratio, "dense": dense, "accuracy": acc, "same": same, "stages": stages}


def main(argv=None) -> None:
    names = (argv if argv is not None else sys.argv[1:]) or list(CONFIGS)
    torch.set_num_threads(1)
    print(f"fxopt {fxopt.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            run(name, tmp)


if __name__ == "__main__":
    main()
