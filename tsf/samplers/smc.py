"""The sequential Monte Carlo family: SMC/TDS, FK steering and DAS (docs/algorithms.md, section 4).

Twisted SMC with ``K`` particles per output (Wu et al. 2023; Singhal et al. 2025; Kim et
al., ICLR 2025, "DAS"). Twist at grid point ``i``: ``psi_i(x) = lambda_i v(x) / alpha``.
Each step from ``x_t`` to ``x_prev``:

1. propose from the base kernel ``N(mu, s^2 I)`` or, with a gradient,
   ``N(mu + s^2 grad_x psi_{i+1}(x_t), s^2 I)``, the gradient taken through the network or, with
   ``gradient_through: tweedie``, through the Tweedie estimate alone (the network output held constant);
2. ``logw += log p(x_prev | x_t) - log q(x_prev | x_t)`` and, at a potential step, ``+ G``, with
   the potential ``G = psi_{i+1}(x_prev) - psi(previous potential step)`` (``diff``; FK steering's
   ``max``, ``sum``, ``rt`` are the other choices); the final step's potential is the true reward
   with ``lambda = 1`` divided by the potentials already applied along the particle's path, so
   every path's product is ``exp(r(x0) / alpha)``;
3. resample inside each group when ``ESS < ess_threshold K`` (or at fixed steps), moving
   every per-particle quantity with the particles: state, cached model output, value,
   gradient and accumulated potential.

With ESS-adaptive resampling every step is a potential step (only ``diff`` is allowed there). With a
fixed schedule (``resample_steps``, FK steering) the potentials act only at the resampling steps and
at the end: between them the weights change only by a gradient proposal's ``p / q`` ratio, and the
value (a reward call) is computed only where it is used (potential steps, the final step, and every
step of a gradient proposal, which needs its gradient); elsewhere the next transition computes the
model output itself, so the NFE stay ``K T``. A gradient proposal takes the gradient at grid point
``i`` only if step ``i``'s kernel has noise (``model.step_std(i)`` > 0 or unknown): the last step of
DDIM and DDPM, to ``abar = 1``, is deterministic and needs none.

``log Z`` (the estimate of ``log E_p[exp(r(x0) / alpha)]``) and, per output and per step, the ESS
(``ess``, and ``ess_fraction = ESS / K`` in (0, 1]) and whether the group was resampled after that
step (``resampled``; never after the last) are in the diagnostics, one row per output.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional, Union

import torch
from torch import Tensor

from tsf.errors import ConfigError
from tsf.models.base import Transition
from tsf.rewards.base import require_differentiable
from tsf.samplers.base import Sampler, check_gradient_through
from tsf.samplers.value import ValueFunction, build_value


class NonFiniteRewardError(RuntimeError):
    """Every particle of a group has a non-finite reward or value: there is nothing to weight."""


# ----------------------------------------------------------------------------- resampling
def resample(logw: Tensor, u: Tensor, method: str) -> Tensor:
    """Ancestor indices ``[B, K]`` from normalised log-weights ``[B, K]`` and uniforms ``u [B, K]``."""
    B, K = logw.shape
    w = torch.softmax(logw.double(), dim=1)
    cdf = w.cumsum(1)
    cdf[:, -1] = 1.0
    u = u.double()
    if method == "systematic":
        points = (torch.arange(K, device=w.device, dtype=torch.float64) + u[:, :1]) / K
    elif method == "stratified":
        points = (torch.arange(K, device=w.device, dtype=torch.float64) + u) / K
    elif method == "multinomial":
        points = u.sort(1).values
    elif method == "residual":
        copies = torch.floor(K * w).long()
        rest = K - copies.sum(1, keepdim=True)
        resid = K * w - copies
        resid_cdf = (resid / resid.sum(1, keepdim=True).clamp(min=1e-300)).cumsum(1)
        resid_cdf[:, -1] = 1.0
        idx = torch.empty(B, K, dtype=torch.long, device=w.device)
        ar = torch.arange(K, device=w.device)
        for b in range(B):
            det = ar.repeat_interleave(copies[b])
            n = int(rest[b])
            rnd = torch.searchsorted(resid_cdf[b].contiguous(), u[b, :n].sort().values.contiguous(),
                                     right=True).clamp(max=K - 1)
            idx[b] = torch.cat([det, rnd])
        return idx
    else:
        raise ConfigError(f"unknown resampler {method!r}")
    return torch.searchsorted(cdf.contiguous(), points.contiguous(), right=True).clamp(max=K - 1)


RESAMPLERS = ("systematic", "multinomial", "stratified", "residual")


def draw_categorical(logits: Tensor, u: Tensor) -> Tensor:
    """One index per row of ``logits [B, K]`` drawn from ``softmax(logits)`` by inverse CDF at ``u [B]``."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(1)
    points = u.double().reshape(-1, 1).contiguous()  # a view of a wider tensor is copied once, without a warning
    return torch.searchsorted(cdf.contiguous(), points, right=True).clamp(max=logits.shape[1] - 1)[:, 0]


def tempering_schedule(num_steps: int, tempering: str, gamma: float, fraction: float) -> list[float]:
    """``lambda_i`` for grid points ``i = 0 .. T`` (``lambda_T = 1``).

    ``none``: 1 everywhere. ``gamma`` (the DAS reference): ``min((1 + gamma)^i - 1, 1)``,
    which depends on T (gamma = 0.008 reaches 1 at step 87 of 100, but only 0.17 by step 20
    of 20). ``fraction``: the same exponential shape, reaching 1 at ``round(fraction T)`` for
    any T (fraction 0.87 is the reference at T = 100).
    """
    T = num_steps
    if tempering == "none":
        lam = [1.0] * (T + 1)
    elif tempering in ("gamma", "fraction"):
        if tempering == "fraction":
            if not 0 < fraction <= 1:
                raise ConfigError(f"tempering_fraction must be in (0, 1], got {fraction}")
            gamma = 2.0 ** (1.0 / max(1, round(fraction * T))) - 1
        elif gamma <= 0:
            raise ConfigError(f"gamma must be > 0, got {gamma}")
        lam = [min((1 + gamma) ** i - 1, 1.0) for i in range(T + 1)]
    else:
        raise ConfigError(f"unknown tempering {tempering!r}; known: none, gamma, fraction")
    lam[T] = 1.0
    return lam


def warn_weak_tempering(lam: list[float], tempering: str, gamma: float, far: float = 0.5) -> None:
    """Warn when ``lambda`` before the last step is below ``far``: the potentials then barely act until the
    last step jumps to 1, and the sampler comes out close to Best-of-K (the ``gamma`` form at small T:
    gamma = 0.008 gives lambda = 0.07 at step 9 of 10)."""
    T = len(lam) - 1
    if T < 3 or lam[T - 1] >= far:
        return
    setting = f"tempering: gamma, gamma: {gamma:g}" if tempering == "gamma" else f"tempering: {tempering}"
    warnings.warn(f"{setting} reaches lambda = {lam[T - 1]:.2f} at step {T - 1} of T = {T} (1 only at the last "
                  "step): the potentials barely act and the sampler is close to Best-of-K; use the T-independent "
                  "`tempering: fraction` (tempering_fraction: 0.87 is the DAS reference, gamma 0.008 at T = 100)",
                  stacklevel=2)


class SMC(Sampler):
    """Twisted SMC with tempering, base or gradient proposals, and in-group resampling.

    Args:
        num_particles: K particles per output.
        alpha: KL coefficient of the target ``p(x) exp(r(x) / alpha)``.
        value: ``posterior_mean``, ``exact`` (closed form, e.g. the Gaussian mixture) or a
            :class:`~tsf.samplers.value.LearnedValue`.
        proposal: ``base`` (the model's kernel) or ``gradient`` (DAS/TDS: the kernel's mean
            moved by ``s^2 grad psi``).
        gradient_through: how a gradient proposal takes ``grad_x psi``: ``network`` (backpropagation
            through the reward, the decoder and the network) or ``tweedie`` (through the reward and the
            decoder only, the network output held constant: ``grad_x psi = J grad_{x0} psi(x0_hat)``,
            ``J = 1 / sqrt(abar)`` for eps prediction; needs ``value: posterior_mean``). The weights use the
            proposal drawn from, so either keeps the target exact.
        tempering: ``none``, ``fraction`` (T-independent) or ``gamma`` (the DAS reference form).
        gamma: the reference tempering rate (``tempering: gamma``).
        tempering_fraction: fraction of the steps at which lambda reaches 1 (``tempering: fraction``).
        potential: ``diff`` (the twisted-SMC increment), or FK steering's ``max`` (``exp`` of the largest
            twist ``psi`` over the potential steps so far, the prior's included), ``sum`` (of their sum)
            or ``rt`` (of the current twist). ``max``, ``sum`` and ``rt`` act only at the resampling
            steps, so they need ``resample_steps``; the final step divides them out again.
        resampler: ``systematic``, ``multinomial``, ``stratified`` or ``residual``.
        ess_threshold: resample a group when its ESS < ``ess_threshold * K`` (1 = every step).
        resample_steps: resample at exactly these step indices instead (FK steering): after step ``i``
            (the state at grid point ``i + 1``) for each listed ``i < T - 1``. The potentials act at these
            steps and at the end only, and the value is computed only there (and wherever a gradient
            proposal needs its gradient).
        output: ``sample`` (one particle drawn by the final weights: a draw from the target),
            ``argmax`` (the highest weight, the DAS reference) or ``all`` (the drawn particle,
            plus every particle and its weight in the diagnostics).
        grad_batch: particles per gradient chunk (bounds the memory of gradient proposals).
    """

    name = "smc"
    needs_stochastic_kernel = True

    def __init__(
        self,
        num_particles: int = 8,
        alpha: float = 0.1,
        value: Union[str, ValueFunction] = "posterior_mean",
        proposal: Literal["base", "gradient"] = "base",
        gradient_through: Literal["network", "tweedie"] = "network",
        tempering: Literal["none", "fraction", "gamma"] = "none",
        gamma: float = 0.008,
        tempering_fraction: float = 0.87,
        potential: Literal["diff", "max", "sum", "rt"] = "diff",
        resampler: Literal["systematic", "multinomial", "stratified", "residual"] = "systematic",
        ess_threshold: float = 0.5,
        resample_steps: Optional[list[int]] = None,
        output: Literal["sample", "argmax", "all"] = "sample",
        grad_batch: int = 64,
        max_batch: int = 4096,
    ) -> None:
        super().__init__(num_particles=num_particles, max_batch=max_batch)
        if not alpha > 0:
            raise ConfigError(f"alpha must be > 0 for SMC (the weights are exp(r / alpha)), got {alpha}")
        for key, val, known in (("proposal", proposal, ("base", "gradient")), ("resampler", resampler, RESAMPLERS),
                                ("potential", potential, ("diff", "max", "sum", "rt")),
                                ("output", output, ("sample", "argmax", "all"))):
            if val not in known:
                raise ConfigError(f"unknown {key} {val!r}; known: {', '.join(known)}")
        if not 0 <= ess_threshold <= 1:
            raise ConfigError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
        if grad_batch < 1:
            raise ConfigError(f"grad_batch must be >= 1, got {grad_batch}")
        if potential != "diff" and resample_steps is None:
            raise ConfigError(
                f"potential: {potential} needs resample_steps (e.g. [20, 40, 60, 80] for 100 steps): FK steering's "
                "potentials act at fixed resampling steps, and ESS-adaptive resampling gives them no schedule; "
                "give resample_steps, or use potential: diff with ESS-adaptive resampling")
        tempering_schedule(10, tempering, gamma, tempering_fraction)  # validates
        self.alpha = float(alpha)
        self.value_fn = build_value(value)
        self.gradient_through = check_gradient_through(gradient_through, self.value_fn)
        if gradient_through != "network" and proposal != "gradient":
            raise ConfigError(f"gradient_through: {gradient_through} says how a gradient proposal takes its gradient, "
                              f"and proposal: {proposal} takes none: set proposal: gradient, or drop gradient_through")
        self.proposal, self.tempering, self.gamma = proposal, tempering, float(gamma)
        self.tempering_fraction = float(tempering_fraction)
        self.potential, self.resampler, self.ess_threshold = potential, resampler, float(ess_threshold)
        self.resample_steps = None if resample_steps is None else sorted(int(s) for s in resample_steps)
        self.output, self.grad_batch = output, int(grad_batch)

    @property
    def needs_gaussian_kernel(self) -> bool:  # a gradient proposal moves the Gaussian kernel's mean
        return self.proposal == "gradient"

    @property
    def uses_reward_gradient(self) -> bool:
        """Whether the sampler follows the reward's gradient (the gradient proposal of TDS and DAS)."""
        return self.proposal == "gradient"

    def __repr__(self) -> str:
        through = f", gradient_through={self.gradient_through}" if self.gradient_through != "network" else ""
        return (f"{type(self).__name__}(K={self.num_particles}, alpha={self.alpha}, proposal={self.proposal}{through}, "
                f"tempering={self.tempering}, potential={self.potential})")

    @classmethod
    def for_budget(cls, budget: int, num_steps: int) -> dict:
        return {"num_particles": max(1, budget // num_steps)}  # NFE = K T

    def _sample(self, model, reward, conditions, c, noise):
        K, T, alpha = self.num_particles, model.num_steps, self.alpha
        B = len(conditions)
        conds, c = self.repeat(conditions, c, K)
        lam = tempering_schedule(T, self.tempering, self.gamma, self.tempering_fraction)
        warn_weak_tempering(lam, self.tempering, self.gamma)
        grad = self.proposal == "gradient"
        if grad:
            require_differentiable(reward, "proposal: gradient (TDS, DAS)")
        counts = {"nonfinite_values": 0, "nonfinite_grads": 0}
        dev = model.device
        offsets = K * torch.arange(B, device=dev)[:, None]       # row of particle 0 of each group
        identity = torch.arange(K, device=dev).expand(B, K)
        fixed = self.resample_steps is not None
        outside = [s for s in self.resample_steps or () if not 0 <= s < T - 1]
        if outside:
            warnings.warn(f"resample_steps {outside} are outside 0 .. {T - 2} for T = {T} steps (no resampling after "
                          "the last step): they are ignored")
        schedule = set(self.resample_steps or ())
        # a potential acts after step i (on the state at grid point i + 1) at every step when resampling is
        # ESS-adaptive, only at the listed steps with a fixed schedule (FK steering), and always at the end
        potential_at = [not fixed or i in schedule or i + 1 == T for i in range(T)]
        # the gradient at grid point j is used only by the proposal of step j, so only where that kernel has noise
        # (a model that does not know its step's std, step_std None, gets the gradient at every step)
        stds = [model.step_std(j) for j in range(T)] if grad else [None] * T
        grad_at = [grad and (s is None or float(s) > 0) for s in stds] + [False]

        final_images = []

        def evaluate(x, i, with_grad):
            if i < T:
                # (the kernel at grid point i comes back with the value: its Tweedie estimate is computed once)
                v, out, g = self.value(model, reward, self.value_fn, x, i, c, conds, alpha, grad=with_grad,
                                       grad_batch=self.grad_batch, through=self.gradient_through, kernel=True)
            else:  # the particles are candidate x0: the reward itself (an image model's images are kept)
                v, images = self.final_value(model, reward, x, conds, lambda: self.value(
                    model, reward, self.value_fn, x, i, c, conds, alpha)[0])
                out = g = None
                final_images.append(images)
            bad = ~torch.isfinite(v)
            if g is not None:
                gbad = ~torch.isfinite(g)
                counts["nonfinite_grads"] += gbad.sum()
                g = g.masked_fill(gbad, 0.0)
            return v.view(B, K).double(), out, g, bad.view(B, K)

        x = model.prior(noise.for_kernel(model, K))
        v, out, g, dead = evaluate(x, 0, grad_at[0])
        counts["nonfinite_values"] += dead.sum()
        psi = lam[0] * v / alpha
        stat = torch.where(dead, 0.0, psi)             # running max / sum for FK potentials
        log_g = torch.where(dead, 0.0, psi)            # accumulated log-potential along each path
        logw = torch.where(dead, -math.inf, psi) - math.log(K)
        log_z = torch.zeros(B, dtype=torch.float64, device=dev)
        log_z, logw = self._normalise(log_z, logw)
        ess_trace, resampled = [], []
        # the resampling uniforms of every step, read from each sample's stream in one call
        uniforms = noise.rand(K * (T - 1), dtype=torch.float64).view(B, max(T - 1, 0), K)

        for i in range(T):
            tr = self.transition(model, x, i, c, out)
            z = noise.for_kernel(model, K)
            if g is not None and not tr.deterministic:
                # q = N(mu + delta, s^2 I), delta = s^2 grad psi_{i+1}; with x_new = mu + delta + s z,
                # log p(x_new) - log q(x_new) = -(delta / s) . (delta / (2 s) + z)  (exact, no cancellation;
                # per element in the states' dtype, summed in float64)
                d_over_s = tr.std * (lam[i + 1] / alpha) * g
                x_new = tr.mean + tr.std * (z + d_over_s)
                log_ratio = -(d_over_s * (0.5 * d_over_s + z)).flatten(1).sum(1, dtype=torch.float64).view(B, K)
            else:
                x_new = tr.sample(z)
                log_ratio = None
            if potential_at[i] or grad_at[i + 1]:
                v_new, out, g, bad = evaluate(x_new, i + 1, grad_at[i + 1])
            else:  # the value is not used here: no reward call (the next transition computes the model output)
                out = g = None
            if potential_at[i]:
                v = v_new
                counts["nonfinite_values"] += bad.sum()
                psi = lam[i + 1] * v / alpha
                if i + 1 == T:
                    inc = psi - log_g                     # the final potential completes exp(r / alpha)
                elif self.potential == "diff":
                    inc = psi - log_g                     # the change since the last potential step
                elif self.potential == "max":
                    stat = torch.maximum(stat, psi)
                    inc = stat
                elif self.potential == "sum":
                    stat = stat + psi
                    inc = stat
                else:  # rt
                    inc = psi
                dead = dead | bad
                log_g = torch.where(dead, 0.0, log_g + inc)
                stat = torch.where(dead, 0.0, stat)
                step = inc if log_ratio is None else inc + log_ratio
            else:  # between potential steps only a gradient proposal's p / q moves the weights
                step = log_ratio
            if step is not None:
                logw = torch.where(dead | ~torch.isfinite(step), -math.inf, logw + step)
                if torch.isinf(logw).all(1).any():
                    raise NonFiniteRewardError(
                        f"every particle of a group has a non-finite reward or value at step {i + 1} of {T} "
                        f"(reward {reward.name!r}); check the reward on these samples"
                    )
                log_z, logw = self._normalise(log_z, logw)
            ess = 1.0 / torch.exp(2 * logw).sum(1)
            ess_trace.append(ess.float())
            if i + 1 < T:
                if fixed:
                    do = torch.full((B,), i in schedule, device=dev)
                else:
                    do = ess < self.ess_threshold * K
                if do.any():
                    idx = resample(logw, uniforms[:, i], self.resampler)
                    idx = torch.where(do[:, None], idx, identity)
                    flat = (idx + offsets).reshape(-1)
                    x_new = x_new[flat]
                    out = None if out is None else out.index(flat) if isinstance(out, Transition) else out[flat]
                    g = None if g is None else g[flat]
                    v, log_g, stat, dead = (t.gather(1, idx) for t in (v, log_g, stat, dead))
                    logw = torch.where(do[:, None], torch.full_like(logw, -math.log(K)), logw)
                resampled.append(do)
            else:
                resampled.append(torch.zeros(B, dtype=torch.bool, device=dev))  # the output is chosen instead
            x = x_new

        counts = {k: int(n) for k, n in counts.items()}
        if counts["nonfinite_values"]:
            warnings.warn(f"{counts['nonfinite_values']} particle values were not finite; they got zero weight")
        u = noise.rand(1, dtype=torch.float64)[:, 0]
        pick = logw.argmax(1) if self.output == "argmax" else draw_categorical(logw, u)
        rows = pick + K * torch.arange(B, device=dev)
        r_final = v.reshape(-1)[rows].float()  # at i = T the value is the reward
        ess = torch.stack(ess_trace, 1).cpu()  # [B, T]: after each step's reweighting
        diagnostics = {
            "log_z": log_z.float().cpu(),
            "ess": ess,
            "ess_fraction": ess / K,
            "resampled": torch.stack(resampled, 1).cpu(),  # [B, T], aligned with ess
            **counts,
        }
        if self.output == "all":
            diagnostics["particles"] = x.view(B, K, *x.shape[1:]).cpu()
            diagnostics["log_weights"] = logw.float().cpu()
        images = final_images[-1] if final_images and final_images[-1] is not None else None
        return x[rows], r_final, diagnostics, None if images is None else images[rows]

    @staticmethod
    def _normalise(log_z: Tensor, logw: Tensor) -> tuple[Tensor, Tensor]:
        lse = torch.logsumexp(logw, 1)
        return log_z + lse, logw - lse[:, None]
