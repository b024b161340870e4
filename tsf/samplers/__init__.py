"""Samplers: one file per method; ``SAMPLERS`` maps names to classes."""

from tsf.samplers.base import SAMPLERS, BaseSampler, Noise, SampleBatch, Sampler
from tsf.samplers.best_of_n import BestOfN
from tsf.samplers.code import CoDe
from tsf.samplers.dps import DPS
from tsf.samplers.noise_search import ZeroOrderSearch
from tsf.samplers.rbf import RBF
from tsf.samplers.smc import SMC, NonFiniteRewardError
from tsf.samplers.sop import SoP
from tsf.samplers.svdd import SVDD
from tsf.samplers.value import VALUES, ExactValue, LearnedValue, PosteriorMeanValue

__all__ = ["SAMPLERS", "Sampler", "SampleBatch", "Noise", "BaseSampler", "BestOfN", "SVDD", "SMC", "DPS", "RBF",
           "SoP", "CoDe", "ZeroOrderSearch", "NonFiniteRewardError", "VALUES", "PosteriorMeanValue", "ExactValue",
           "LearnedValue"]
