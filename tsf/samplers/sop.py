"""Search over Paths (SoP; Ma et al. 2025, arXiv 2501.09732; the RBF paper's baseline, ``N = 2``, ``K = 5``; docs/algorithms.md, section 10).

``N`` paths per output, started by the model's kernel (the ODE: a flow model's ``diffusion: none``, DDIM with
``eta = 0``) from the prior to a first grid point ``i0``. Then, while a path is short of ``x0``: each path at
grid point ``j`` is noised forward ``K`` times by the forward process to ``a = j - df``,
``q(x_a | x_j) = N((alpha_a / alpha_j) x, (sigma_a^2 - (alpha_a / alpha_j)^2 sigma_j^2) I)``
(:meth:`~tsf.models.base.BaseModel.renoise`), each candidate is solved back by the kernel over ``db > df`` steps
to ``b = min(T, a + db)``, and the best ``N`` of the ``N K`` candidates by their value at ``b`` (the reward of
their Tweedie estimate, at their own grid point) are the paths of the next round. At ``b = T`` the candidates are
``x0``: the one with the highest reward is the output. Each round moves the paths ``db - df`` grid points on.

NFE, counted as run: ``N i0 + N K sum_r (b_r - a_r)``, plus ``N K`` per round that ends before ``x0`` for the
posterior-mean value (one model call per candidate; ``value: last_step`` uses the Tweedie estimate of each
candidate's last kernel step instead, as the authors' code does, and costs none).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from tsf.errors import ConfigError
from tsf.samplers.base import Noise, Sampler, integer_at_least
from tsf.samplers.smc import NonFiniteRewardError
from tsf.samplers.value import ValueFunction, build_value

#: the value that costs no NFE: the Tweedie estimate of a candidate's last kernel step (the authors' code)
LAST_STEP = "last_step"


def kernel_path(sampler: Sampler, model, x: Tensor, start: int, stop: int, c: Tensor, noise: Noise, k: int,
                output: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """The model's kernel from grid point ``start`` to ``stop`` on rows ``x`` (``k`` per sample): ``(x at stop,
    the Tweedie estimate of the last step's start or None)``. ``output``: the model output at ``x`` (saves a call).
    A step without noise (the ODE, DDIM with ``eta = 0``) draws none."""
    x0_hat = None
    for i in range(start, stop):
        tr = sampler.transition(model, x, i, c, output if i == start else None)
        x = tr.mean if tr.deterministic else tr.sample(noise.for_kernel(model, k))
        x0_hat = tr.x0_hat
    return x, x0_hat


def default_levels(num_steps: int) -> tuple[int, int, int]:
    """``(i0, df, db)`` for a grid of ``T`` steps: two rounds of ``n = max(1, round(T / 10))`` grid points each,
    ``i0 = max(1, T - 2 n)``, ``df = round(0.7 T)`` (at most ``i0``), ``db = df + n``; at ``T = 10``: 8, 7, 8 (paths at
    ``s = 0.2`` noised to ``0.9``, solved to ``0.1``, noised to ``0.8``, solved to 0), near the authors' levels
    (0.12 noised to 0.9, 0.81 solved back, four rounds)."""
    T = int(num_steps)
    n = max(1, round(T / 10))
    i0 = max(1, T - 2 * n)
    df = min(round(0.7 * T), i0)
    return i0, df, df + n


class SoP(Sampler):
    """Search over Paths.

    Args:
        num_particles: K, forward re-noisings (candidates) per path and round.
        num_paths: N, paths kept per output (the best ``N`` of the ``N K`` candidates).
        first_level: ``i0``, the grid point the first kernel run stops at (``1 .. T - 1``).
        forward_steps: ``df``, grid points a re-noising goes back towards the noise (``0 .. i0``).
        backward_steps: ``db > df``, kernel steps that solve a candidate back.
            The three default (``None``) to :func:`default_levels` of the model's ``T``.
        value: a candidate's value before ``x0``: ``posterior_mean`` (the reward of its Tweedie estimate at its own
            grid point, one model call), ``last_step`` (the Tweedie estimate of its last kernel step, no call: the
            authors' code), ``exact`` or a learned value.
    """

    name = "sop"

    def __init__(self, num_particles: int = 5, num_paths: int = 2, first_level: Optional[int] = None,
                 forward_steps: Optional[int] = None, backward_steps: Optional[int] = None,
                 value: Union[str, ValueFunction] = "posterior_mean", max_batch: int = 4096) -> None:
        super().__init__(num_particles=num_particles, max_batch=max_batch)
        self.num_paths = integer_at_least("num_paths", num_paths, 1)
        self.first_level, self.forward_steps, self.backward_steps = first_level, forward_steps, backward_steps
        if forward_steps is not None and forward_steps < 0:
            raise ConfigError(f"forward_steps must be >= 0, got {forward_steps}")
        if forward_steps is not None and backward_steps is not None and backward_steps <= forward_steps:
            raise ConfigError(f"backward_steps ({backward_steps}) must exceed forward_steps ({forward_steps}): "
                              "each round moves the paths backward_steps - forward_steps grid points on")
        self.value_fn = None if value == LAST_STEP else build_value(value)

    def __repr__(self) -> str:
        return (f"SoP(N={self.num_paths}, K={self.num_particles}, first_level={self.first_level}, "
                f"forward_steps={self.forward_steps}, backward_steps={self.backward_steps})")

    def levels(self, num_steps: int) -> tuple[int, int, int]:
        """``(i0, df, db)`` on a grid of ``num_steps``: the set ones, the others from :func:`default_levels`."""
        T = int(num_steps)
        if T < 2:
            raise ConfigError(f"SoP needs at least 2 steps (a first level and x0), got T = {T}")
        d = default_levels(T)
        i0, df, db = (d[k] if v is None else int(v) for k, v in
                      enumerate((self.first_level, self.forward_steps, self.backward_steps)))
        if not 1 <= i0 <= T - 1:
            raise ConfigError(f"first_level must be a grid point in 1 .. T - 1 = {T - 1}, got {i0}")
        if not 0 <= df <= i0:
            raise ConfigError(f"forward_steps must be in 0 .. first_level = {i0}, got {df}")
        if db <= df:
            raise ConfigError(f"backward_steps ({db}) must exceed forward_steps ({df})")
        return i0, df, db

    def rounds(self, num_steps: int) -> list[tuple[int, int, int]]:
        """The rounds ``(j, a, b)``: paths at grid point ``j`` noised forward to ``a = j - df``, solved to ``b``."""
        i0, df, db = self.levels(num_steps)
        out, j = [], i0
        while j < num_steps:
            a = j - df
            b = min(num_steps, a + db)
            out.append((j, a, b))
            j = b
        return out

    def planned_nfe(self, num_steps: int) -> int:
        """NFE per output of this configuration (what the counters report)."""
        N, K = self.num_paths, self.num_particles
        rounds = self.rounds(num_steps)
        value_calls = bool(self.value_fn is not None and self.value_fn.calls_model)
        return N * self.levels(num_steps)[0] + sum(N * K * (b - a + (value_calls and b < num_steps))
                                                   for _, a, b in rounds)

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        """N = 2 paths, the default levels of ``T``, and the most re-noisings K that the budget pays for (N = K = 1
        when it pays for fewer)."""
        i0, df, db = default_levels(num_steps)
        probe = cls(num_particles=1, num_paths=1, first_level=i0, forward_steps=df, backward_steps=db)
        per_candidate = probe.planned_nfe(num_steps) - i0  # NFE of one candidate through every round
        N = 2
        K = (int(budget) - N * i0) // (N * per_candidate)
        if K < 1:
            N, K = 1, 1
        return {"num_paths": N, "num_particles": K, "first_level": i0, "forward_steps": df, "backward_steps": db}

    @torch.no_grad()
    def _sample(self, model, reward, conditions, c, noise):
        N, K, T, B = self.num_paths, self.num_particles, model.num_steps, len(conditions)
        rounds = self.rounds(T)
        i0 = self.levels(T)[0]
        conds_n, c_n = self.repeat(conditions, c, N)
        conds_nk, c_nk = self.repeat(conditions, c, N * K)
        x = model.prior(noise.for_kernel(model, N))
        x, _ = kernel_path(self, model, x, 0, i0, c_n, noise, N)
        for j, a, b in rounds:
            cand = x.repeat_interleave(K, 0)
            if a < j:
                cand = model.renoise(cand, j, a, noise.for_kernel(model, N * K))
            cand, x0_hat = kernel_path(self, model, cand, a, b, c_nk, noise, N * K)
            images = None
            if b == T:  # the candidates are x0: valued by the reward itself
                v, images = self.final_value(model, reward, cand, conds_nk)
            elif self.value_fn is None:  # the Tweedie estimate of the last kernel step (no model call)
                v = self.score(model, reward, x0_hat, conds_nk)
            else:
                v = self.value(model, reward, self.value_fn, cand, b, c_nk, conds_nk, 1.0)[0]
            v = v.view(B, N * K).double()
            v = torch.where(torch.isfinite(v), v, -math.inf)
            if torch.isinf(v).all(1).any():
                raise NonFiniteRewardError(f"every candidate of a sample has a non-finite value at grid point {b}")
            keep = 1 if b == T else N
            top = v.topk(keep, dim=1).indices                        # [B, keep], best first
            rows = (top + N * K * torch.arange(B, device=v.device)[:, None]).reshape(-1)
            x = cand[rows]
        # x: the best x0 per output (the last round ends at T)
        best = v.gather(1, top[:, :1])[:, 0]
        return x, best.float(), {}, None if images is None else images[rows]
