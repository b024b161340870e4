"""The analytic testbed: a Gaussian mixture under a VP diffusion, with everything exact.

docs/algorithms.md, section 7. Data ``p0 = sum_k pi_k N(m_k, S_k)``; under
``x_t = a x0 + s eps`` (``a = sqrt(abar_t)``, ``s^2 = 1 - abar_t``) the marginal is
``sum_k pi_k N(a m_k, C_k)``, ``C_k = a^2 S_k + s^2 I``, so the score, eps and the
posterior mean are closed forms. For a linear reward ``r(x) = w.x`` the tilted target
``p0 exp(r / alpha)``, its normaliser ``log Z`` and the soft value
``v_t(x) = alpha log E[exp(r(x0)/alpha) | x_t]`` are closed forms too.

The model output is ``[eps, x0_hat]``: both closed forms from one evaluation.
The schedule is the digits model's (cosine betas, 1,000 training steps) on the
``trailing`` grid, which starts at t = 999 where the VP marginal is N(0, I) to within
1e-4, so the N(0, I) prior is exact; Tweedie is computed in closed form (never by
dividing by ``sqrt(abar)``).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.models.diffusion import EpsDiffusionModel
from tsf.models.flow import FlowModel
from tsf.models.digits import SCHEDULER_CONFIG
from tsf.rewards.base import Reward
from tsf.rewards.linear import LinearReward

GMM_SCHEDULER_CONFIG = {**SCHEDULER_CONFIG, "timestep_spacing": "trailing"}

Covariance = Union[float, Sequence[float], Sequence[Sequence[float]]]


def _covariances(covariances: Sequence[Covariance], k: int, d: int) -> Tensor:
    """Per component: a scalar (isotropic), a length-d list (diagonal) or a d x d matrix."""
    if len(covariances) != k:
        raise ConfigError(f"covariances: expected {k} entries (one per component), got {len(covariances)}")
    out = []
    for j, c in enumerate(covariances):
        c = torch.as_tensor(c, dtype=torch.float64)
        if c.dim() == 0:
            c = c * torch.eye(d, dtype=torch.float64)
        elif c.dim() == 1:
            if len(c) != d:
                raise ConfigError(f"covariance {j}: diagonal of length {len(c)} for dimension {d}")
            c = torch.diag(c)
        elif c.shape != (d, d):
            raise ConfigError(f"covariance {j}: shape {tuple(c.shape)}, expected ({d}, {d})")
        if not torch.allclose(c, c.T) or torch.linalg.eigvalsh(c).min() <= 0:
            raise ConfigError(f"covariance {j} must be symmetric positive definite")
        out.append(c)
    return torch.stack(out)


def _mixture(weights, means, covariances) -> tuple[Tensor, Tensor, Tensor]:
    """Validated float64 (normalised weights, means ``[k, d]``, covariances ``[k, d, d]``)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    m = torch.as_tensor(means, dtype=torch.float64)
    if w.dim() != 1 or (w <= 0).any():
        raise ConfigError(f"weights must be a list of positive numbers, got {weights}")
    if m.dim() != 2 or m.shape[0] != len(w):
        raise ConfigError(f"means: expected {len(w)} vectors of one length, got {means}")
    return w / w.sum(), m, _covariances(covariances, len(w), m.shape[1])


class MixturePosterior(nn.Module):
    """Closed forms of the noised mixture at signal level ``a`` (float64 inside)."""

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.register_buffer("log_pi", weights.log())
        self.register_buffer("m", means)
        self.register_buffer("S", covs)
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())

    def parts(self, x: Tensor, a: Tensor, s: Optional[Tensor] = None):
        """Responsibilities ``log g_k``, ``C_k^-1 (x - a m_k)`` and ``C_k`` for rows ``x [N, d]``
        under ``x = a x0 + s eps`` (``s = sqrt(1 - a^2)``, the VP case, by default)."""
        x = x.double()
        d = x.shape[-1]
        s2 = 1 - a**2 if s is None else s**2
        C = a**2 * self.S + s2 * torch.eye(d, dtype=torch.float64, device=x.device)  # [k, d, d]
        L = torch.linalg.cholesky(C)
        diff = x[:, None, :] - a * self.m[None]  # [N, k, d]
        z = torch.linalg.solve_triangular(L[None], diff[..., None], upper=False)[..., 0]
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)  # [k]
        log_n = -0.5 * (z**2).sum(-1) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)
        log_g = torch.log_softmax(self.log_pi + log_n, dim=-1)  # [N, k]
        cinv_diff = torch.cholesky_solve(diff[..., None], L[None])[..., 0]  # [N, k, d]
        return log_g, cinv_diff, C

    def score_and_x0(self, x: Tensor, a: Tensor, s: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The marginal's score and ``E[x0 | x]`` under ``x = a x0 + s eps``."""
        log_g, cinv_diff, _ = self.parts(x, a, s)
        g = log_g.exp()[..., None]
        mu = self.m[None] + a * torch.einsum("kij,nkj->nki", self.S, cinv_diff)  # per-component posterior means
        return -(g * cinv_diff).sum(1), (g * mu).sum(1)

    def eps_and_x0(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        score, x0 = self.score_and_x0(x, a)
        return -(1 - a**2).sqrt() * score, x0

    def soft_value(self, x: Tensor, a: Tensor, w: Tensor, alpha: float) -> Tensor:
        """``alpha log sum_k g_k exp(w.mu_k / alpha + w.P_k w / (2 alpha^2))``."""
        log_g, cinv_diff, C = self.parts(x, a)
        mu = self.m[None] + a * torch.einsum("kij,nkj->nki", self.S, cinv_diff)
        Sw = self.S @ w  # [k, d]
        PwW = (Sw * w).sum(-1) - a**2 * (Sw * torch.linalg.solve(C, Sw[..., None])[..., 0]).sum(-1)  # w.P_k w
        return alpha * torch.logsumexp(log_g + (mu @ w) / alpha + PwW / (2 * alpha**2), dim=-1)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``[eps, x0_hat]`` concatenated on the last dimension (one closed-form evaluation)."""
        out = x.new_empty(*x.shape[:-1], 2 * x.shape[-1])
        for tv in t.unique():
            rows = t == tv
            out[rows] = torch.cat(self.eps_and_x0(x[rows], self.alphas_cumprod[tv].sqrt()), -1).to(x.dtype)
        return out


class GaussianMixture(EpsDiffusionModel):
    """A Gaussian mixture base model with the exact eps, Tweedie and soft value.

    Args:
        weights: mixture weights ``pi_k`` (normalised).
        means: component means ``m_k``, each of length ``d``.
        covariances: per component a variance, a diagonal, or a full ``d x d`` matrix.
        scheduler, num_steps, eta: as for any eps-prediction model.
        beta_schedule: the diffusers beta schedule (default: the digits model's cosine schedule).
        batch_invariant: pad calls on fewer than 16 rows (default on: cheap here, and what makes a sample
            bitwise independent of its batch and of the number of processes).
    """

    has_images = False

    def __init__(
        self,
        weights: list[float],
        means: list[list[float]],
        covariances: list[Covariance],
        scheduler: Literal["ddim", "ddpm"] = "ddim",
        num_steps: int = 100,
        eta: float = 1.0,
        beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2",
        batch_invariant: bool = True,
    ) -> None:
        w, m, S = _mixture(weights, means, covariances)
        from diffusers import DDPMScheduler

        config = {**GMM_SCHEDULER_CONFIG, "beta_schedule": beta_schedule}
        abar = DDPMScheduler(**config).alphas_cumprod
        net = MixturePosterior(w, m, S, abar)
        super().__init__(net, config, scheduler=scheduler, num_steps=num_steps, eta=eta, sample_shape=(m.shape[1],),
                         batch_invariant=batch_invariant)
        self.register_buffer("abar_state", torch.cat([self.abar, self.abar_prev[-1:]]).double(), persistent=False)

    def extra_repr(self) -> str:
        return (f"weights={self.net.log_pi.exp().tolist()}, means={self.net.m.tolist()}, "
                f"covariances={self.net.S.tolist()}, " + super().extra_repr())

    def eps(self, output: Tensor) -> Tensor:
        return output[..., : output.shape[-1] // 2]

    def x0_hat(self, x: Tensor, i: int, output: Tensor) -> Tensor:
        """Tweedie in closed form (part of the model output), never ``(x - s eps) / a``."""
        return output[..., output.shape[-1] // 2:]

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    # -- closed forms for a linear reward --------------------------------------------------
    @staticmethod
    def _direction(reward: Union[Reward, Sequence[float], Tensor]) -> Tensor:
        if isinstance(reward, LinearReward):
            return reward.direction.double()
        if isinstance(reward, Reward):
            raise ConfigError(f"closed forms need a linear reward (tsf.models.gmm.LinearReward), got {reward.name!r}")
        return torch.as_tensor(reward, dtype=torch.float64)

    def exact_value(self, x: Tensor, i: int, reward, alpha: float) -> Tensor:
        """The soft value ``v(x_i)`` at grid point ``i`` (``i = num_steps``: the reward itself), float64."""
        w = self._direction(reward).to(x.device)
        if i == self.num_steps:
            return x.double() @ w
        return self.net.soft_value(x, self.abar_state[i].sqrt(), w, alpha)

    def tilted(self, reward, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
        """Weights, means and covariances of ``p0(x) exp(w.x / alpha) / Z``."""
        w = self._direction(reward).to(self.net.m.device)
        S, m = self.net.S, self.net.m
        Sw = S @ w
        logits = self.net.log_pi + m @ w / alpha + (Sw * w).sum(-1) / (2 * alpha**2)
        return torch.softmax(logits, 0), m + Sw / alpha, S

    def log_normalizer(self, reward, alpha: float) -> float:
        """``log Z = log E_p0[exp(w.x / alpha)]``."""
        w = self._direction(reward).to(self.net.m.device)
        S, m = self.net.S, self.net.m
        return float(torch.logsumexp(self.net.log_pi + m @ w / alpha + ((S @ w) * w).sum(-1) / (2 * alpha**2), 0))

    def component_of(self, x: Tensor) -> Tensor:
        """The most responsible data component of each row (for mode-weight checks)."""
        return self.net.parts(x, torch.tensor(1.0, dtype=torch.float64, device=x.device))[0].argmax(-1)


class MixtureVelocity(nn.Module):
    """The exact velocity of the linear path ``x_t = (1 - t) x0 + t eps``: ``u = (x - E[x0 | x_t]) / t``."""

    def __init__(self, posterior: MixturePosterior) -> None:
        super().__init__()
        self.posterior = posterior

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        out = torch.empty_like(x)
        for tv in t.unique():
            rows = t == tv
            tt = tv.double()
            x0 = self.posterior.score_and_x0(x[rows], 1 - tt, tt)[1]
            out[rows] = ((x[rows].double() - x0) / tt).to(x.dtype)
        return out


class GaussianMixtureFlow(FlowModel):
    """The Gaussian mixture as a flow model: the exact linear-path velocity, sampled by any flow sampler.

    Args:
        weights, means, covariances: the mixture, as for :class:`GaussianMixture`.
        num_steps, interpolant, diffusion, diffusion_norm, time_grid, last_step: as for
            :class:`~tsf.models.flow.FlowModel`.
        batch_invariant: pad calls on fewer than 16 rows (default on: cheap here, and what makes a sample
            bitwise independent of its batch and of the number of processes).
    """

    has_images = False

    def __init__(self, weights: list[float], means: list[list[float]], covariances: list[Covariance],
                 num_steps: int = 100, interpolant: Literal["linear", "vp"] = "linear",
                 diffusion: Literal["square", "linear", "constant", "none"] = "square", diffusion_norm: float = 3.0,
                 time_grid: Optional[Literal["uniform", "reference"]] = None, batch_invariant: bool = True,
                 last_step: Optional[Literal["tweedie", "euler"]] = None) -> None:
        w, m, S = _mixture(weights, means, covariances)
        posterior = MixturePosterior(w, m, S, torch.ones(1))
        super().__init__(MixtureVelocity(posterior), num_steps=num_steps, interpolant=interpolant,
                         diffusion=diffusion, diffusion_norm=diffusion_norm, time_grid=time_grid,
                         sample_shape=(m.shape[1],), batch_invariant=batch_invariant, last_step=last_step)
        self.posterior = posterior

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def component_of(self, x: Tensor) -> Tensor:
        return self.posterior.parts(x, torch.tensor(1.0, dtype=torch.float64, device=x.device))[0].argmax(-1)
