"""DPS-style reward guidance (Chung et al. 2023; docs/algorithms.md, section 9), the derivative-based baseline.

Each step moves the base kernel's sample along the reward gradient of the Tweedie
estimate: ``x_prev = mu + s z + scale * grad_{x_t} r(decode(x0_hat(x_t)))``.
One model forward+backward per step (``nfe_grad = T``); with ``gradient_through: tweedie`` the
gradient goes through the decoder and the reward only, the network output held constant
(``grad_{x_t} r = J grad_{x0} r``, ``J = 1 / sqrt(abar)`` for eps prediction; ``nfe_grad = 0``).
"""

from __future__ import annotations

from typing import Literal

from tsf.errors import ConfigError
from tsf.rewards.base import require_differentiable
from tsf.samplers.base import Sampler, check_gradient_through
from tsf.samplers.value import PosteriorMeanValue


class DPS(Sampler):
    """Reward-gradient guidance on ``x0_hat``.

    Args:
        guidance_scale: step size ``scale`` of the reward gradient.
        gradient_through: ``network`` (backpropagate through the network) or ``tweedie`` (through the
            Tweedie estimate alone, the network output held constant).
        grad_batch: rows per gradient chunk.
    """

    name = "dps"
    uses_reward_gradient = True
    needs_gaussian_kernel = True

    def __init__(self, guidance_scale: float = 1.0, gradient_through: Literal["network", "tweedie"] = "network",
                 grad_batch: int = 256, max_batch: int = 4096) -> None:
        super().__init__(num_particles=1, max_batch=max_batch)
        if grad_batch < 1:
            raise ConfigError(f"grad_batch must be >= 1, got {grad_batch}")
        self.guidance_scale, self.grad_batch = float(guidance_scale), int(grad_batch)
        self.value_fn = PosteriorMeanValue()
        self.gradient_through = check_gradient_through(gradient_through, self.value_fn)

    def __repr__(self) -> str:
        through = f", gradient_through={self.gradient_through}" if self.gradient_through != "network" else ""
        return f"DPS(guidance_scale={self.guidance_scale}{through})"

    def _sample(self, model, reward, conditions, c, noise):
        require_differentiable(reward, "DPS")
        x = model.prior(noise.randn(1, model.sample_shape))
        for i in range(model.num_steps):
            _, out, g = self.value(model, reward, self.value_fn, x, i, c, list(conditions), 1.0, grad=True,
                                   grad_batch=self.grad_batch, through=self.gradient_through, kernel=True)
            tr = self.transition(model, x, i, c, out)
            x = tr.sample(noise.randn(1, model.sample_shape)) + self.guidance_scale * g
        return x.detach()
