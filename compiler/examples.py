"""Bundled examples on real data: small models trained on sklearn's digits.

sklearn ships the 1,797 8x8 digit images, so nothing is downloaded.

    data = digits()                           # train/test split, fixed seed
    cnn = train(DigitsCNN(), data, epochs=15) # a few seconds on a CPU
    accuracy(cnn, data.x_test, data.y_test)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Digits:
    x_train: torch.Tensor   # [N, 1, 8, 8] float32, scaled to [0, 1]
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, batch_size: int = 64, seed: int = 0, train: bool = True):
        """(x, y) minibatches in a fixed shuffled order."""
        x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            yield x[idx], y[idx]


def digits(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """sklearn's digits as tensors, split into train and test with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the digits examples need scikit-learn: pip install 'fxopt[dev]'") from e
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Digits(x[train], y[train], x[test], y[test])


class DigitsCNN(nn.Module):
    """A small residual CNN with batch norm for 8x8 digits."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(2 * width * 16, 64), nn.ReLU(),
                                  nn.Linear(64, classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(self.down(x))


class DigitsMLP(nn.Module):
    """A three-layer MLP for flattened 8x8 digits."""

    def __init__(self, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expands side by side, concatenated."""

    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1(s)), torch.relu(self.expand3(s))], 1)


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1 (Iandola et al.; the 1.1 layout: a 3x3 stem, pools after fires 2 and 4),
    for image batches (N, 3, H, W), H and W at least 17. The input is named pixel_values,
    as the Hugging Face vision models' is, so benchmarks call both alike."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        pool = dict(kernel_size=3, stride=2, ceil_mode=True)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), nn.MaxPool2d(**pool),
            Fire(64, 16, 64), Fire(128, 16, 64), nn.MaxPool2d(**pool),
            Fire(128, 32, 128), Fire(256, 32, 128), nn.MaxPool2d(**pool),
            Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, pixel_values):
        return self.classifier(self.features(pixel_values))


def randomize_batchnorm(model: nn.Module, seed: int = 0, mean_std: float = 0.5,
                        var_range: tuple = (0.5, 2.0), gamma_range: tuple = (0.5, 1.5),
                        beta_std: float = 0.2) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters, in place.

    Freshly built BatchNorms hold identity statistics, which would make BN folding a
    no-op and hide its cost or its error in tests and benchmarks.

        model = randomize_batchnorm(build(), seed=0, mean_std=0.1)
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=gen) * mean_std)
                mod.running_var.copy_(torch.rand(n, generator=gen) * (var_range[1] - var_range[0]) + var_range[0])
                if mod.affine:
                    mod.weight.copy_(torch.rand(n, generator=gen) * (gamma_range[1] - gamma_range[0])
                                     + gamma_range[0])
                    mod.bias.copy_(torch.randn(n, generator=gen) * beta_std)
    return model


def train(model: nn.Module, data: Digits, epochs: int = 15, lr: float = 3e-3, seed: int = 0) -> nn.Module:
    """Train with Adam and cross-entropy; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for x, y in data.batches(seed=seed + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((model(x).argmax(-1) == y).float().mean())
