"""Rollover Budget Forcing (Kim et al. 2025, arXiv 2503.19385; ALGORITHMS.md section 5).

``N`` chains per output and a budget of ``B`` NFE per output. Each chain starts from the
best of ``n0`` prior noises, scored by the one-step Tweedie (posterior-mean) value. At
every step a chain may spend ``Q = floor((B - N n0) / ((T - 1) N))`` proposals plus what it
left unused before (rollover): it draws children from the SDE kernel, in batches of
``proposal_batch``, and accepts the first one (in draw order) whose value beats ``r*``,
the value of the chain's current state. If its quota runs out first, it takes the best
child (the SVDD rule) and its quota resets to ``Q``. NFE are counted as evaluated; a chain
never evaluates more children than its quota, so the budget holds exactly. The last step's
children are candidate x0, judged by the reward (no NFE), and the output is the chain with
the highest final reward. The trajectory finishes at ``t = 0``.
"""

from __future__ import annotations

import math

import torch

from tsf.errors import ConfigError
from tsf.samplers.base import Sampler
from tsf.samplers.value import PosteriorMeanValue


class RBF(Sampler):
    """Rollover Budget Forcing.

    Args:
        num_particles: N, chains per output.
        budget: B, NFE per output (initial candidates plus evaluated children).
        n0: prior candidates per chain.
        proposal_batch: children evaluated together (throughput; NFE still counted as evaluated).
    """

    name = "rbf"
    needs_stochastic_kernel = True

    def __init__(self, num_particles: int = 2, budget: int = 500, n0: int = 4, proposal_batch: int = 4,
                 max_batch: int = 4096) -> None:
        super().__init__(num_particles=num_particles, max_batch=max_batch)
        if n0 < 1 or proposal_batch < 1:
            raise ConfigError(f"n0 and proposal_batch must be >= 1, got {n0}, {proposal_batch}")
        self.budget, self.n0, self.proposal_batch = int(budget), int(n0), int(proposal_batch)
        self.value_fn = PosteriorMeanValue()

    def __repr__(self) -> str:
        return f"RBF(N={self.num_particles}, budget={self.budget}, n0={self.n0})"

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        return {"budget": int(budget)}

    def quota(self, num_steps: int) -> int:
        N = self.num_particles
        q = (self.budget - N * self.n0) // (max(1, num_steps - 1) * N)
        if q < 1:
            raise ConfigError(
                f"RBF budget {self.budget} is too small for N = {N} chains, n0 = {self.n0} and T = {num_steps}: "
                f"it needs at least N (n0 + T - 1) = {N * (self.n0 + num_steps - 1)} NFE"
            )
        return q

    @torch.no_grad()
    def _sample(self, model, reward, conditions, c, noise):
        N, T, B = self.num_particles, model.num_steps, len(conditions)
        Q = self.quota(T)
        conds_n, c_n = self.repeat(conditions, c, N)  # chain-major inside each sample: [B * N]

        # start: per chain, the best of n0 prior noises by the one-step Tweedie value
        cand = model.prior(noise.randn(N * self.n0, model.sample_shape))
        conds_c, c_c = self.repeat(conditions, c, N * self.n0)
        v, out, _ = self.value(model, reward, self.value_fn, cand, 0, c_c, conds_c, 1.0)
        best = v.view(B * N, self.n0).argmax(1)
        rows = best + self.n0 * torch.arange(B * N, device=v.device)
        x, out, r_star = cand[rows], out[rows], v.view(-1)[rows].double()
        left = torch.zeros(B * N, dtype=torch.long)  # unused quota carried to the next step
        accepted_steps = 0

        for i in range(T):
            tr = self.transition(model, x, i, c_n, out)
            rem = left + Q
            done = torch.zeros(B * N, dtype=torch.bool)
            best_v = torch.full((B * N,), -math.inf, dtype=torch.float64, device=v.device)
            best_x, best_out = x.clone(), None if out is None else out.clone()
            new_x, new_out, new_r = x.clone(), None if out is None else out.clone(), r_star.clone()
            while True:
                active = (~done) & (rem > 0)
                if not active.any():
                    break
                take = torch.where(active, rem.clamp(max=self.proposal_batch), 0)  # children per chain this round
                per_sample = take.view(B, N).sum(1).tolist()
                z = noise.randn_counts(per_sample, model.sample_shape)
                chain = torch.repeat_interleave(torch.arange(B * N), take)  # chain of each child, in draw order
                chain_d = chain.to(x.device)
                children = tr.mean[chain_d] + tr.std[chain_d] * z
                v, out_c, _ = self.value(model, reward, self.value_fn, children, i + 1, c_n[chain_d],
                                         [conds_n[j] for j in chain.tolist()], 1.0)
                v = torch.where(torch.isfinite(v), v.double(), -math.inf)
                rem -= take
                # per chain, in draw order: the first child that beats r* (accepted) and the first best child
                idx, none = torch.arange(len(v), device=v.device), len(v)
                unset = torch.full((B * N,), none, device=v.device)
                beats = v > r_star[chain_d]
                first = unset.scatter_reduce(0, chain_d[beats], idx[beats], "amin")
                hit = first < none
                a = first[hit]
                new_x[hit], new_r[hit] = children[a], v[a]
                if out_c is not None:
                    new_out[hit] = out_c[a]
                done |= hit.cpu()
                top_v = torch.full_like(best_v, -math.inf).scatter_reduce(0, chain_d, v, "amax")
                top = v == top_v[chain_d]
                b = unset.scatter_reduce(0, chain_d[top], idx[top], "amin")
                up = (b < none) & (top_v > best_v)
                b = b[up]
                best_v[up], best_x[up] = v[b], children[b]
                if out_c is not None:
                    best_out[up] = out_c[b]
            accepted_steps += int(done.sum())
            # chains that found no better child take the best one (the SVDD rule); their quota resets
            fallback = ~done
            new_x[fallback], new_r[fallback] = best_x[fallback], best_v[fallback]
            if new_out is not None:
                new_out[fallback] = best_out[fallback]
            left = torch.where(done, rem, torch.zeros_like(rem))
            x, out, r_star = new_x, (new_out if i + 1 < T else None), new_r

        r = r_star.view(B, N)
        pick = r.argmax(1)
        rows = pick + N * torch.arange(B, device=r.device)
        return x[rows], r.gather(1, pick[:, None])[:, 0].float(), {"accepted_steps": accepted_steps / (B * N)}
