"""Rewards: one registry by name (``REWARDS``); ``reward(images, conditions) -> [N]``."""

from tsf.rewards.base import REWARDS, Reward, build_reward
from tsf.rewards.clip import AestheticScore, ClipReward, ClipScore, PickScore, preprocess
from tsf.rewards.digits import DigitConfidence, DigitLogOdds, DigitReward
from tsf.rewards.image import Brightness, Compressibility, Incompressibility
from tsf.rewards.linear import LinearReward
from tsf.rewards.mixture import WeightedSum
from tsf.rewards.preference import HPSv2, ImageRewardScore
from tsf.rewards.text import KeywordReward, TextClassifierReward, TextReward
from tsf.rewards.tokens import TokenReward

__all__ = ["REWARDS", "Reward", "build_reward", "DigitReward", "Brightness", "Compressibility", "Incompressibility",
           "DigitConfidence", "DigitLogOdds", "LinearReward", "ClipReward", "AestheticScore", "ClipScore", "PickScore", "HPSv2", "ImageRewardScore",
           "preprocess", "TokenReward", "TextReward", "KeywordReward",
           "TextClassifierReward", "WeightedSum"]
