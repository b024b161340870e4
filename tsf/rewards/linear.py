"""A linear reward ``r(x) = w . x``: the analytic testbed's reward (closed forms in tsf.models.gmm)."""

from __future__ import annotations

import torch
from torch import Tensor

from tsf.rewards.base import Reward


class LinearReward(Reward):
    """``r(x) = direction . x`` (differentiable)."""

    name = "linear"
    differentiable = True

    def __init__(self, direction: list[float]) -> None:
        super().__init__()
        self.register_buffer("direction", torch.as_tensor(direction, dtype=torch.float32))

    def forward(self, images: Tensor, conditions=None) -> Tensor:
        return images.flatten(1) @ self.direction.to(images.dtype)
