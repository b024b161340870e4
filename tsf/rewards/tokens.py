"""Rewards of token sequences (masked discrete diffusion; docs/algorithms.md, section 11).

``reward(x0, conditions)`` takes what the model's ``decode`` gives: integer tokens ``[N, L]`` for a token model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsf.errors import ConfigError
from tsf.rewards.base import Reward


class TokenReward(Reward):
    """The additive reward ``r(x) = sum_i values[i][x_i]`` of the discrete testbed (closed forms in
    :class:`tsf.models.masked.CategoricalMixture`).

    Args:
        values: ``[L][V]``, the reward of token ``v`` at position ``i``.
    """

    name = "tokens"

    def __init__(self, values: list[list[float]]) -> None:
        super().__init__()
        v = torch.as_tensor(values, dtype=torch.float32)
        if v.dim() != 2:
            raise ConfigError(f"values must be [L][V] (one row of token rewards per position), got shape {list(v.shape)}")
        self.register_buffer("values", v)

    def forward(self, tokens: Tensor, conditions=None) -> Tensor:
        if tokens.is_floating_point() or tokens.dim() != 2 or tokens.shape[1] != self.values.shape[0]:
            raise ConfigError(f"reward {self.name!r} scores integer tokens [N, {self.values.shape[0]}], got "
                              f"{tokens.dtype} {list(tokens.shape)}")
        if bool((tokens >= self.values.shape[1]).any() | (tokens < 0).any()):
            raise ConfigError(f"reward {self.name!r}: a token outside 0 .. {self.values.shape[1] - 1} (a mask token "
                              "left in x0?)")
        L = self.values.shape[0]
        return self.values[torch.arange(L, device=tokens.device), tokens].sum(-1)
