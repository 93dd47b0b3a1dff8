"""A residual CNN trained on sklearn's bundled 8x8 digits (real data, no download).

    model, (x_train, y_train), (x_test, y_test) = trained_digits_cnn()
"""
import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class DigitsNet(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.block1 = Block(c)
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * c), nn.ReLU())
        self.block2 = Block(2 * c)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


def digits_data(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed,
                                           stratify=digits.target)
    return (x[idx_train], y[idx_train]), (x[idx_test], y[idx_test])


def batches(x, y=None, size=64, seed=0):
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(x), size):
        sel = order[i:i + size]
        yield ((x[sel],), y[sel]) if y is not None else (x[sel],)


class Loader:
    """Re-iterable shuffled batches of model inputs (no labels): a new order every pass."""

    def __init__(self, x, size=32, seed=0):
        self.x, self.size, self.epoch, self.seed = x, size, 0, seed

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __iter__(self):
        self.epoch += 1
        return batches(self.x, size=self.size, seed=self.seed + self.epoch)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def trained_digits_cnn(epochs=12, seed=0):
    torch.manual_seed(seed)
    train, test = digits_data(seed)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        for (xb,), yb in batches(*train, seed=seed + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval(), train, test
