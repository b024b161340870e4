"""Samplers: one file per method; ``SAMPLERS`` maps names to classes."""

from tsf.samplers.base import SAMPLERS, BaseSampler, Noise, SampleBatch, Sampler
from tsf.samplers.best_of_n import BestOfN

__all__ = ["SAMPLERS", "Sampler", "SampleBatch", "Noise", "BaseSampler", "BestOfN"]
