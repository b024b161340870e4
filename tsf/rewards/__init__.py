"""Rewards: one registry by name (``REWARDS``); ``reward(images, conditions) -> [N]``."""

from tsf.rewards.base import REWARDS, Reward, build_reward
from tsf.rewards.digits import DigitReward
from tsf.rewards.image import Brightness, Compressibility
from tsf.rewards.linear import LinearReward

__all__ = ["REWARDS", "Reward", "build_reward", "DigitReward", "Brightness", "Compressibility", "LinearReward"]
