"""Noise-space search (Ma et al. 2025, arXiv 2501.09732; docs/algorithms.md, section 10): search over the initial noise of a deterministic sampler.

With the ODE (a flow model's ``diffusion: none``, DDIM with ``eta = 0``) a sample is a function of its initial
noise, so a search over noises needs no stochastic kernel.

* Random search is Best-of-N (:class:`~tsf.samplers.BestOfN`) with a ``verifier``, the reward that ranks the
  candidates, which may differ from the target reward the run is judged by.
* Zero-order search (:class:`ZeroOrderSearch`): start from the best of ``n`` noises; then for ``R`` rounds
  propose ``M`` neighbours of the current noise ``x``, ``x' = |x| (lambda u + sqrt(1 - lambda^2) w)``, with
  ``u = x / |x|`` and ``w`` a random unit vector orthogonal to ``u`` (``x'`` has the norm of ``x`` and the angle
  ``arccos lambda`` to it; ``lambda = 0.95``), run each through the sampler, and move to the best neighbour if
  its verifier score beats the current one. The output never scores worse than the starting noise.
  NFE = ``T (n + R M)``, verifier calls ``n + R M`` per output. ``variant: reference`` is tt-scale-flux's
  loop instead: one starting noise; each round runs the pivot again with its ``M`` neighbours; after a round
  in which no neighbour beats the pivot, a fresh noise is the next pivot; the output is the best run of all
  rounds. NFE = ``T R (M + 1)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from tsf.errors import ConfigError
from tsf.rewards.base import Reward
from tsf.samplers.base import Sampler, integer_at_least
from tsf.samplers.sop import kernel_path


def build_verifier(spec: Any) -> Optional[Reward]:
    """``None`` (rank by the target reward) or a reward: a registered name or a :class:`Reward`."""
    if spec is None:
        return None
    import tsf.rewards  # noqa: F401  (registers the rewards)
    from tsf.rewards.base import build_reward

    return build_reward(spec)


def verifier_guide(verifier: Optional[Reward], model, reward: Optional[Reward]) -> Optional[Reward]:
    """What a search ranks by: its verifier (on the model's device: a sampler is no module) or the target reward."""
    if verifier is None:
        return reward
    return verifier.to(model.device)


def neighbours(x: Tensor, w: Tensor, lam: float) -> Tensor:
    """``|x| (lam u + sqrt(1 - lam^2) w_perp)`` per row, ``u = x / |x|``, ``w_perp`` the unit part of ``w``
    orthogonal to ``u`` (norms over all but the first dim): a point at the norm of ``x``, at angle
    ``arccos lam`` from it, in a direction drawn by ``w`` (standard normal: uniform on that circle's sphere)."""
    flat, dirs = x.flatten(1).double(), w.flatten(1).double()
    norm = flat.norm(dim=1, keepdim=True)
    u = flat / norm
    perp = dirs - (dirs * u).sum(1, keepdim=True) * u
    perp = perp / perp.norm(dim=1, keepdim=True)
    out = norm * (lam * u + math.sqrt(1.0 - lam * lam) * perp)
    return out.to(x.dtype).reshape(x.shape)


class ZeroOrderSearch(Sampler):
    """Zero-order search over initial noises.

    Args:
        num_particles: M, neighbours proposed per round.
        num_initial: n, the random noises the search starts from (the best of them is the first pivot).
        num_rounds: R, rounds of proposals.
        lam: cosine of the angle between a neighbour and the pivot (``0 < lam < 1``; 0.95).
        verifier: the reward that ranks the candidates (default: the target reward).
        variant: ``tsf`` (start from the best of ``n``, a pivot scored once, a failed round keeps the pivot) or
            ``reference`` (tt-scale-flux's: start from one noise, re-score the pivot with its neighbours each round,
            a fresh noise after a failed round; ``num_initial`` is then 1, and ``num_rounds`` at least 1).
    """

    name = "zo_search"
    needs_gaussian_kernel = True  # its neighbours are rotations of Gaussian noise

    def __init__(self, num_particles: int = 4, num_initial: Optional[int] = None, num_rounds: int = 4,
                 lam: float = 0.95, verifier: Optional[Union[str, Reward]] = None,
                 variant: Literal["tsf", "reference"] = "tsf", max_batch: int = 4096) -> None:
        super().__init__(num_particles=num_particles, max_batch=max_batch)
        if variant not in ("tsf", "reference"):
            raise ConfigError(f"unknown variant {variant!r}; known: tsf, reference")
        self.variant = variant
        if variant == "reference" and num_initial not in (None, 1):
            raise ConfigError(f"variant: reference starts from one noise, got num_initial {num_initial}: drop it or "
                              "use variant: tsf (the best of num_initial)")
        self.num_initial = integer_at_least("num_initial", 1 if variant == "reference" else 4 if num_initial is None else num_initial, 1)
        self.num_rounds = integer_at_least("num_rounds", num_rounds, 1 if variant == "reference" else 0)
        if not 0 < lam < 1:
            raise ConfigError(f"lam must be in (0, 1), got {lam}")
        self.lam = float(lam)
        self.verifier = build_verifier(verifier)

    def __repr__(self) -> str:
        return (f"ZeroOrderSearch(n={self.num_initial}, M={self.num_particles}, R={self.num_rounds}, lam={self.lam}"
                f"{', variant=reference' if self.variant == 'reference' else ''})")

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        """``n + R M = floor(budget / T)`` trajectories: M = 4 neighbours, n = 4 starting noises plus what the
        rounds leave over (fewer when the budget pays for fewer than 8). (The default variant's sizes.)"""
        total = max(1, int(budget) // max(1, int(num_steps)))
        M = 4 if total >= 8 else max(1, total // 2)
        R = (total - min(4, total)) // M if total >= 8 else (total - 1) // M
        return {"num_particles": M, "num_initial": total - R * M, "num_rounds": R}

    def guide(self, model, reward):
        return verifier_guide(self.verifier, model, reward)

    def _run(self, model, reward, z: Tensor, c: Tensor, conditions: list, noise, k: int):
        """Samples of the noises ``z`` (``k`` per output) and their scores ``[B, k]`` (non-finite: -inf), images."""
        x0, _ = kernel_path(self, model, model.prior(z), 0, model.num_steps, c, noise, k)
        r, images = self.final_value(model, reward, x0, conditions)
        r = r.double()
        return x0, torch.where(torch.isfinite(r), r, -math.inf).view(-1, k), images

    @torch.no_grad()
    def _sample(self, model, reward, conditions, c, noise):
        if self.variant == "reference":
            return self._sample_reference(model, reward, conditions, c, noise)
        n, M, B = self.num_initial, self.num_particles, len(conditions)
        conds_n, c_n = self.repeat(conditions, c, n)
        z = noise.randn(n, model.sample_shape)
        x0, r, images = self._run(model, reward, z, c_n, conds_n, noise, n)
        arange = torch.arange(B, device=r.device)
        rows = r.argmax(1) + n * arange
        pz, pr, px = z[rows], r.view(-1)[rows], x0[rows]
        pim = None if images is None else images[rows]
        start = pr.clone()
        moves = torch.zeros(B, device=r.device)
        conds_m, c_m = self.repeat(conditions, c, M)
        for _ in range(self.num_rounds):
            zc = neighbours(pz.repeat_interleave(M, 0), noise.randn(M, model.sample_shape), self.lam)
            x0, r, images = self._run(model, reward, zc, c_m, conds_m, noise, M)
            rows = r.argmax(1) + M * arange
            top = r.view(-1)[rows]
            better = top > pr  # strictly: a tie keeps the pivot
            pz[better], px[better], pr = zc[rows[better]], x0[rows[better]], torch.where(better, top, pr)
            if pim is not None:
                pim[better] = images[rows[better]]
            moves += better.float()
        diagnostics = {"start_score": start.float(), "moves": moves}
        if self.verifier is not None:  # the scores are the verifier's, not the target reward's
            diagnostics["verifier"] = pr.float()
            return px, None, diagnostics, pim
        return px, pr.float(), diagnostics, pim

    def _sample_reference(self, model, reward, conditions, c, noise):
        """tt-scale-flux's loop: each round runs the pivot and its M neighbours (M + 1 trajectories, the pivot first);
        a neighbour strictly better than the pivot is the next pivot, else a fresh noise is; the best run wins."""
        M, B, shape = self.num_particles, len(conditions), model.sample_shape
        conds_m, c_m = self.repeat(conditions, c, M + 1)
        arange = torch.arange(B)
        pz = noise.randn(1, shape)
        best_r = best_x = best_im = start = None
        moves = torch.zeros(B)
        restarts = torch.zeros(B)
        for _ in range(self.num_rounds):
            zc = neighbours(pz.repeat_interleave(M, 0), noise.randn(M, shape), self.lam)
            z = torch.cat([pz.unsqueeze(1), zc.view(B, M, *shape)], 1).reshape(B * (M + 1), *shape)
            x0, r, images = self._run(model, reward, z, c_m, conds_m, noise, M + 1)
            if start is None:
                start = r[:, 0].clone()
            pick = r.argmax(1)  # the first maximum: a tie keeps the pivot (index 0)
            rows = (pick + (M + 1) * arange.to(r.device)).to(z.device)
            top = r.gather(1, pick[:, None])[:, 0]
            if best_r is None:
                best_r, best_x = top.clone(), x0[rows].clone()
                best_im = None if images is None else images[rows].clone()
            else:
                up = top > best_r
                best_r = torch.where(up, top, best_r)
                best_x[up.to(best_x.device)] = x0[rows][up.to(x0.device)]
                if best_im is not None:
                    best_im[up.to(best_im.device)] = images[rows][up.to(images.device)]
            improved = (pick > 0).cpu()  # a neighbour beat the pivot
            fresh = noise.randn(1, shape)  # drawn every round, used where the round failed
            pz = torch.where(improved.to(z.device).view(B, *([1] * len(shape))), z[rows], fresh)
            moves += improved.float()
            restarts += (~improved).float()
        diagnostics = {"start_score": start.float(), "moves": moves, "restarts": restarts}
        if self.verifier is not None:
            diagnostics["verifier"] = best_r.float()
            return best_x, None, diagnostics, best_im
        return best_x, best_r.float(), diagnostics, best_im
