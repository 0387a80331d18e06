"""Model factories the tests load through the `pkg.mod:fn` source, as a user's would be."""

from __future__ import annotations

import torch
from torch import nn


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def outlier_mlp() -> nn.Module:
    """Three Linear layers. The middle one reads a dead unit (always 0 after ReLU) through huge weights: they
    change nothing in fp32, but they set every row's int8 scale so high that the weights that matter round to
    zero."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -1.0
        model[2].weight[:, 0] = 400.0
    return model.eval()
