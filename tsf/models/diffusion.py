"""Eps-prediction diffusion models on diffusers schedulers (DDIM with eta, DDPM).

The schedule (``alphas_cumprod``, the timestep grid) comes from diffusers'
``DDIMScheduler`` / ``DDPMScheduler``; tsf owns only the Gaussian-kernel math of
docs/algorithms.md, section 1:

    x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
    s      = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    mu     = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps

DDPM is DDIM with ``eta = 1`` (the same mean and variance); tests check both
against the schedulers' own ``step``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.models.base import BaseModel, GaussianTransition, class_labels, classifier_free_guidance, constant_std

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


class EpsDiffusionModel(BaseModel):
    """A denoiser ``eps_theta(x_t, t, c)`` driven by a diffusers scheduler.

    Args:
        net: module called as ``net(x, timesteps, labels) -> eps``.
        scheduler_config: keyword arguments of the diffusers scheduler (beta schedule, ...).
        scheduler: ``"ddim"`` (transitions with ``eta``) or ``"ddpm"`` (``eta = 1``).
        num_steps: number of sampling steps T.
        eta: DDIM stochasticity; 0 is the deterministic ODE sampler (no particle children).
        guidance_scale: classifier-free guidance weight ``w`` (1 = plain conditional model).
        num_classes: classes of the conditioning; ``None`` for an unconditional model.
            Class ``num_classes`` is the null (unconditional) label.
        prediction_type: what the network predicts: ``epsilon`` or ``v_prediction`` (SD 2.x 768);
            a v prediction is turned into eps at the call, ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``.
        batch_invariant: pad every call on fewer than 16 rows to 16, so that a sample is bitwise the same
            whatever batch or process draws it (costs the padded rows; see ``BaseModel.batch_invariant``).
    """

    def __init__(
        self,
        net: Optional[nn.Module],
        scheduler_config: Optional[dict],
        scheduler: Literal["ddim", "ddpm"] = "ddim",
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        num_classes: Optional[int] = None,
        sample_shape: tuple[int, ...] = (1, 8, 8),
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        batch_invariant: bool = False,
    ) -> None:
        super().__init__()
        if scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler {scheduler!r}; known: {sorted(SCHEDULERS)}")
        if num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
        if eta < 0:
            raise ConfigError(f"eta must be >= 0, got {eta}")
        if scheduler == "ddpm" and eta != 1.0:
            raise ConfigError("the DDPM scheduler is DDIM with eta = 1; use scheduler: ddim to set eta")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"unknown prediction_type {prediction_type!r}; known: epsilon, v_prediction")
        self.net = net
        self.scheduler_name = scheduler
        self.num_steps = num_steps
        self.eta = float(eta)
        self.guidance_scale = float(guidance_scale)
        self.num_classes = num_classes
        self.sample_shape = tuple(sample_shape)
        self.prediction_type = prediction_type
        self.batch_invariant = bool(batch_invariant)
        if scheduler_config is not None:
            self.set_schedule(scheduler_config)

    def set_schedule(self, scheduler_config: dict) -> None:
        """Build the diffusers scheduler and the grid's ``abar`` (a latent model calls it once its
        scheduler config is read, in ``load``)."""
        self.scheduler = SCHEDULERS[self.scheduler_name](**{"clip_sample": False, **scheduler_config})
        self.scheduler.set_timesteps(self.num_steps)
        timesteps = self.scheduler.timesteps.long()
        # the next grid point (diffusers' step uses t - num_train // T, which is the same point when T
        # divides num_train_timesteps and skips part of the grid otherwise, e.g. "trailing" with T = 400)
        prev = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
        abar = self.scheduler.alphas_cumprod.double()
        final = torch.as_tensor(getattr(self.scheduler, "final_alpha_cumprod", 1.0), dtype=torch.float64)
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
        self.register_buffer("timesteps", timesteps, persistent=False)
        self.register_buffer("abar", abar[timesteps].float(), persistent=False)
        self.register_buffer("abar_prev", abar_prev.float(), persistent=False)
        self._kernel = [self._kernel_scalars(i) for i in range(self.num_steps)]

    def _kernel_scalars(self, i: int) -> tuple[float, float, float, float, float]:
        """The kernel's scalars at grid point ``i``, once per grid point (Python floats, float64 algebra):
        ``x0_hat = a x - b eps``, ``mu = c x0_hat + d eps``, std ``s``."""
        abar, prev = float(self.abar[i]), float(self.abar_prev[i])
        s = self.eta * math.sqrt(max((1 - prev) / (1 - abar) * (1 - abar / prev), 0.0))
        return (1 / math.sqrt(abar), math.sqrt((1 - abar) / abar), math.sqrt(prev),
                math.sqrt(max(1 - prev - s * s, 0.0)), s)

    def extra_repr(self) -> str:
        return (
            f"scheduler={self.scheduler_name}, num_steps={self.num_steps}, eta={self.eta}, "
            f"guidance_scale={self.guidance_scale}, num_classes={self.num_classes}"
        )

    @property
    def is_stochastic(self) -> bool:
        return self.eta > 0

    # -- conditions -----------------------------------------------------------------
    def encode_conditions(self, conditions: Sequence[Any]) -> Tensor:
        return class_labels(conditions, self.num_classes, self.device)

    # -- the kernel -----------------------------------------------------------------
    def forward(self, x: Tensor, i: int, c: Tensor) -> Tensor:
        t = self.timesteps[i].expand(x.shape[0])
        w = self.guidance_scale
        if w == 1.0 or not self.guided:
            out = self.denoise(x, t, c)
        else:
            out = classifier_free_guidance(self.denoise, x, t, c, self.null(c), w)
        if self.prediction_type == "v_prediction":
            abar = self.abar[i]
            out = abar.sqrt() * out + (1 - abar).sqrt() * x
        return out

    @property
    def guided(self) -> bool:
        """Whether the conditioning has a null condition for classifier-free guidance."""
        return self.num_classes is not None

    def null(self, c: Tensor) -> Tensor:
        """The null (unconditional) conditions of rows ``c``."""
        return torch.full_like(c, self.num_classes)

    def denoise(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """The network's raw prediction at timesteps ``t`` (one call)."""
        return self.net(x, t, c)

    def x0_hat(self, x: Tensor, i: int, output: Tensor) -> Tensor:
        a, b = self._kernel[i][:2]
        return x * a - self.eps(output) * b  # separate products, no fused multiply-add (see constant_std)

    def tweedie_jacobian(self, i: int) -> float:
        """``x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar)``: ``1 / sqrt(abar)`` with eps held constant; a v
        prediction's ``x0_hat = sqrt(abar) x - sqrt(1 - abar) v``: ``sqrt(abar)`` with v held constant."""
        a = self._kernel[i][0]  # 1 / sqrt(abar)
        return 1.0 / a if self.prediction_type == "v_prediction" else a

    def step_std(self, i: int) -> Tensor:
        return torch.tensor(self._kernel[i][4], device=self.abar.device)

    def marginal(self, i: int) -> tuple[float, float]:
        """``(sqrt(abar), sqrt(1 - abar))`` at grid point ``i``; at ``i = T`` the last step's ``abar_prev``."""
        abar = float(self.abar[i]) if i < self.num_steps else float(self.abar_prev[-1])
        return math.sqrt(abar), math.sqrt(max(1.0 - abar, 0.0))

    def eps(self, output: Tensor) -> Tensor:
        """The eps prediction inside a model output (the output itself here)."""
        return output

    def transition(self, x: Tensor, i: int, c: Tensor, output: Optional[Tensor] = None) -> GaussianTransition:
        output = self(x, i, c) if output is None else output
        eps = self.eps(output)
        x0 = self.x0_hat(x, i, output)
        _, _, c_x0, c_eps, s = self._kernel[i]
        mean = x0 * c_x0 + eps * c_eps
        return GaussianTransition(mean=mean, std=constant_std(s, x), x0_hat=x0, output=output)

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)
