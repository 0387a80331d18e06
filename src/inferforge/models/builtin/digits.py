"""The built-in classifier: a small CNN the project trains itself, once, on scikit-learn's handwritten digits.

The digits data ships inside scikit-learn, so the example has a real accuracy metric and needs no download.
Training takes a few seconds on a CPU; the weights are cached as safetensors keyed by the recipe's version.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

TRAIN_VERSION = "digits-cnn-v1"
NUM_CLASSES = 10


class DigitsNet(nn.Module):
    """Flat 64-pixel images in (the data set's own layout), logits out; convolutions inside."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, NUM_CLASSES)
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels.reshape(-1, 1, 8, 8)))


def cache_dir() -> Path:
    root = os.environ.get("INFERFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "inferforge")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A fixed 70/30 split of the 1,797 images, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.7 * len(x))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _train(epochs: int = 40) -> dict[str, torch.Tensor]:
    x_train, y_train, _, _ = digits_split()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = DigitsNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=generator).split(64):
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def build_digits_model() -> DigitsNet:
    """The trained classifier, training it once per machine and reusing the cached weights after that."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / f"{TRAIN_VERSION}.safetensors"
    if not path.exists():
        with torch.random.fork_rng():
            state = _train()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(state, str(tmp))
        os.replace(tmp, path)
    model = DigitsNet()
    model.load_state_dict(load_file(str(path)))
    return model.eval()
