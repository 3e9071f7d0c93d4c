"""The lab's BetterCNN: the small network trained from scratch as the baseline."""

from __future__ import annotations

import torch
from torch import nn

from boatray.backbones.entry import FLATTEN, GLOBAL_POOL, Entry


class BetterCNN(nn.Module):
    """The lab's from-scratch baseline, sized for 30x100 inputs but accepting any size >= 12x12.

    conv 30@5x5, ReLU, max-pool 2 -> conv 15@3x3, ReLU, max-pool 2 -> linear 128, 50, classes.
    At 30x100 the second pooled map is 15x5x23 (1,725 inputs to fc1, the lab's figure). An
    adaptive pooling stage to 5x23 (the identity at 30x100) keeps fc1 at that size for any other
    input, so the weights never depend on the image size and the lab's state dict loads as is.
    """

    def __init__(self, num_classes: int, pooling: str = "avg") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 30, 5)
        self.conv2 = nn.Conv2d(30, 15, 3)
        self.act = nn.ReLU()
        self.down = nn.MaxPool2d(2)
        self.pool = GLOBAL_POOL[pooling]((5, 23))
        self.fc1 = nn.Linear(15 * 5 * 23, 128)
        self.fc2 = nn.Linear(128, 50)
        self.fc3 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.down(self.act(self.conv2(self.down(self.act(self.conv1(x)))))))
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x.flatten(1))))))


ENTRY = Entry(
    make=lambda num_classes, pooling, _: BetterCNN(num_classes, pooling),  # no named weights
    cuts=("pool",),
    layout=lambda _: {"pool": ("conv1", "act", "down", "conv2", "act", "down", "pool", FLATTEN),
                      "head": ("fc1", "act", "fc2", "act", "fc3")},
    from_scratch=True, input_size=(30, 100))
