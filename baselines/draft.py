"""DRaFT (Clark et al., ICLR 2024): backpropagate the reward through the last K sampling steps.

Trajectories of the base kernel with gradients off for all but the last ``K`` steps; loss
``-r(x0)``, backpropagated through those steps into the LoRA adapters (gradient
checkpointing per step). DRaFT-K with ``K = 1`` is the cheapest. DRaFT-LV (``lv_samples > 0``)
samples the whole chain without gradients, then re-noises ``x0`` to the last grid time
``lv_samples`` times and denoises one step with gradients, averaging the reward over them
(a lower-variance estimate of the one-step gradient).

The kernel is the base model's, so the same code fine-tunes a diffusion model (DDIM) and a flow model
through its sampler: the Linear-SDE, the VP-SDE or the ODE (``diffusion: none``, where a step's noise is
multiplied by a zero standard deviation). docs/algorithms.md, section 6.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from baselines.common import FinetuneModule
from tsf.errors import ConfigError
from tsf.models.diffusion import EpsDiffusionModel


class DRaFT(FinetuneModule):
    """DRaFT-K.

    Args:
        truncation: K, the number of final steps the gradient flows through (DRaFT-K).
        lv_samples: DRaFT-LV's number of re-noisings of x0 (0: DRaFT-K).
        grad_clip: gradient-norm clip.
        (the rest as :class:`~baselines.common.FinetuneModule`)
    """

    def __init__(self, *args, truncation: int = 1, lv_samples: int = 0, grad_clip: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if truncation < 1:
            raise ConfigError(f"truncation must be >= 1, got {truncation}")
        if not self.reward.differentiable:
            raise ConfigError(f"DRaFT needs a differentiable reward; {self.reward.name!r} is not")
        if lv_samples < 0:
            raise ConfigError(f"lv_samples must be >= 0, got {lv_samples}")
        self.truncation, self.lv_samples, self.grad_clip = int(truncation), int(lv_samples), grad_clip

    def training_step(self, batch, _):
        model, T = self.base, self.base.num_steps
        conds, noise = self.training_batch()
        c = model.encode_conditions(conds)
        x = model.prior(self.draw(noise))
        K = 0 if self.lv_samples else self.truncation
        for i in range(T):
            z = self.draw(noise)
            if i < T - K:
                with torch.no_grad():
                    x = model.transition(x, i, c).sample(z)
            else:
                x = checkpoint(lambda xs, i=i, zs=z: model.transition(xs, i, c).sample(zs), x, use_reentrant=False)
        if self.lv_samples:
            rewards = []
            for _ in range(self.lv_samples):  # re-noise x0 to the last grid time, denoise one step with gradients
                x_t = self.renoise_to_last(x, self.draw(noise))
                x0 = model.transition(x_t, T - 1, c).mean
                rewards.append(self.reward(model.decode(x0), conds))
            loss = -torch.stack(rewards).mean()
        else:
            loss = -self.reward(model.decode(x), conds).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def renoise_to_last(self, x0: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``x0`` noised by the forward process to the last grid point ``T - 1``: ``sqrt(abar) x0 + sqrt(1 - abar) z``
        on a diffusion model, ``alpha_s x0 + sigma_s z`` at ``s = s_{T-1}`` on a flow model (its ``renoise``)."""
        model, T = self.base, self.base.num_steps
        if isinstance(model, EpsDiffusionModel):
            abar = model.abar[T - 1]
            return abar.sqrt() * x0 + (1 - abar).sqrt() * z
        return model.renoise(x0, T, T - 1, z)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
