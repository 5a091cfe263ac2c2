"""A tiny conv net for criterion and trainer tests: a ``bn2`` map (B, 8, 4, 4) and a 16-d
embedding, from 16 x 16 images."""

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 16)

    def forward(self, x):
        return self.fc(self.bn2(self.conv(x)).flatten(1))
