"""Best-of-N (docs/algorithms.md, section 2; random search over noises: section 10).

``N`` independent trajectories of the base sampler per output; return the one whose
final ``x0`` has the highest reward. NFE = ``N * T``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from tsf.rewards.base import Reward
from tsf.samplers.base import BaseSampler
from tsf.samplers.noise_search import build_verifier, verifier_guide


class BestOfN(BaseSampler):
    """Best-of-N with ``N = num_particles`` candidates per output sample.

    Args:
        num_particles: N, candidates per output.
        verifier: the reward that ranks the candidates (random search over noises, Ma et al. 2025), when it is
            not the target reward; its calls are the counted reward calls, and its scores are the diagnostics'
            ``verifier`` (the batch's ``rewards`` stay empty: they would not be the target's).
    """

    name = "best_of_n"
    uses_reward = True

    def __init__(self, num_particles: int = 8, verifier: Optional[Union[str, Reward]] = None,
                 max_batch: int = 4096) -> None:
        super(BaseSampler, self).__init__(num_particles=num_particles, max_batch=max_batch)
        self.verifier = build_verifier(verifier)

    def guide(self, model, reward):
        return verifier_guide(self.verifier, model, reward)

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
        best = torch.where(torch.isfinite(r), r, -torch.inf).argmax(1)  # a NaN is no best (argmax ranks NaN first)
        pick = best + K * torch.arange(len(best), device=best.device)
        score, images = r.gather(1, best[:, None]).squeeze(1), None if images is None else images[pick]
        if self.verifier is not None:
            return x0[pick], None, {"verifier": score}, images
        return x0[pick], score, {}, images
