"""Value estimates ``v(x_i)`` for the particle samplers (docs/algorithms.md, sections 1 and 3).

* ``posterior_mean`` (PM): ``v(x_i) = r(decode(x0_hat(x_i)))``, one model call per row;
  that call's output is returned so the sampler can reuse it for the next transition. Its gradient
  is taken through the network (``gradient_through: network``) or through the Tweedie estimate
  alone with the network output held constant (``tweedie``, :meth:`PosteriorMeanValue.tweedie_gradient`).
* ``exact``: a model's closed-form soft value (the Gaussian mixture with a linear reward).
* :class:`LearnedValue` (MC): a trained network ``v_phi(x_i, t, c)`` from
  ``tsf fit --config configs/digits/value.yaml``.

At ``i = num_steps`` (x0) every value is the reward itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.loading import LazyLoadModule
from tsf.models.base import BaseModel
from tsf.registry import Registry
from tsf.rewards.base import Reward


class ValueFunction(LazyLoadModule):
    """``v(x_i)`` at grid point ``i`` for rows ``x``; returns ``(v [N], model output or None)``.

    A value that calls the base model (:attr:`calls_model`) returns that call's output, which a sampler hands
    back to :meth:`~tsf.models.base.BaseModel.transition`; with ``kernel=True`` it returns the kernel at grid
    point ``i`` itself (a :class:`~tsf.models.base.Transition`, built from the same output and the same Tweedie
    estimate the value scored), for a sampler that moves every valued row on (SMC), so that the estimate is
    computed once per step."""

    #: whether computing the value calls the base model (and returns its output)
    calls_model: bool = False

    def forward(self, model: BaseModel, reward: Reward, x: Tensor, i: int, c: Tensor, conditions: list,
                alpha: float, kernel: bool = False) -> tuple[Tensor, Optional[Tensor]]:  # pragma: no cover
        raise NotImplementedError


VALUES: Registry[ValueFunction] = Registry("value")


#: The largest ``d x0_hat / d x`` (network output held constant) that ``gradient_through: tweedie`` uses. With eps
#: held constant it is ``1 / sqrt(abar)``, while the true Jacobian, ``(sqrt(abar) / (1 - abar)) Cov[x0 | x_t]``, goes
#: to 0 as ``abar`` does: near zero signal-to-noise the approximation is no gradient at all (on the mixture's grid,
#: ``abar = 2.4e-9`` at t = 999 gives ``J = 20291`` and moved every particle 90 standard deviations in one step).
#: Above it (``abar < 1e-4``) the gradient is 0, the base kernel's proposal. The digits grid starts at ``J = 34``,
#: SD 1.5's at 13-14, and a flow's ``1 / c_s`` is at most 1.
TWEEDIE_MAX_JACOBIAN = 100.0


@VALUES.register("posterior_mean")
class PosteriorMeanValue(ValueFunction):
    """``r(decode(x0_hat(x_i)))``: the reward of the Tweedie estimate (SVDD-PM, DAS)."""

    calls_model = True

    def forward(self, model, reward, x, i, c, conditions, alpha, kernel=False):
        if i == model.num_steps:
            return reward(model.decode(x), conditions), None
        if kernel:
            tr = model.transition(x, i, c)
            return reward(model.decode(tr.x0_hat), conditions), tr
        out = model(x, i, c)
        return reward(model.decode(model.x0_hat(x, i, out)), conditions), out

    def tweedie_gradient(self, model, reward, x, i, c, conditions, kernel=False) -> tuple[Tensor, Tensor, Tensor]:
        """``(v, model output, g)`` at grid point ``i < T`` with the gradient taken through the Tweedie estimate
        alone, the network's output held constant: ``g = J grad_{x0} r(decode(x0))`` at ``x0 = x0_hat(x)``, with
        ``J = model.tweedie_jacobian(i)`` (``1 / sqrt(abar)`` for eps prediction). The network runs without a
        graph; only the decoder and the reward are differentiated (docs/algorithms.md, section 4). Where ``J``
        exceeds :data:`TWEEDIE_MAX_JACOBIAN` (an eps model near zero signal-to-noise) ``g`` is 0 and the reward
        is called without a graph. With ``kernel`` the second item is the kernel at grid point ``i``."""
        J = model.tweedie_jacobian(i)
        with torch.no_grad():
            if kernel:
                out = model.transition(x, i, c)
                x0 = out.x0_hat
            else:
                out = model(x, i, c)
                x0 = model.x0_hat(x, i, out)
            if not abs(J) <= TWEEDIE_MAX_JACOBIAN:  # (also inf or nan: abar = 0)
                return reward(model.decode(x0), conditions), out, torch.zeros_like(x0)
        with torch.enable_grad():
            x0 = x0.detach().requires_grad_(True)
            v = reward(model.decode(x0), conditions)
            (g,) = torch.autograd.grad(v.sum(), x0, allow_unused=True)
        g = torch.zeros_like(x0) if g is None else g
        return v.detach(), out, (g * J).detach()


@VALUES.register("exact")
class ExactValue(ValueFunction):
    """The model's closed-form soft value (``model.exact_value``), e.g. the Gaussian mixture's."""

    def forward(self, model, reward, x, i, c, conditions, alpha, kernel=False):
        if not hasattr(model, "exact_value"):
            raise ConfigError(f"value: exact needs a model with a closed-form value; {type(model).__name__} has none")
        if i == model.num_steps:
            return reward(model.decode(x), conditions), None
        return model.exact_value(x, i, reward, alpha), None


def value_time(model: BaseModel, i: int) -> Tensor:
    """The time a learned value network sees at grid point ``i``: a diffusion model's timestep (``0 .. 999``),
    or a flow model's grid time ``s_i`` in [0, 1] (1 = noise) times ``FLOW_TIME_SCALE`` (1000), the scale of the
    diffusion timesteps, which the digits networks' time embedding is built for (the digits flow network sees
    its time so scaled too). A scalar tensor on the model's device."""
    from tsf.models.flow import FlowModel
    from tsf.models.masked import MaskedDiffusion

    timesteps = getattr(model, "timesteps", None)
    if timesteps is not None:
        return timesteps[i]
    if isinstance(model, MaskedDiffusion):  # its time t_i = 1 - i / T, scaled as a flow's
        from tsf.models.digits import FLOW_TIME_SCALE

        return torch.tensor(model.time(i) * FLOW_TIME_SCALE, device=model.device)
    if isinstance(model, FlowModel):
        from tsf.models.digits import FLOW_TIME_SCALE

        return (model._grid[i] * FLOW_TIME_SCALE).float()
    raise ConfigError(f"a learned value needs the grid time of the model; {type(model).__name__} has no "
                      "timesteps (diffusion) or flow grid")


class LearnedValue(ValueFunction):
    """A trained value network ``v_phi(x_i, t, c)`` (SVDD-MC), conditioned on the sample's class
    (the reward's condition, ``None`` -> the null label), whatever the base model's conditioning. The time
    ``t`` is :func:`value_time`: a diffusion model's timestep, or ``1000 s`` on a flow model's grid (and a masked
    model's time). The network sees ``model.value_input(x)``: the states, or a masked model's one-hot tokens.

    Args:
        checkpoint: the ``value.safetensors`` written by ``tsf fit --config configs/digits/value.yaml``.
    """

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        from tsf.models.digits import build_network

        self.checkpoint = str(checkpoint)
        if not Path(self.checkpoint).is_file():
            raise ConfigError(f"value checkpoint {self.checkpoint!r} not found; train it with `tsf fit` on the value "
                              "config of its reward (configs/digits/value.yaml for `digit`, "
                              "configs/digits_compress/value.yaml for `compressibility`)")
        self.net = build_network(self.checkpoint)

    def _load(self) -> None:
        from tsf.models.digits import load_network

        device = next(self.net.parameters()).device
        load_network(self.checkpoint, self.net).to(device)

    def forward(self, model, reward, x, i, c, conditions, alpha, kernel=False):
        if i == model.num_steps:
            return reward(model.decode(x), conditions), None
        self.load()
        if next(self.net.parameters()).device != x.device:  # a sampler is no nn.Module: follow the states
            self.net.to(x.device)
        t = value_time(model, i).expand(x.shape[0])
        null = self.net.config["num_classes"]
        labels = torch.tensor([null if k is None else int(k) for k in conditions], device=x.device)
        return self.net(model.value_input(x), t, labels).reshape(-1), None


def build_value(spec: Union[str, ValueFunction]) -> ValueFunction:
    return VALUES.build(spec)
