"""Flow-matching models behind the Gaussian-kernel interface (docs/algorithms.md, section 5).

Conventions: ``s = 1`` is noise, ``s = 0`` data, ``x_s = alpha_s x0 + sigma_s eps``. The network
predicts the velocity ``u = d x_t / d t`` of the linear path (``alpha = 1 - t``, ``sigma = t``).

* ``interpolant: linear`` samples that path; ``interpolant: vp`` samples the VP interpolant
  ``abar_s = exp(-T(s) / 2)``, ``sbar_s = sqrt(1 - exp(-T(s)))``, ``T(s) = s^2 (b_max - b_min) / 2 + s b_min``,
  by the conversion of Kim et al. 2025 (RBF): matching signal-to-noise, ``t_s = sbar / (abar + sbar)``,
  ``c_s = abar + sbar`` and ``ubar_s(x) = (c_dot / c) x + c t_dot u_{t_s}(x / c)``.
* On either interpolant, with velocity ``u``:
  ``x0_hat = (sigma u - sigma_dot x) / (alpha_dot sigma - sigma_dot alpha)``,
  ``score = (alpha u - alpha_dot x) / (sigma (alpha_dot sigma - alpha sigma_dot))``.
* The reverse SDE ``dx = [u - g^2 score / 2] ds + g dW`` has the same marginals for any
  ``g(s) >= 0``; Euler-Maruyama from ``s`` to ``s_prev``: ``N(x - (u - g^2 score / 2) ds, g^2 ds I)``,
  ``ds = s - s_prev``. ``diffusion: none`` (g = 0) is the ODE: deterministic, no particle children.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.models.base import BaseModel, GaussianTransition, class_labels, constant_std

B_MIN, B_MAX = 0.1, 20.0
DIFFUSIONS = ("square", "linear", "constant", "none")
#: the default finish of a flow model's last step (see ``FlowModel``'s ``last_step``)
LAST_STEP = "euler"


def vp_schedule(s: Tensor, b_min: float = B_MIN, b_max: float = B_MAX) -> dict[str, Tensor]:
    """``abar, sbar, t, c`` of the VP interpolant at ``s`` and their derivatives (closed forms)."""
    s = s.double()
    T = 0.5 * s**2 * (b_max - b_min) + s * b_min
    T_dot = s * (b_max - b_min) + b_min
    abar = torch.exp(-T / 2)
    sbar = torch.sqrt(-torch.expm1(-T))
    abar_dot = -0.5 * T_dot * abar
    sbar_dot = T_dot * torch.exp(-T) / (2 * sbar)
    c = abar + sbar
    c_dot = abar_dot + sbar_dot
    t = sbar / c
    t_dot = (sbar_dot * c - sbar * c_dot) / c**2
    return dict(alpha=abar, sigma=sbar, alpha_dot=abar_dot, sigma_dot=sbar_dot, t=t, t_dot=t_dot, c=c, c_dot=c_dot)


def linear_schedule(s: Tensor) -> dict[str, Tensor]:
    s = s.double()
    one = torch.ones_like(s)
    return dict(alpha=1 - s, sigma=s, alpha_dot=-one, sigma_dot=one, t=s, t_dot=one, c=one, c_dot=0 * one)


def diffusion_coefficient(kind: str, norm: float, s: Tensor) -> Tensor:
    """``g(s)``: ``square`` = norm s^2 (the reference, norm 3), ``linear`` = norm s, ``constant`` = norm, ``none`` = 0."""
    if kind == "square":
        return norm * s**2
    if kind == "linear":
        return norm * s
    if kind == "constant":
        return norm * torch.ones_like(s)
    if kind == "none":
        return torch.zeros_like(s)
    raise ConfigError(f"unknown diffusion {kind!r}; known: {', '.join(DIFFUSIONS)}")


class FlowModel(BaseModel):
    """A velocity network on the linear path, sampled as an ODE or SDE on the linear or VP interpolant.

    Args:
        net: module called as ``net(x, t, labels) -> u`` with ``t`` in [0, 1] (1 = noise).
        num_steps: Euler(-Maruyama) steps T.
        interpolant: ``linear`` or ``vp`` (the converted VP interpolant).
        diffusion: ``g(s)``: ``square`` (norm s^2), ``linear``, ``constant`` or ``none`` (the ODE).
        diffusion_norm: the norm of ``g`` (the reference: 3 with ``square``).
        time_grid: ``uniform`` (``s_k = 1 - k / T``, the default) or ``reference``
            (``s_k = sqrt(1 - (k / T)^2)``, the RBF reference's VP grid): fine steps near the noise and
            a long last interval, from ``s = sqrt(2 T - 1) / T`` (0.44 at T = 10) to 0.
        last_step: how the last step, from ``s_{T-1}`` to 0, ends: ``tweedie`` returns the Tweedie
            estimate ``x0_hat(x_{s_{T-1}})`` (deterministic, as the linear ODE's last Euler step and DDIM's
            last step do; with the reference grid this is the RBF reference's finish, which stops at
            ``s_{T-1}``), ``euler`` takes one more Euler-Maruyama step, whose VP coefficients are stiff
            near ``s = 0``. The README's "VP finish" table gives the measured bias of each.
        num_classes: classes of the conditioning (``None``: unconditional); class ``num_classes``
            is the null label.
        sample_shape: shape of one sample.
        shift: time shift of the grid (SD3: 3; 1 = none), see :meth:`set_grid`.
        batch_invariant: pad every call on fewer than 16 rows to 16, so that a sample is bitwise the same
            whatever batch or process draws it (costs the padded rows; see ``BaseModel.batch_invariant``).
    """

    def __init__(
        self,
        net: nn.Module,
        num_steps: int = 50,
        interpolant: Literal["linear", "vp"] = "linear",
        diffusion: Literal["square", "linear", "constant", "none"] = "square",
        diffusion_norm: float = 3.0,
        time_grid: Optional[Literal["uniform", "reference"]] = None,
        num_classes: Optional[int] = None,
        sample_shape: Sequence[int] = (1, 8, 8),
        shift: float = 1.0,
        batch_invariant: bool = False,
        last_step: Optional[Literal["tweedie", "euler"]] = None,
    ) -> None:
        super().__init__()
        if num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
        if interpolant not in ("linear", "vp"):
            raise ConfigError(f"unknown interpolant {interpolant!r}; known: linear, vp")
        if diffusion not in DIFFUSIONS:
            raise ConfigError(f"unknown diffusion {diffusion!r}; known: {', '.join(DIFFUSIONS)}")
        if diffusion_norm < 0:
            raise ConfigError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
        time_grid = time_grid or "uniform"
        if time_grid not in ("uniform", "reference"):
            raise ConfigError(f"unknown time_grid {time_grid!r}; known: uniform, reference")
        if shift <= 0:
            raise ConfigError(f"shift must be > 0, got {shift}")
        last_step = last_step or LAST_STEP
        if last_step not in ("tweedie", "euler"):
            raise ConfigError(f"unknown last_step {last_step!r}; known: tweedie, euler")
        self.last_step = last_step
        self.net = net
        self.num_steps = int(num_steps)
        self.interpolant, self.diffusion, self.diffusion_norm = interpolant, diffusion, float(diffusion_norm)
        self.time_grid = time_grid
        self.num_classes = num_classes
        self.sample_shape = tuple(sample_shape)
        self.batch_invariant = bool(batch_invariant)
        self.set_grid(shift)

    def set_grid(self, shift: float = 1.0) -> None:
        """The time grid ``s_0 = 1 > ... > s_T = 0`` and its schedule; ``shift`` warps it as SD3's and
        FLUX's schedulers do, ``s -> shift s / (1 + (shift - 1) s)`` (more steps near the noise)."""
        k = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        grid = 1 - k if self.time_grid == "uniform" else torch.sqrt(1 - k**2)
        grid = shift * grid / (1 + (shift - 1) * grid)
        self.use_grid(grid, shift)

    def use_grid(self, grid: Tensor, shift: Optional[float] = None) -> None:
        """Sample on the time grid ``grid`` (``T + 1`` points from ``s_0 = 1`` down to ``s_T = 0``): its schedule,
        diffusion coefficients and kernel scalars; ``shift`` is the warp that made it, when one number says it."""
        grid = torch.as_tensor(grid, dtype=torch.float64).flatten().cpu()
        if len(grid) != self.num_steps + 1 or not bool((grid[:-1] > grid[1:]).all()) or float(grid[-1]) != 0.0 \
                or abs(float(grid[0]) - 1.0) > 1e-6:
            raise ConfigError(f"a time grid of {self.num_steps} steps runs down from 1 to 0 in {self.num_steps + 1} "
                              f"decreasing points, got {grid.tolist()}")
        self.shift = None if shift is None else float(shift)
        sched = (vp_schedule if self.interpolant == "vp" else linear_schedule)(grid)
        for key, val in sched.items():
            self.register_buffer(f"_{key}", val, persistent=False)
        self.register_buffer("_grid", grid, persistent=False)
        self.register_buffer("_g", diffusion_coefficient(self.diffusion, self.diffusion_norm, grid), persistent=False)
        self._kernel = self._kernel_scalars()

    def _kernel_scalars(self) -> dict[str, list[float]]:
        """The kernel's scalars per grid point, once per grid (float64 algebra, as Python floats):
        ``x0_hat = x0_u u - x0_x x``, ``score = sc_u u - sc_x x``, the Euler-Maruyama mean
        ``mu = mu_x x + mu_u u`` and std; ``t``, ``c``, ``c_dot``, ``t_dot`` of the interpolant."""
        a, s, ad, sd = self._alpha, self._sigma, self._alpha_dot, self._sigma_dot
        den = ad * s - sd * a
        k = {"x0_u": s / den, "x0_x": sd / den, "sc_u": a / (s * den), "sc_x": ad / (s * den)}
        ds = self._grid[:-1] - self._grid[1:]
        g = self._g[:-1]
        noisy = g > 0
        half = 0.5 * g**2 * ds  # mu = x - (u - g^2 score / 2) ds
        k["mu_x"] = torch.where(noisy, 1 - half * k["sc_x"][:-1], torch.ones_like(ds))
        k["mu_u"] = torch.where(noisy, half * k["sc_u"][:-1] - ds, -ds)
        k["std"] = g * ds.sqrt()
        if self.last_step == "tweedie":  # the last step returns x0_hat(x_{s_{T-1}}): mu = x0_u u - x0_x x, no noise
            k["mu_x"][-1], k["mu_u"][-1], k["std"][-1] = -k["x0_x"][-2], k["x0_u"][-2], 0.0
        k.update(t=self._t, c=self._c, c_dot=self._c_dot, t_dot=self._t_dot)
        return {name: v.tolist() for name, v in k.items()}

    def extra_repr(self) -> str:
        return (f"num_steps={self.num_steps}, interpolant={self.interpolant}, diffusion={self.diffusion}, "
                f"diffusion_norm={self.diffusion_norm}, time_grid={self.time_grid}, last_step={self.last_step}, "
                f"shift={self.shift}")

    @property
    def is_stochastic(self) -> bool:
        return self.diffusion != "none" and self.diffusion_norm > 0

    def encode_conditions(self, conditions: Sequence[Any]) -> Tensor:
        return class_labels(conditions, self.num_classes, self.device)

    # -- the kernel -----------------------------------------------------------------
    def forward(self, x: Tensor, i: int, c: Tensor) -> Tensor:
        """The velocity of the sampled interpolant at grid point ``i`` (one network call)."""
        k = self._kernel
        t = torch.full((x.shape[0],), k["t"][i], dtype=x.dtype, device=x.device)
        if self.interpolant == "linear":
            return self.velocity(x, t, c)
        cc, c_dot, t_dot = k["c"][i], k["c_dot"][i], k["t_dot"][i]
        return (c_dot / cc) * x + cc * t_dot * self.velocity(x / cc, t, c)

    def velocity(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """The network's velocity ``u_t(x)`` on the linear path, ``t`` in [0, 1] per row (one call)."""
        return self.net(x, t, c)

    def x0_hat(self, x: Tensor, i: int, output: Tensor) -> Tensor:
        return output * self._kernel["x0_u"][i] - x * self._kernel["x0_x"][i]

    def tweedie_jacobian(self, i: int) -> float:
        """The network sees ``x / c_s`` at ``t_s`` and ``x0_hat = x / c_s - t_s u_{t_s}(x / c_s)`` (linear path:
        ``c = 1``, ``x0_hat = x - s u``), so with ``u`` held constant ``d x0_hat / d x = 1 / c_s``."""
        return 1.0 / self._kernel["c"][i]

    def score(self, x: Tensor, i: int, output: Tensor) -> Tensor:
        return output * self._kernel["sc_u"][i] - x * self._kernel["sc_x"][i]

    def marginal(self, i: int) -> tuple[float, float]:
        """``(alpha, sigma)`` of the sampled interpolant (linear or VP) at grid point ``i``."""
        return float(self._alpha[i]), float(self._sigma[i])

    def step_std(self, i: int) -> float:
        return self._kernel["std"][i]

    def transition(self, x: Tensor, i: int, c: Tensor, output: Optional[Tensor] = None) -> GaussianTransition:
        u = self(x, i, c) if output is None else output
        k = self._kernel
        mean = x * k["mu_x"][i] + u * k["mu_u"][i]
        return GaussianTransition(mean=mean, std=constant_std(k["std"][i], x), x0_hat=self.x0_hat(x, i, u), output=u)

    def decode(self, x0: Tensor) -> Tensor:
        return ((x0 + 1) / 2).clamp(0, 1)
