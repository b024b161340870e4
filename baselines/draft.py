"""DRaFT (Clark et al., ICLR 2024): backpropagate the reward through the last K sampling steps.

Trajectories of the base kernel with gradients off for all but the last ``K`` steps; loss
``-r(x0)``, backpropagated through those steps into the LoRA adapters (gradient
checkpointing per step). DRaFT-K with ``K = 1`` is the cheapest.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from baselines.common import FinetuneModule
from tsf.errors import ConfigError


class DRaFT(FinetuneModule):
    """DRaFT-K.

    Args:
        truncation: K, the number of final steps the gradient flows through.
        grad_clip: gradient-norm clip.
        (the rest as :class:`~baselines.common.FinetuneModule`)
    """

    def __init__(self, *args, truncation: int = 1, grad_clip: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if truncation < 1:
            raise ConfigError(f"truncation must be >= 1, got {truncation}")
        if not self.reward.differentiable:
            raise ConfigError(f"DRaFT needs a differentiable reward; {self.reward.name!r} is not")
        self.truncation, self.grad_clip = int(truncation), grad_clip

    def training_step(self, batch, _):
        model, T = self.base, self.base.num_steps
        conds, noise = self.training_batch()
        c = model.encode_conditions(conds)
        x = model.prior(noise.randn(1, model.sample_shape))
        for i in range(T):
            z = noise.randn(1, model.sample_shape)
            if i < T - self.truncation:
                with torch.no_grad():
                    x = model.transition(x, i, c).sample(z)
            else:
                x = checkpoint(lambda xs, i=i, zs=z: model.transition(xs, i, c).sample(zs), x, use_reentrant=False)
        loss = -self.reward(model.decode(x), conds).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
