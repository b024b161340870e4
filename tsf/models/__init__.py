"""Base models behind the kernel interface: Gaussian and masked discrete (docs/algorithms.md, sections 1 and 11)."""

from tsf.models.base import BaseModel, GaussianTransition, Transition
from tsf.models.diffusion import EpsDiffusionModel
from tsf.models.digits import DigitsDiffusion, DigitsFlow, DigitsMasked
from tsf.models.flow import FlowModel
from tsf.models.gmm import GaussianMixture, GaussianMixtureFlow
from tsf.models.masked import CategoricalMixture, MaskedDiffusion
from tsf.models.masked_lm import MaskedLM
from tsf.models.pipelines import Flux, StableDiffusion, StableDiffusion3

__all__ = ["BaseModel", "Transition", "GaussianTransition", "EpsDiffusionModel", "DigitsDiffusion", "GaussianMixture", "FlowModel", "GaussianMixtureFlow", "DigitsFlow",
           "StableDiffusion", "StableDiffusion3", "Flux", "MaskedDiffusion", "CategoricalMixture", "DigitsMasked", "MaskedLM"]
