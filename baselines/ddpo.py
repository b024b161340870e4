"""DDPO (Black et al. 2023): policy-gradient fine-tuning of the sampling chain, with PPO clipping.

Trajectories of DDIM with eta = 1 store every step's ``(x_t, x_prev, log p)``, the log-density
being the **mean** over dimensions (the sum is numerically unstable). Advantages come from
per-condition running statistics of the reward (a buffer of 16, batch statistics until 16
are seen), clipped to +-5. Each optimisation step trains on a random ``timestep_fraction`` of
the steps, accumulating gradients over them, with the PPO loss
``mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))``.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Optional

import torch

from baselines.common import FinetuneModule
from tsf.errors import ConfigError


def mean_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density averaged over dimensions (DDPO's per-step log-probability)."""
    var = std.expand_as(mean) ** 2
    return (-0.5 * ((x - mean) ** 2 / var + torch.log(2 * torch.pi * var))).flatten(1).mean(1)


class PerConditionStats:
    """Running reward statistics per condition (buffer ``size``; batch statistics below ``min_count``)."""

    def __init__(self, size: int = 16, min_count: int = 16) -> None:
        self.size, self.min_count = size, min_count
        self.buffers: dict = defaultdict(lambda: deque(maxlen=size))

    def advantages(self, conditions: list, rewards: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rewards)
        r = rewards.detach().cpu()
        for key in dict.fromkeys(conditions):
            rows = [j for j, c in enumerate(conditions) if c == key]
            self.buffers[key].extend(r[rows].tolist())
            pool = torch.tensor(list(self.buffers[key])) if len(self.buffers[key]) >= self.min_count else r
            mean, std = pool.mean(), pool.std() if len(pool) > 1 else torch.tensor(1.0)
            out[rows] = ((rewards[rows] - mean) / (std + 1e-6)).to(out.dtype)
        return out

    def state_dict(self) -> dict:
        return {str(k): list(v) for k, v in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for k, v in state.items():
            key = None if k == "None" else (int(k) if k.lstrip("-").isdigit() else k)
            self.buffers[key].extend(v)


class DDPO(FinetuneModule):
    """DDPO with PPO clipping (the reference defaults: clip 1e-4, advantages clipped to 5, lr 3e-4).

    Args:
        clip_range: PPO's ``eps``.
        adv_clip: advantage clip.
        timestep_fraction: fraction of the (stochastic) steps trained on per optimisation step.
        micro_batch: samples per backward pass (gradients accumulate over samples and timesteps;
            ``None``: the whole batch at once).
        grad_clip: gradient-norm clip.
        (the rest as :class:`~baselines.common.FinetuneModule`)
    """

    def __init__(self, *args, clip_range: float = 1e-4, adv_clip: float = 5.0, timestep_fraction: float = 1.0,
                 grad_clip: float = 1.0, micro_batch: Optional[int] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0 < timestep_fraction <= 1:
            raise ConfigError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if self.base.eta != 1.0:
            raise ConfigError("DDPO samples with DDIM eta = 1: set the base model's eta to 1")
        if micro_batch is not None and micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1, got {micro_batch}")
        self.clip_range, self.adv_clip, self.timestep_fraction, self.grad_clip = (
            clip_range, adv_clip, timestep_fraction, grad_clip)
        self.micro_batch = micro_batch
        self.stats = PerConditionStats()
        self.automatic_optimization = False

    def training_step(self, batch, _):
        model, T = self.base, self.base.num_steps
        conds, noise = self.training_batch()
        c = model.encode_conditions(conds)
        steps, xs, x_prevs, old = [], [], [], []
        with torch.no_grad():
            x = model.prior(noise.randn(1, model.sample_shape))
            for i in range(T):
                tr = model.transition(x, i, c)
                x_prev = tr.sample(noise.randn(1, model.sample_shape))
                if float(tr.std.max()) > 0:  # the last DDIM step is deterministic: no log-probability
                    steps.append(i), xs.append(x), x_prevs.append(x_prev)
                    old.append(mean_log_prob(x_prev, tr.mean, tr.std))
                x = x_prev
            rewards = self.reward(model.decode(x), conds)
        # the statistics see the whole global batch (every rank's rewards), each rank keeps its own rows
        rank, world = self.rank_and_world()
        all_adv = self.stats.advantages(self.conditions_of(self.global_ids()), self.gather_global(rewards.float()))
        adv = all_adv[rank::world].clamp(-self.adv_clip, self.adv_clip)
        n_train = max(1, round(self.timestep_fraction * len(steps)))
        order = torch.randperm(len(steps), generator=torch.Generator().manual_seed(self.seed + self.global_step))
        opt = self.optimizers()
        opt.zero_grad()
        total = 0.0
        n, mb = len(conds), self.micro_batch or len(conds)
        for j in order[:n_train].tolist():  # accumulate over timesteps ...
            for s in range(0, n, mb):        # ... and over micro-batches of samples
                rows = slice(s, s + mb)
                tr = model.transition(xs[j][rows], steps[j], c[rows])
                ratio = torch.exp(mean_log_prob(x_prevs[j][rows], tr.mean, tr.std) - old[j][rows])
                a = adv[rows]
                loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range)).sum()
                loss = loss / (n * n_train)
                self.manual_backward(loss)
                total += float(loss.detach())
        self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.log_dict({"train/loss": total, "train/reward": rewards.float().mean()}, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ddpo_stats"] = self.stats.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.stats.load_state_dict(checkpoint.get("ddpo_stats", {}))
