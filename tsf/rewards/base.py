"""The reward interface: ``reward(images, conditions) -> float tensor [N]``, images in [0, 1]."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.loading import LazyLoadModule
from tsf.registry import Registry


class Reward(LazyLoadModule):
    """A reward ``r(images, conditions) -> [N]``.

    ``differentiable`` says whether gradients flow from the output to ``images``
    (gradient samplers refuse rewards without it). Weights load in :meth:`load`.
    A reward may expose :meth:`features` (``[N, d]``) for diversity and fidelity.
    """

    name: str = "reward"
    differentiable: bool = False

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        """Raise a :class:`~tsf.errors.ConfigError` if the reward cannot score these conditions."""

    @property
    def has_features(self) -> bool:
        return type(self).features is not Reward.features

    def features(self, images: Tensor) -> Tensor:
        raise NotImplementedError(f"reward {self.name!r} has no feature extractor")

    def forward(self, images: Tensor, conditions: Optional[Sequence[Any]] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


REWARDS: Registry[Reward] = Registry("reward")


def build_reward(spec: Any) -> Reward:
    """A registered name (``"digit"``) or a :class:`Reward` instance (e.g. from a config's ``class_path``)."""
    reward = REWARDS.build(spec)
    if not isinstance(reward, Reward):
        raise ConfigError(f"a reward must be a registered name or a tsf.rewards.Reward, got {type(reward).__name__}")
    return reward
