"""Best-of-N (ALGORITHMS.md section 2).

``N`` independent trajectories of the base sampler per output; return the one whose
final ``x0`` has the highest reward. NFE = ``N * T``.
"""

from __future__ import annotations

import torch

from tsf.samplers.base import BaseSampler


class BestOfN(BaseSampler):
    """Best-of-N with ``N = num_particles`` candidates per output sample."""

    name = "best_of_n"
    uses_reward = True

    def __init__(self, num_particles: int = 8, max_batch: int = 4096) -> None:
        super(BaseSampler, self).__init__(num_particles=num_particles, max_batch=max_batch)

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        return {"num_particles": max(1, budget // num_steps)}  # NFE = N T

    @torch.no_grad()
    def _sample(self, model, reward, conditions, c, noise):
        K = self.num_particles
        rows, c_rows = self.repeat(conditions, c, K)
        x0 = self.trajectories(model, c_rows, noise, K)       # [B*K, ...]
        r, images = self.final_value(model, reward, x0, rows)
        r = r.view(-1, K)                                     # [B, K]
        best = r.argmax(1)
        pick = best + K * torch.arange(len(best), device=best.device)
        return x0[pick], r.gather(1, best[:, None]).squeeze(1), {}, None if images is None else images[pick]
