"""SVDD: soft value-based decoding (Li et al. 2024, arXiv 2408.08252; docs/algorithms.md, section 3).

Per output, one state. Each step draws ``M`` children from the base kernel, values each
at the child's own grid point (one look-ahead model call per child with the posterior-
mean value), and keeps one child drawn from ``softmax(v / alpha)`` (``alpha = 0``:
argmax). The kept child's look-ahead output is the next step's model output, so no call
is repeated: NFE = ``1 + M (T - 1)``. At the last step the children are candidate x0 and
are selected by the true reward.
"""

from __future__ import annotations

from typing import Union

import torch

from tsf.errors import ConfigError
from tsf.samplers.base import Sampler
from tsf.samplers.smc import NonFiniteRewardError, draw_categorical
from tsf.samplers.value import ValueFunction, build_value


class SVDD(Sampler):
    """SVDD-PM (``value: posterior_mean``) or SVDD-MC (``value:`` a :class:`LearnedValue`).

    Args:
        num_particles: M, children per step.
        alpha: temperature of the selection; 0 takes the argmax (the paper's image setting).
        value: ``posterior_mean``, ``exact`` or a learned value.
    """

    name = "svdd"
    needs_stochastic_kernel = True

    def __init__(self, num_particles: int = 8, alpha: float = 0.0,
                 value: Union[str, ValueFunction] = "posterior_mean", max_batch: int = 4096) -> None:
        super().__init__(num_particles=num_particles, max_batch=max_batch)
        if alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.value_fn = build_value(value)

    def __repr__(self) -> str:
        return f"SVDD(M={self.num_particles}, alpha={self.alpha})"

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        return {"num_particles": max(1, (budget - 1) // max(1, num_steps - 1))}  # NFE = 1 + M (T - 1)

    @torch.no_grad()
    def _sample(self, model, reward, conditions, c, noise):
        M, T, B = self.num_particles, model.num_steps, len(conditions)
        conds_m, c_m = self.repeat(conditions, c, M)
        x = model.prior(noise.for_kernel(model, 1))
        out = None
        for i in range(T):
            tr = self.transition(model, x, i, c, out)
            children = tr.children(M, noise.for_kernel(model, M))
            images = None
            if i + 1 < T:
                v, out_c, _ = self.value(model, reward, self.value_fn, children, i + 1, c_m, conds_m, self.alpha)
            else:  # the children are candidate x0: valued by the reward itself
                v, images = self.final_value(model, reward, children, conds_m, lambda: self.value(
                    model, reward, self.value_fn, children, T, c_m, conds_m, self.alpha)[0])
                out_c = None
            v = v.view(B, M).double()
            v = torch.where(torch.isfinite(v), v, -torch.inf)
            if torch.isinf(v).all(1).any():
                raise NonFiniteRewardError(f"every child of a sample has a non-finite value at step {i + 1} of {T}")
            u = noise.rand(1, dtype=torch.float64)[:, 0]
            pick = v.argmax(1) if self.alpha == 0 else draw_categorical(v / self.alpha, u)
            rows = pick + M * torch.arange(B, device=v.device)
            x = children[rows]
            out = None if out_c is None else out_c[rows]
        return x, v.gather(1, pick[:, None])[:, 0].float(), {}, None if images is None else images[rows]
