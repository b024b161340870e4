"""Base models behind the Gaussian-kernel interface (docs/algorithms.md, section 1)."""

from tsf.models.base import BaseModel, Transition
from tsf.models.diffusion import EpsDiffusionModel
from tsf.models.digits import DigitsDiffusion, DigitsFlow
from tsf.models.flow import FlowModel
from tsf.models.gmm import GaussianMixture, GaussianMixtureFlow
from tsf.models.pipelines import Flux, StableDiffusion, StableDiffusion3

__all__ = ["BaseModel", "Transition", "EpsDiffusionModel", "DigitsDiffusion", "GaussianMixture", "FlowModel", "GaussianMixtureFlow", "DigitsFlow",
           "StableDiffusion", "StableDiffusion3", "Flux"]
