"""CoDe: blockwise controlled decoding (the RBF paper's baseline, ``N = 2``, ``K = 25``, ``L = 2``; docs/algorithms.md, section 10).

SVDD with look-ahead blocks: ``N`` chains per output. At each block, from its state at grid point ``i``, a chain draws
``K`` children from the base kernel and rolls each forward ``L`` kernel steps (fresh noise at every step) to
``b = min(T, i + L)``; the children are valued there, at their own grid point (the reward of their Tweedie
estimate, one model call that is the next block's first model output), and one child is kept, drawn from
``softmax(v / alpha)`` (``alpha = 0``: the argmax); its block becomes the chain's trajectory. At ``b = T`` the
children are ``x0``, valued by the reward itself, and the output is the chain whose ``x0`` has the highest reward.

NFE, counted as run: ``N (1 + K (T - 1))`` with the posterior-mean value, whatever ``L`` (each block's first step
reuses the kept child's output; its other ``L - 1`` steps and its value cost ``K`` each, the last block's value
none). ``L = 1`` and ``N = 1`` is SVDD; ``K = 1`` is the base sampler.
"""

from __future__ import annotations

import math
from typing import Union

import torch

from tsf.errors import ConfigError
from tsf.samplers.base import Sampler, integer_at_least
from tsf.samplers.smc import NonFiniteRewardError, draw_categorical
from tsf.samplers.value import ValueFunction, build_value


class CoDe(Sampler):
    """Blockwise controlled decoding.

    Args:
        num_particles: K, children per chain and block.
        num_paths: N, chains per output (the best final chain is the output).
        block_size: L, kernel steps a child is rolled forward before it is valued.
        alpha: temperature of the selection; 0 takes the argmax (the reference).
        value: ``posterior_mean``, ``exact`` or a learned value.
    """

    name = "code"
    needs_stochastic_kernel = True

    def __init__(self, num_particles: int = 8, num_paths: int = 2, block_size: int = 2, alpha: float = 0.0,
                 value: Union[str, ValueFunction] = "posterior_mean", max_batch: int = 4096) -> None:
        super().__init__(num_particles=num_particles, max_batch=max_batch)
        self.num_paths = integer_at_least("num_paths", num_paths, 1)
        self.block_size = integer_at_least("block_size", block_size, 1)
        if alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.value_fn = build_value(value)

    def __repr__(self) -> str:
        return f"CoDe(N={self.num_paths}, K={self.num_particles}, L={self.block_size}, alpha={self.alpha})"

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        """N = 2 chains and the most children K that ``N (1 + K (T - 1))`` NFE allow (N = 1 below that)."""
        per = max(1, int(num_steps) - 1)
        N = 2
        K = (int(budget) // N - 1) // per
        if K < 1:
            N, K = 1, max(1, (int(budget) - 1) // per)
        return {"num_paths": N, "num_particles": K}

    @torch.no_grad()
    def _sample(self, model, reward, conditions, c, noise):
        N, K, L, T, B = self.num_paths, self.num_particles, self.block_size, model.num_steps, len(conditions)
        R = N * K
        conds_n, c_n = self.repeat(conditions, c, N)
        conds_r, c_r = self.repeat(conditions, c, R)
        x = model.prior(noise.for_kernel(model, N))
        out, images, i = None, None, 0
        while i < T:
            b = min(T, i + L)
            tr = self.transition(model, x, i, c_n, out)
            children = tr.children(K, noise.for_kernel(model, R))
            for m in range(i + 1, b):  # the rest of the block: each child on its own
                children = self.transition(model, children, m, c_r).sample(noise.for_kernel(model, R))
            if b < T:
                v, out_c, _ = self.value(model, reward, self.value_fn, children, b, c_r, conds_r, self.alpha)
            else:  # the children are candidate x0: valued by the reward itself
                v, images = self.final_value(model, reward, children, conds_r, lambda: self.value(
                    model, reward, self.value_fn, children, T, c_r, conds_r, self.alpha)[0])
                out_c = None
            v = v.view(B * N, K).double()
            v = torch.where(torch.isfinite(v), v, -math.inf)
            if torch.isinf(v).all(1).any():
                raise NonFiniteRewardError(f"every child of a chain has a non-finite value at grid point {b} of {T}")
            u = noise.rand(N, dtype=torch.float64).reshape(-1)
            pick = v.argmax(1) if self.alpha == 0 else draw_categorical(v / self.alpha, u)
            rows = pick + K * torch.arange(B * N, device=v.device)
            x = children[rows]
            out = None if out_c is None else out_c[rows]
            if images is not None:
                images = images[rows]
            i = b
        r = v.gather(1, pick[:, None])[:, 0].view(B, N)  # each chain's kept x0 and its reward
        best = r.argmax(1)
        rows = best + N * torch.arange(B, device=r.device)
        return x[rows], r.gather(1, best[:, None])[:, 0].float(), {}, None if images is None else images[rows]
