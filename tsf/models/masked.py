"""Masked (absorbing-state) discrete diffusion behind the kernel interface (docs/algorithms.md, section 11).

Sequences ``x`` in ``{0 .. V-1}^L`` with one mask token. Grid point ``i`` (``0 .. T``) is time ``t_i = 1 - i / T``;
a token is unmasked at time ``t`` with probability ``alpha(t)`` (``linear``: ``1 - t``; ``cosine``:
``cos(pi t / 2)^2``). The denoiser predicts x0 logits; MDLM's SUBS parameterisation carries unmasked tokens over
and never predicts the mask. The reverse kernel from ``t`` to ``s``: a masked token stays masked with probability
``(1 - alpha_s) / (1 - alpha_t)`` and otherwise becomes a draw from the predicted x0 distribution; carried tokens
stay. Its noise is one uniform per position and step (inverse CDF over ``[stay masked, token 0, ...]``).

* :class:`MaskedDiffusion`: the base class for any x0-logit denoiser (the embedded digits model, a Hugging Face
  masked language model).
* :class:`CategoricalMixture`: the exact testbed, a mixture of product categoricals, with its closed forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from tsf.errors import ConfigError
from tsf.models.base import BaseModel, Transition, class_labels

SCHEDULES = ("linear", "cosine")


def unmasked_fraction(t: float, schedule: str) -> float:
    """``alpha(t)``: the probability that a token is unmasked at time ``t`` (1 at t = 0, 0 at t = 1)."""
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return math.cos(math.pi * t / 2) ** 2 if t < 1 else 0.0
    raise ConfigError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")


def _draw_tokens(probs: Tensor, u: Tensor) -> Tensor:
    """One token per position of ``probs [N, L, V]`` by inverse CDF at ``u [N, L]`` in [0, 1)."""
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, u.double().unsqueeze(-1).contiguous(), right=True).clamp(max=probs.shape[-1] - 1)[..., 0]


@dataclass
class MaskedTransition(Transition):
    """The masked-diffusion reverse kernel from grid point ``i`` to ``i + 1``: per position independently, a
    carried (unmasked) token stays; a masked one stays masked with probability ``p_stay`` (``[N, 1]``) and
    otherwise becomes ``v`` with probability ``exp(output[..., v])`` (the SUBS x0 log-probabilities ``[N, L, V]``).
    ``mask`` is the mask token per row (``[N, 1]``)."""

    x: Tensor
    p_stay: Tensor
    mask: Tensor
    x0_hat: Tensor
    output: Tensor

    def sample(self, noise: Tensor) -> Tensor:
        u = noise.to(torch.float64)
        p = self.p_stay.double()
        masked = self.x == self.mask
        stay = u < p
        u2 = ((u - p) / (1 - p).clamp(min=1e-300)).clamp(0, 1)  # the rest of [p, 1) rescaled to [0, 1)
        tokens = _draw_tokens(self.output.exp(), u2)
        return torch.where(masked & ~stay, tokens, self.x)

    def log_prob(self, x: Tensor) -> Tensor:
        masked, p = self.x == self.mask, self.p_stay.double()
        picked = self.output.double().gather(-1, x.clamp(max=self.output.shape[-1] - 1).unsqueeze(-1))[..., 0]
        drawn = torch.where(x == self.mask, torch.log(p), torch.log1p(-p) + picked)
        lp = torch.where(masked, drawn, torch.where(x == self.x, 0.0, -math.inf))
        return lp.sum(-1)


class MaskedDiffusion(BaseModel):
    """A masked-diffusion base model around a denoiser of x0 logits.

    Subclasses implement :meth:`logits` (the network: ``[N, L, V]`` logits over the vocabulary, the mask token's
    column included or not) and, for images, :meth:`decode`.

    Args:
        seq_len: L, tokens per sequence.
        vocab_size: V, token ids ``0 .. V - 1``, the mask token among them.
        mask_id: the mask token.
        num_steps: T.
        schedule: ``linear`` or ``cosine`` ``alpha(t)``.
        guidance_scale: classifier-free guidance weight on the logits (conditional denoisers).
        num_classes: the denoiser's class conditions (``None``: unconditional).
        excluded_ids: token ids never drawn besides the mask (a language model's special tokens).
        batch_invariant: pad calls on fewer than 16 rows (see :class:`~tsf.models.base.BaseModel`).
    """

    gaussian_kernel = False
    noise_kind = "uniform"
    has_images = False

    def __init__(self, seq_len: int, vocab_size: int, mask_id: int, num_steps: int = 32,
                 schedule: Literal["linear", "cosine"] = "linear", guidance_scale: float = 1.0,
                 num_classes: Optional[int] = None, excluded_ids: Sequence[int] = (),
                 batch_invariant: bool = False) -> None:
        super().__init__()
        if int(num_steps) < 1:
            raise ConfigError(f"num_steps must be >= 1, got {num_steps}")
        if not 0 <= mask_id < vocab_size:
            raise ConfigError(f"mask_id {mask_id} outside the vocabulary 0 .. {vocab_size - 1}")
        unmasked_fraction(0.5, schedule)  # validates
        self.sample_shape, self.num_steps = (int(seq_len),), int(num_steps)
        self.vocab_size, self.mask_id, self.schedule = int(vocab_size), int(mask_id), schedule
        self.guidance_scale, self.num_classes = float(guidance_scale), num_classes
        self.batch_invariant = batch_invariant
        self.alphas = [unmasked_fraction(1 - i / self.num_steps, schedule) for i in range(self.num_steps + 1)]
        self.alphas[-1] = 1.0
        banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        banned[[self.mask_id, *map(int, excluded_ids)]] = True
        self.register_buffer("banned", banned, persistent=False)

    def extra_repr(self) -> str:
        return (f"seq_len={self.sample_shape[0]}, vocab_size={self.vocab_size}, num_steps={self.num_steps}, "
                f"schedule={self.schedule}, guidance_scale={self.guidance_scale}")

    # -- conditions -------------------------------------------------------------------
    def encode_conditions(self, conditions):
        return class_labels(conditions, self.num_classes, self.device)

    # -- the denoiser -----------------------------------------------------------------
    def logits(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:  # pragma: no cover - abstract
        """x0 logits ``[N, L, V]`` (or ``[N, L, V']`` with ``V' < V``: the ids above get none) at times ``t [N]``."""
        raise NotImplementedError

    def time(self, i: int) -> float:
        return 1.0 - i / self.num_steps

    def forward(self, x: Tensor, i: int, c: Tensor) -> Tensor:
        """SUBS x0 log-probabilities ``[N, L, V]`` at grid point ``i``: one network evaluation (classifier-free
        guidance on the logits when ``guidance_scale != 1``); unmasked positions are the one-hot of their token."""
        t = torch.full((x.shape[0],), self.time(i), device=x.device)
        if self.guidance_scale != 1.0 and self.num_classes is not None:
            null = torch.full_like(c, self.num_classes)
            z_c, z_u = self.logits(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, null])).float().chunk(2)
            z = z_u + self.guidance_scale * (z_c - z_u)
        else:
            z = self.logits(x, t, c).float()
        if z.shape[-1] < self.vocab_size:
            z = torch.cat([z, z.new_full((*z.shape[:-1], self.vocab_size - z.shape[-1]), -math.inf)], -1)
        logp = torch.log_softmax(z.masked_fill(self.banned, -math.inf), -1)
        carried = (x != self.mask_id).unsqueeze(-1)
        one_hot = torch.where(torch.arange(self.vocab_size, device=x.device) == x.unsqueeze(-1), 0.0, -math.inf)
        return torch.where(carried, one_hot, logp)

    def x0_hat(self, x: Tensor, i: int, output: Tensor) -> Tensor:
        """The most likely x0 under the denoiser (unmasked tokens carried): what the posterior-mean value scores."""
        return torch.where(x == self.mask_id, output.argmax(-1), x)

    # -- the kernel -------------------------------------------------------------------
    def prior(self, noise: Tensor) -> Tensor:
        """Every token masked (the noise is not used: the prior is a point mass)."""
        return torch.full((noise.shape[0], *self.sample_shape), self.mask_id, dtype=torch.long, device=noise.device)

    def stay_probability(self, i: int) -> float:
        """``(1 - alpha_s) / (1 - alpha_t)`` of the step from grid point ``i`` to ``i + 1``."""
        a_t, a_s = self.alphas[i], self.alphas[i + 1]
        return (1 - a_s) / (1 - a_t) if a_t < 1 else 1.0

    def transition(self, x: Tensor, i: int, c: Tensor, output: Optional[Tensor] = None) -> MaskedTransition:
        out = self(x, i, c) if output is None else output
        n = x.shape[0]
        p = torch.full((n, 1), self.stay_probability(i), dtype=torch.float64, device=x.device)
        mask = torch.full((n, 1), self.mask_id, dtype=x.dtype, device=x.device)
        return MaskedTransition(x=x, p_stay=p, mask=mask, x0_hat=self.x0_hat(x, i, out), output=out)

    def renoise(self, x: Tensor, i: int, j: int, noise: Tensor) -> Tensor:
        """The forward process from grid point ``i`` to the noisier ``j <= i``: each unmasked token is masked with
        probability ``1 - alpha_j / alpha_i`` (``noise``: one uniform per position)."""
        if not 0 <= j <= i <= self.num_steps:
            raise ValueError(f"renoise goes from grid point i to a noisier j <= i in 0 .. {self.num_steps}, got {i} -> {j}")
        if j == i:
            return x
        keep = self.alphas[j] / self.alphas[i]
        u = noise[..., : x.shape[-1]].double()  # (the joint kernel's extra component uniform is not used)
        return torch.where(u < 1 - keep, torch.full_like(x, self.mask_id), x)

    def decode(self, x0: Tensor) -> Tensor:
        return x0

    def value_input(self, x: Tensor) -> Tensor:
        """One-hot tokens ``[N, L V]`` (a learned value network's input)."""
        return torch.nn.functional.one_hot(x.long(), self.vocab_size).flatten(1).float()

    @property
    def value_dim(self) -> int:
        return self.sample_shape[0] * self.vocab_size


# ----------------------------------------------------------------------------- the exact testbed
class CategoricalPosterior(nn.Module):
    """Closed forms of a mixture of product categoricals given a partly masked sequence (float64 inside)."""

    def __init__(self, weights: Tensor, probs: Tensor, mask_id: int) -> None:
        super().__init__()
        self.register_buffer("log_pi", weights.log())
        self.register_buffer("log_p", probs.log())  # [K, L, V]
        self.mask_id = mask_id

    def log_w(self, x: Tensor) -> Tensor:
        """Component posterior ``log w_k`` ``[N, K]``: ``pi_k prod_{i unmasked} p_{k,i}(x_i)``, normalised."""
        known = x != self.mask_id
        tok = x.clamp(max=self.log_p.shape[-1] - 1)
        K, L, V = self.log_p.shape
        lp = self.log_p.permute(1, 2, 0)[torch.arange(L, device=x.device), tok]  # [N, L, K]
        lp = torch.where(known.unsqueeze(-1), lp, 0.0).sum(1)
        return torch.log_softmax(self.log_pi + lp, -1)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """Marginal x0 log-probabilities ``[N, L, V]``: ``log sum_k w_k p_{k,i}(v)``."""
        return torch.logsumexp(self.log_w(x)[:, :, None, None] + self.log_p[None], 1).float()


@dataclass
class JointMixtureTransition(MaskedTransition):
    """The exact reverse kernel of the mixture: which tokens unmask as in :class:`MaskedTransition`, and the newly
    unmasked tokens drawn **jointly** from ``p(x0 | x_t) = sum_k w_k prod_i p_{k,i}(x0_i)`` (a component from
    ``w`` by the row's last uniform, then each token from it). ``log_w [N, K]``, ``log_p [N, K, L, V]``."""

    log_w: Tensor = None
    log_p: Tensor = None

    def sample(self, noise: Tensor) -> Tensor:
        u, uk = noise[:, :-1].to(torch.float64), noise[:, -1].to(torch.float64)
        k = torch.searchsorted(self.log_w.double().exp().cumsum(-1), uk[:, None].contiguous(), right=True)
        k = k.clamp(max=self.log_w.shape[-1] - 1)[:, 0]
        probs = self.log_p[torch.arange(len(k), device=k.device), k].exp()  # [N, L, V]
        p = self.p_stay.double()
        stay = u < p
        tokens = _draw_tokens(probs, ((u - p) / (1 - p).clamp(min=1e-300)).clamp(0, 1))
        return torch.where((self.x == self.mask) & ~stay, tokens, self.x)

    def log_prob(self, x: Tensor) -> Tensor:
        masked, p = self.x == self.mask, self.p_stay.double()
        new = masked & (x != self.mask)
        decisions = torch.where(masked, torch.where(new, torch.log1p(-p), torch.log(p)), 0.0).sum(-1)
        carried_ok = torch.where(masked | (x == self.x), 0.0, -math.inf).sum(-1)
        tok = x.clamp(max=self.log_p.shape[-1] - 1)
        lp = self.log_p.double().gather(-1, tok[:, None, :, None].expand(-1, self.log_p.shape[1], -1, 1))[..., 0]
        joint = torch.logsumexp(self.log_w.double() + torch.where(new[:, None], lp, 0.0).sum(-1), -1)
        return decisions + carried_ok + joint


class CategoricalMixture(MaskedDiffusion):
    """A mixture of product categoricals under masked diffusion, with everything exact.

    ``p(x) = sum_k pi_k prod_i p_{k,i}(x_i)`` over ``L`` positions and ``V`` tokens (the mask token is ``V``). The
    denoiser is the closed-form posterior; the soft value of an additive :class:`~tsf.rewards.TokenReward`, the
    tilted target and ``log Z`` are closed forms too.

    Args:
        weights: ``pi_k`` (normalised).
        probs: ``[K][L][V]`` per-position categoricals (each row normalised).
        num_steps, schedule: as for :class:`MaskedDiffusion`.
        kernel: ``joint`` (the exact reverse kernel: newly unmasked tokens drawn jointly, so x0 follows the mixture
            exactly) or ``factorized`` (MDLM's per-position kernel with the exact marginals: tokens that unmask at
            one step are drawn independently, which loses the mixture's correlations between them).
        batch_invariant: pad calls on fewer than 16 rows (default on).
    """

    def __init__(self, weights: list[float], probs: list[list[list[float]]], num_steps: int = 16,
                 schedule: Literal["linear", "cosine"] = "linear", kernel: Literal["joint", "factorized"] = "joint",
                 batch_invariant: bool = True) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        p = torch.as_tensor(probs, dtype=torch.float64)
        if w.dim() != 1 or (w <= 0).any():
            raise ConfigError(f"weights must be a list of positive numbers, got {weights}")
        if p.dim() != 3 or p.shape[0] != len(w):
            raise ConfigError(f"probs: expected [{len(w)}][L][V] (one table per component), got shape {list(p.shape)}")
        if (p < 0).any() or not torch.allclose(p.sum(-1), torch.ones(()).double(), atol=1e-6):
            raise ConfigError("probs: every position's categorical must be non-negative and sum to 1")
        if kernel not in ("joint", "factorized"):
            raise ConfigError(f"unknown kernel {kernel!r}; known: joint, factorized")
        K, L, V = p.shape
        super().__init__(seq_len=L, vocab_size=V + 1, mask_id=V, num_steps=num_steps, schedule=schedule,
                         batch_invariant=batch_invariant)
        self.kernel = kernel
        self.net = CategoricalPosterior(w / w.sum(), p / p.sum(-1, keepdim=True), V)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.sample_shape[0] + (self.kernel == "joint"),)  # the joint kernel's component uniform

    def extra_repr(self) -> str:
        return (f"weights={self.net.log_pi.exp().tolist()}, probs={self.net.log_p.exp().tolist()}, "
                f"kernel={self.kernel}, " + super().extra_repr())

    def logits(self, x, t, c):
        return self.net(x, t)

    def transition(self, x, i, c, output=None):
        tr = super().transition(x, i, c, output)
        if self.kernel == "factorized":
            return tr
        log_w = self.net.log_w(x)
        log_p = self.net.log_p.expand(x.shape[0], *self.net.log_p.shape)
        return JointMixtureTransition(tr.x, tr.p_stay, tr.mask, tr.x0_hat, tr.output, log_w=log_w, log_p=log_p)

    # -- closed forms for an additive reward ---------------------------------------------
    def _values(self, reward) -> Tensor:
        from tsf.rewards.tokens import TokenReward

        if not isinstance(reward, TokenReward):
            raise ConfigError(f"closed forms need an additive token reward (tsf.rewards.TokenReward), got "
                              f"{getattr(reward, 'name', type(reward).__name__)!r}")
        c = reward.values.double().to(self.net.log_p.device)
        if tuple(c.shape) != tuple(self.net.log_p.shape[1:]):
            raise ConfigError(f"TokenReward values have shape {list(c.shape)}, the mixture [L, V] = "
                              f"{list(self.net.log_p.shape[1:])}")
        return c

    def _log_zki(self, c: Tensor, alpha: float) -> Tensor:
        """``log Z_{k,i} = log sum_v p_{k,i}(v) exp(c_i(v) / alpha)`` ``[K, L]``."""
        return torch.logsumexp(self.net.log_p + c[None] / alpha, -1)

    def exact_value(self, x: Tensor, i: int, reward, alpha: float) -> Tensor:
        """``alpha log E[exp(r(x0) / alpha) | x_i]`` (``i = num_steps``: the reward itself), float64."""
        c = self._values(reward)
        L = c.shape[0]
        known = x != self.mask_id
        tok = x.clamp(max=c.shape[1] - 1)
        r_known = torch.where(known, c[torch.arange(L, device=x.device), tok], 0.0).sum(-1)  # [N]
        if i == self.num_steps:
            return r_known
        log_z = torch.where(known[:, None, :], 0.0, self._log_zki(c, alpha)[None]).sum(-1)  # [N, K]
        return r_known + alpha * torch.logsumexp(self.net.log_w(x) + log_z, -1)

    def tilted(self, reward, alpha: float) -> tuple[Tensor, Tensor]:
        """``(pi*, p*)`` of the tilted target ``p(x) exp(r(x) / alpha) / Z``, again a mixture of products."""
        c = self._values(reward)
        log_zki = self._log_zki(c, alpha)
        pi = torch.softmax(self.net.log_pi + log_zki.sum(-1), 0)
        return pi, torch.exp(self.net.log_p + c[None] / alpha - log_zki[..., None])

    def log_normalizer(self, reward, alpha: float) -> float:
        """``log Z = log sum_k pi_k prod_i Z_{k,i}``."""
        c = self._values(reward)
        return float(torch.logsumexp(self.net.log_pi + self._log_zki(c, alpha).sum(-1), 0))

    def tilted_marginals(self, reward, alpha: float) -> Tensor:
        """``p*(x_i = v)`` ``[L, V]``."""
        pi, p = self.tilted(reward, alpha)
        return torch.einsum("k,klv->lv", pi, p)

    def tilted_pair(self, reward, alpha: float, i: int, j: int) -> Tensor:
        """``p*(x_i = a, x_j = b)`` ``[V, V]``."""
        pi, p = self.tilted(reward, alpha)
        return torch.einsum("k,ka,kb->ab", pi, p[:, i], p[:, j])
