"""Rollover Budget Forcing (Kim et al. 2025, arXiv 2503.19385; docs/algorithms.md, section 5).

``N`` chains per output and a budget of ``B`` NFE per output, all of it spent. Each chain starts
from the best of ``n0`` prior noises, scored by the one-step Tweedie (posterior-mean) value, and
gets an equal share ``S = (B - N n0) / N`` of the rest (the remainder to the first chains). At each
of the first ``T - 2`` steps a chain may spend its quota ``Q = floor((B - N n0) / (T N))`` plus what
it left unused before (rollover): it draws children from the SDE kernel, in batches of
``proposal_batch`` (1 NFE each: the child's velocity scores its Tweedie estimate and is reused as
the next drift), and accepts the first one in draw order whose value beats ``r*``, the chain's best
value so far over its whole trajectory (a running maximum). If its quota runs out first, it takes
the step's best child (the SVDD rule), keeps ``r*`` and its quota resets to ``Q``. The last costly
step (to grid point ``T - 1``) accepts nothing early: it spends everything the chain has left and
keeps its best child. NFE are counted as evaluated, and the total is exactly ``B``.

The finish: ``full`` (tsf's) takes the model's last step to ``t = 0`` from that child and outputs
the chain with the highest reward ``r(x0)``; ``tweedie`` (the reference's) stops at grid point
``T - 1`` and outputs the Tweedie estimate ``x0_hat`` of the chain with the highest value. With a
flow model's ``last_step: tweedie`` the two coincide.
"""

from __future__ import annotations

import math

import torch

from tsf.errors import ConfigError
from tsf.samplers.base import Sampler
from tsf.samplers.smc import NonFiniteRewardError
from tsf.samplers.value import PosteriorMeanValue

FINISHES = ("full", "tweedie")


class RBF(Sampler):
    """Rollover Budget Forcing.

    Args:
        num_particles: N, chains per output.
        budget: B, NFE per output (initial candidates plus evaluated children), spent in full.
        n0: prior candidates per chain (the reference: 25).
        proposal_batch: children evaluated together at the steps that may accept early (1, the default, is the
            reference's one at a time; more is throughput at the price of the children drawn after an accepted
            one, which are evaluated and counted but wasted; the first child in draw order that beats ``r*`` wins).
        finish: ``full`` (the model's last step to ``t = 0``, the output judged by its reward) or
            ``tweedie`` (the reference: the Tweedie estimate at grid point ``T - 1``).
    """

    name = "rbf"
    needs_stochastic_kernel = True

    def __init__(self, num_particles: int = 2, budget: int = 500, n0: int = 4, proposal_batch: int = 1,
                 finish: str = "full", max_batch: int = 4096) -> None:
        super().__init__(num_particles=num_particles, max_batch=max_batch)
        if n0 < 1 or proposal_batch < 1:
            raise ConfigError(f"n0 and proposal_batch must be >= 1, got {n0}, {proposal_batch}")
        if finish not in FINISHES:
            raise ConfigError(f"unknown finish {finish!r}; known: {', '.join(FINISHES)}")
        self.budget, self.n0, self.proposal_batch = int(budget), int(n0), int(proposal_batch)
        self.finish = finish
        self.value_fn = PosteriorMeanValue()

    def __repr__(self) -> str:
        return f"RBF(N={self.num_particles}, budget={self.budget}, n0={self.n0}, finish={self.finish})"

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        return {"budget": int(budget)}

    def quota(self, num_steps: int) -> int:
        """``Q = floor((B - N n0) / (T N))``, the per-step quota (at least 1)."""
        N = self.num_particles
        if num_steps < 2:
            raise ConfigError(f"RBF needs at least 2 steps (a step that costs NFE and the last), got T = {num_steps}")
        q = (self.budget - N * self.n0) // (num_steps * N)
        if q < 1:
            raise ConfigError(
                f"RBF budget {self.budget} is too small for N = {N} chains, n0 = {self.n0} and T = {num_steps}: "
                f"it needs at least N (n0 + T) = {N * (self.n0 + num_steps)} NFE"
            )
        return q

    def shares(self, batch: int) -> torch.Tensor:
        """NFE each chain may spend on children: ``B - N n0`` split evenly, the remainder to the first chains."""
        N = self.num_particles
        rest = self.budget - N * self.n0
        share = torch.full((N,), rest // N, dtype=torch.long) + (torch.arange(N) < rest % N).long()
        return share.repeat(batch)

    @torch.no_grad()
    def _sample(self, model, reward, conditions, c, noise):
        N, T, B = self.num_particles, model.num_steps, len(conditions)
        Q = self.quota(T)
        conds_n, c_n = self.repeat(conditions, c, N)  # chain-major inside each sample: [B * N]

        # start: per chain, the best of n0 prior noises by the one-step Tweedie value
        cand = model.prior(noise.for_kernel(model, N * self.n0))
        conds_c, c_c = self.repeat(conditions, c, N * self.n0)
        v, out, _ = self.value(model, reward, self.value_fn, cand, 0, c_c, conds_c, 1.0)
        best = v.view(B * N, self.n0).argmax(1)
        rows = best + self.n0 * torch.arange(B * N, device=v.device)
        x, out, r_star = cand[rows], out[rows], v.view(-1)[rows].double()
        r_star = torch.where(torch.isfinite(r_star), r_star, -math.inf)
        left = self.shares(B)                               # NFE each chain has left
        carry = torch.zeros(B * N, dtype=torch.long)        # unused quota rolled over to the next step
        accepted_steps = 0

        for i in range(T - 1):  # steps that cost NFE: their children are valued at grid point i + 1 < T
            last = i == T - 2   # spends everything left, accepts nothing early, keeps the best child
            tr = self.transition(model, x, i, c_n, out)
            rem = left.clone() if last else torch.minimum(carry + Q, left)
            if last:
                last_nfe = int(rem.sum()) / B
            done = torch.zeros(B * N, dtype=torch.bool)
            # the step's children in draw order (all rounds), and per chain the one it moves to: the accepted
            # child, else the first best one (indices into the step's children: no copies of the states per round)
            kids, kid_outs, drawn = [], [], 0
            choice = torch.zeros(B * N, dtype=torch.long, device=x.device)
            best_v = torch.full((B * N,), -math.inf, dtype=torch.float64, device=x.device)
            while True:
                active = (~done) & (rem > 0)
                if not active.any():
                    break
                # children per chain this round (the last step draws all it has left at once: no early accept)
                take = torch.where(active, rem if last else rem.clamp(max=self.proposal_batch), 0)
                z = noise.for_kernel_counts(model, take.view(B, N).sum(1).tolist())
                chain = torch.repeat_interleave(torch.arange(B * N), take)  # chain of each child, in draw order
                chain_d = chain.to(x.device)
                children = tr.sample_rows(chain_d, z)
                v, out_c, _ = self.value(model, reward, self.value_fn, children, i + 1, c_n[chain_d],
                                         [conds_n[j] for j in chain.tolist()], 1.0)
                v = torch.where(torch.isfinite(v), v.double(), -math.inf)
                rem -= take
                left -= take
                idx, none = torch.arange(len(v), device=v.device), len(v)
                unset = torch.full((B * N,), none, device=v.device)
                if not last:  # per chain, in draw order: the first child that beats r* is accepted
                    beats = v > r_star[chain_d]
                    first = unset.scatter_reduce(0, chain_d[beats], idx[beats], "amin")
                    hit = first < none
                    choice[hit] = drawn + first[hit]
                    r_star[hit] = v[first[hit]]
                    done |= hit.cpu()
                # per chain, the first best child so far (an earlier round's wins a tie)
                top_v = torch.full_like(best_v, -math.inf).scatter_reduce(0, chain_d, v, "amax")
                top = v == top_v[chain_d]
                first_top = unset.scatter_reduce(0, chain_d[top], idx[top], "amin")
                up = (first_top < none) & (top_v > best_v) & ~done.to(x.device)
                choice[up], best_v[up] = drawn + first_top[up], top_v[up]
                kids.append(children)
                kid_outs.append(out_c)
                drawn += none
            accepted_steps += int(done.sum())
            if bool((~done & torch.isinf(best_v).cpu()).any()):  # a chain drew children and none was finite
                raise NonFiniteRewardError(f"every child of a chain has a non-finite value at grid point {i + 1} of {T} "
                                           f"(reward {reward.name!r}); check the reward on these samples")
            # chains that accepted nothing take the best child (the SVDD rule): r* stays, the quota resets
            x = (kids[0] if len(kids) == 1 else torch.cat(kids))[choice]
            out = (kid_outs[0] if len(kid_outs) == 1 else torch.cat(kid_outs))[choice]
            carry = torch.where(done, rem, torch.zeros_like(rem))

        # x: the kept child at grid point T - 1 (best_v its value), out: its model output
        if self.finish == "tweedie":
            x0, r, images = model.x0_hat(x, T - 1, out), best_v, None
        else:
            tr = self.transition(model, x, T - 1, c_n, out)
            x0 = tr.mean if tr.deterministic else tr.sample(noise.for_kernel(model, N))
            r, images = self.final_value(model, reward, x0, conds_n)
            r = torch.where(torch.isfinite(r), r.double(), -math.inf)
        r = r.view(B, N)
        if bool(torch.isinf(r).all(1).any()):
            raise NonFiniteRewardError(f"every chain of a sample ends with a non-finite {'value' if self.finish == 'tweedie' else 'reward'} "
                                       f"(reward {reward.name!r}); check the reward on these samples")
        pick = r.argmax(1)
        rows = pick + N * torch.arange(B, device=r.device)
        diagnostics = {"accepted_steps": accepted_steps / (B * N),  # per chain, of the T - 2 that may accept
                       "last_step_nfe": last_nfe,  # per output, spent by the last costly step
                       "unspent_nfe": int(left.sum()) / B}
        return x0[rows], r.gather(1, pick[:, None])[:, 0].float(), diagnostics, None if images is None else images[rows]
