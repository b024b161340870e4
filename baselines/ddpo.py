"""DDPO (Black et al. 2023): policy-gradient fine-tuning of the sampling chain, with PPO clipping; on a flow
model's stochastic kernel with Flow-GRPO's group-relative advantages (Liu et al. 2025) as an option.

One DDPO *epoch* (the reference's outer loop) is:

1. **sampling**: ``num_batches_per_epoch`` batches of ``batch_size`` trajectories drawn with the
   current policy (DDIM with eta = 1, or a flow model's Linear-SDE or VP-SDE kernel; no gradients),
   storing every step's ``x_t``, ``x_prev`` and ``log p(x_prev | x_t)`` (the Gaussian log-density's
   **mean** over dimensions; the sum is numerically unstable) and the rewards;
2. **advantages** from per-condition running statistics of the rewards (a buffer of 16 per
   condition that persists over epochs; the statistics of all the epoch's rewards until a condition
   has 16; population std, ``ddof = 0``), or with ``advantages: grpo`` within each group of the
   samples of one condition in one sampled batch (Flow-GRPO); clipped to +-5;
3. **training**: ``num_inner_epochs`` passes over the epoch's samples in shuffled minibatches of
   ``train_batch_size``, each sample training on a ``timestep_fraction`` of its stochastic steps
   (the first ones of a fresh random permutation per sample and pass), gradients accumulated over
   those steps (and micro-batches) into **one optimiser step per minibatch**, clipped to norm 1, with
   the PPO loss ``mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)))``.

The first minibatch of an epoch sees the policy that sampled it (ratio exactly 1); every later one
sees a policy that has moved, so the ratio departs from 1 and the clip acts. One Lightning training
step is one optimiser step (``max_steps``, ``val_check_interval`` and checkpoint intervals count
optimiser steps); the step that starts an epoch samples it first. ``kl_coef > 0`` adds Flow-GRPO's
penalty ``kl_coef KL(p_theta(. | x_t) || p_base(. | x_t))`` per trained (sample, step), in closed form for two
Gaussians of one standard deviation, the frozen base model's mean computed with the adapters disabled (on the
exact KL's scale: Flow-GRPO's beta is ``kl_coef / |dt|``); ``skip_last_step`` and ``skip_zero_advantage`` are
Flow-GRPO's skipping of the last step and of the samples of zero advantage.
docs/algorithms.md, section 6.
"""

from __future__ import annotations

import json
from collections import defaultdict, deque
from pathlib import Path
from typing import Optional

import torch

from baselines.common import FinetuneModule, adapters_disabled
from tsf.errors import ConfigError
from tsf.samplers.base import chunked, sample_seed


def mean_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gaussian log-density averaged over dimensions (DDPO's per-step log-probability)."""
    var = std.expand_as(mean) ** 2
    return (-0.5 * ((x - mean) ** 2 / var + torch.log(2 * torch.pi * var))).flatten(1).mean(1)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, s^2 I) || N(ref_mean, s^2 I))`` per row, averaged over dimensions as :func:`mean_log_prob`
    is: ``mean over dims of (mean - ref_mean)^2 / (2 s^2)`` (two Gaussians of one standard deviation)."""
    return ((mean - ref_mean) ** 2 / (2 * std.expand_as(mean) ** 2)).flatten(1).mean(1)


def group_advantages(groups: list, rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Flow-GRPO's group-relative advantages: ``(r - mean) / (std + eps)`` over the rows of each group (rows with
    equal ``groups`` keys), population std (``ddof = 0``); a group's advantages have mean 0 (a group of one
    reward, or of equal ones, gets 0)."""
    out = torch.empty_like(rewards)
    r = rewards.detach().cpu().double()
    for key in dict.fromkeys(groups):
        rows = [j for j, g in enumerate(groups) if g == key]
        pool = r[rows]
        mean, std = pool.mean(), pool.std(correction=0)
        out[rows] = ((pool - mean) / (std + eps)).to(out.dtype).to(out.device)
    return out


class PerConditionStats:
    """Running reward statistics per condition (the reference's ``PerPromptStatTracker``).

    Each condition keeps its last ``size`` rewards; a condition with at least ``min_count`` of them is
    normalised by their mean and population std, one with fewer by those of all the rewards of the
    call. ``advantage = (r - mean) / (std + 1e-6)``.
    """

    def __init__(self, size: int = 16, min_count: int = 16) -> None:
        self.size, self.min_count = size, min_count
        self.buffers: dict = defaultdict(lambda: deque(maxlen=size))

    def advantages(self, conditions: list, rewards: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rewards)
        r = rewards.detach().cpu().double()
        for key in dict.fromkeys(conditions):
            rows = [j for j, c in enumerate(conditions) if c == key]
            self.buffers[key].extend(r[rows].tolist())
            pool = torch.tensor(list(self.buffers[key]), dtype=torch.float64) \
                if len(self.buffers[key]) >= self.min_count else r
            mean, std = pool.mean(), pool.std(correction=0)  # population std, as numpy's np.std
            out[rows] = ((r[rows] - mean) / (std + 1e-6)).to(out.dtype).to(out.device)
        return out

    def state_dict(self) -> dict:
        return {str(k): list(v) for k, v in self.buffers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.buffers.clear()
        for k, v in state.items():
            key = None if k == "None" else (int(k) if k.lstrip("-").isdigit() else k)
            self.buffers[key].extend(v)


class DDPO(FinetuneModule):
    """DDPO with PPO clipping (the reference defaults: clip 1e-4, advantages clipped to 5, AdamW lr 3e-4
    and weight decay 1e-4, grad clip 1, statistics buffer 16 with min count 16).

    Args:
        batch_size: trajectories per sampled batch, over all processes.
        num_batches_per_epoch: sampled batches per epoch (``N = num_batches_per_epoch * batch_size``
            samples per epoch).
        train_batch_size: trajectories per optimiser step, over all processes (``None``: ``batch_size``);
            it must divide ``N``: an epoch is ``N / train_batch_size * num_inner_epochs`` optimiser steps.
        num_inner_epochs: passes over each epoch's samples (a fresh shuffle each).
        clip_range: PPO's ``eps``.
        adv_clip: advantage clip.
        timestep_fraction: fraction of the (stochastic) steps each sample trains on per pass.
        micro_batch: samples per backward pass on a rank (gradients accumulate over samples and
            timesteps; ``None``: a rank's share of the minibatch at once).
        grad_clip: gradient-norm clip.
        stats_buffer_size, stats_min_count: the per-condition reward statistics (see
            :class:`PerConditionStats`).
        advantages: ``ddpo`` (the per-condition running statistics above) or ``grpo``: Flow-GRPO's
            group-relative advantages (:func:`group_advantages`), a group being the ``G`` samples of one
            condition in one sampled batch (``G = batch_size / len(conditions)``, at least 2).
        kl_coef: weight of the KL penalty to the frozen base model (0: none), on the exact KL's scale: Flow-GRPO's
            penalty is the exact KL times the step's ``|dt|``, so its ``beta`` is ``kl_coef / |dt|`` (tsf's 0.04 is
            Flow-GRPO's 0.4 at T = 10 uniform steps).
        skip_last_step: do not train on the chain's last step (``T - 1``), as Flow-GRPO does (DDIM's last step,
            deterministic, is never trained).
        skip_zero_advantage: leave samples whose advantage is exactly 0 (a group of equal rewards) out of the
            training pairs, as Flow-GRPO does: no loss, no KL, not in the mean's count.
        (the rest as :class:`~baselines.common.FinetuneModule`)

    The base model's kernel must be stochastic: DDIM with ``eta = 1`` or a flow model with noise (the Linear-SDE,
    the VP-SDE; not ``diffusion: none``). A step without noise (DDIM's last, a flow's ``last_step: tweedie``)
    has no density and is not trained on.

    Under DDP every rank samples its share of each batch, the epoch's trajectories are gathered on
    every rank, and each rank trains on its share (``rank::world``) of every minibatch, whose order and
    timestep subsets come from generators seeded by ``(seed, epoch, pass)``: the run is the
    single-process run whatever the number of processes (its memory: the whole epoch on each rank).
    A checkpoint taken inside an epoch holds the epoch's trajectories (one at an epoch boundary,
    ``every_n_train_steps`` a multiple of the steps per epoch, holds none), so a resumed run continues
    exactly.
    """

    def __init__(self, *args, clip_range: float = 1e-4, adv_clip: float = 5.0, timestep_fraction: float = 1.0,
                 grad_clip: float = 1.0, micro_batch: Optional[int] = None, num_batches_per_epoch: int = 2,
                 train_batch_size: Optional[int] = None, num_inner_epochs: int = 1, stats_buffer_size: int = 16,
                 stats_min_count: int = 16, weight_decay: float = 1e-4, advantages: str = "ddpo",
                 kl_coef: float = 0.0, skip_last_step: bool = False, skip_zero_advantage: bool = False,
                 **kwargs) -> None:
        super().__init__(*args, weight_decay=weight_decay, **kwargs)
        if not 0 < timestep_fraction <= 1:
            raise ConfigError(f"timestep_fraction must be in (0, 1], got {timestep_fraction}")
        if getattr(self.base, "eta", None) is not None:  # a diffusion model
            if self.base.eta != 1.0:
                raise ConfigError("DDPO samples with DDIM eta = 1: set the base model's eta to 1")
        elif not self.base.is_stochastic:
            raise ConfigError(
                f"DDPO trains on the log-densities of a stochastic kernel, and {type(self.base).__name__} samples "
                "its ODE (diffusion: none, or diffusion_norm 0), which has none: set the base model's diffusion to "
                "square, linear or constant with diffusion_norm > 0 (the Linear-SDE; interpolant: vp for the VP-SDE)")
        if advantages not in ("ddpo", "grpo"):
            raise ConfigError(f"unknown advantages {advantages!r}; known: ddpo (per-condition running statistics), "
                              "grpo (group-relative, Flow-GRPO)")
        if advantages == "grpo" and self.batch_size // len(self.conditions) < 2:
            raise ConfigError(f"advantages: grpo normalises within the samples of one condition in a sampled batch, "
                              f"and batch_size {self.batch_size} gives some of the {len(self.conditions)} conditions "
                              f"fewer than 2: set batch_size to at least {2 * len(self.conditions)}")
        if kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {kl_coef}")
        self.advantages, self.kl_coef = advantages, float(kl_coef)
        self.skip_last_step, self.skip_zero_advantage = bool(skip_last_step), bool(skip_zero_advantage)
        if self.skip_last_step and self.base.num_steps < 2:
            raise ConfigError("skip_last_step leaves a 1-step chain nothing to train on")
        if micro_batch is not None and micro_batch < 1:
            raise ConfigError(f"micro_batch must be >= 1, got {micro_batch}")
        for name, v in (("num_batches_per_epoch", num_batches_per_epoch), ("num_inner_epochs", num_inner_epochs),
                        ("stats_buffer_size", stats_buffer_size), ("stats_min_count", stats_min_count)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}")
        self.train_batch_size = self.batch_size if train_batch_size is None else int(train_batch_size)
        per_epoch = num_batches_per_epoch * self.batch_size
        if self.train_batch_size < 1 or per_epoch % self.train_batch_size:
            raise ConfigError(f"train_batch_size ({self.train_batch_size}) must divide the samples per epoch, "
                              f"num_batches_per_epoch * batch_size = {per_epoch}")
        self.clip_range, self.adv_clip, self.timestep_fraction, self.grad_clip = (
            clip_range, adv_clip, timestep_fraction, grad_clip)
        self.micro_batch = micro_batch
        self.num_batches_per_epoch, self.num_inner_epochs = int(num_batches_per_epoch), int(num_inner_epochs)
        self.samples_per_epoch = per_epoch
        self.minibatches_per_pass = per_epoch // self.train_batch_size
        #: optimiser steps per epoch
        self.steps_per_epoch = self.minibatches_per_pass * self.num_inner_epochs
        self.stats = PerConditionStats(stats_buffer_size, stats_min_count)
        self.automatic_optimization = False
        self.rollouts: Optional[dict] = None  # the current epoch's trajectories (see sample_epoch)

    # -- sampling -----------------------------------------------------------------------------
    def _transition(self, x: torch.Tensor, i: int, c: torch.Tensor):
        # padded to the model's min_rows: a row's kernel is bitwise the same in a sampled batch and in
        # any minibatch, so the unchanged policy reproduces the stored log-probabilities exactly
        return chunked(lambda xs, cs: self.base.transition(xs, i, cs), max(len(x), 1), x, c,
                       min_rows=self.base.min_rows)

    @torch.no_grad()
    def sample_batch(self, index: int) -> dict:
        """This rank's trajectories of sampled batch ``index`` with the current policy."""
        model = self.base
        conds, noise = self.training_batch(index)
        c = model.encode_conditions(conds)
        x = model.prior(noise.randn(1, model.sample_shape))
        chain, steps, logps = [x], [], []
        for i in range(model.num_steps):
            tr = self._transition(x, i, c)
            x = tr.sample(noise.randn(1, model.sample_shape))
            chain.append(x)
            if float(tr.std.max()) > 0 and not (self.skip_last_step and i == model.num_steps - 1):
                # (the last DDIM step is deterministic: no log-probability; skip_last_step: not trained)
                steps.append(i)
                logps.append(mean_log_prob(x, tr.mean, tr.std))
        rewards = chunked(lambda xs, cs: self.reward(model.decode(xs), cs), len(x), x, conds,
                          min_rows=model.min_rows)
        return {"chain": torch.stack(chain, 1), "old_logp": torch.stack(logps, 1), "rewards": rewards.float(),
                "steps": steps}

    def sample_epoch(self, epoch: int) -> dict:
        """Sample epoch ``epoch`` with the current policy: every rank's trajectories in global id order
        (``chain [N, T + 1, ...]``: the states before and after each step; ``old_logp [N, S]`` over the
        ``S`` stochastic ``steps``), their rewards and clipped advantages."""
        parts = [self.sample_batch(epoch * self.num_batches_per_epoch + b) for b in range(self.num_batches_per_epoch)]
        out = {k: torch.cat([self.gather_global(p[k]) for p in parts]) for k in ("chain", "old_logp", "rewards")}
        first = epoch * self.samples_per_epoch
        out["ids"] = torch.arange(first, first + self.samples_per_epoch)
        if self.advantages == "grpo":
            adv = group_advantages(self.groups_of(out["ids"].tolist()), out["rewards"])
        else:
            adv = self.stats.advantages(self.conditions_of(out["ids"].tolist()), out["rewards"])
        out.update(adv=adv.clamp(-self.adv_clip, self.adv_clip), steps=parts[0]["steps"], epoch=epoch)
        return out

    def groups_of(self, ids: list[int]) -> list[tuple]:
        """GRPO's group of each trajectory id: its sampled batch and its condition."""
        return [(i // self.batch_size, c) for i, c in zip(ids, self.conditions_of(ids))]

    def schedule(self, epoch: int, inner: int, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pass ``inner`` of epoch ``epoch``: the sample order ``[N]`` and each sample's training steps
        ``[N, n_train]`` (indices into the stochastic steps: the first ``n_train`` of a fresh random
        permutation per sample), from a generator seeded by ``(seed, epoch, pass)`` alone."""
        g = torch.Generator().manual_seed(sample_seed(self.seed + 2000003, epoch * self.num_inner_epochs + inner))
        order = torch.randperm(self.samples_per_epoch, generator=g)
        perms = torch.stack([torch.randperm(num_steps, generator=g) for _ in range(self.samples_per_epoch)])
        return order, perms[:, :self.train_timesteps(num_steps)]

    def train_timesteps(self, num_steps: int) -> int:
        return max(1, int(self.timestep_fraction * num_steps))

    # -- one optimiser step ---------------------------------------------------------------------
    def training_step(self, batch, _):
        model, k = self.base, self.global_step
        epoch, pos = divmod(k, self.steps_per_epoch)
        inner, m = divmod(pos, self.minibatches_per_pass)
        if self.rollouts is None or self.rollouts["epoch"] != epoch:
            self.rollouts = self.sample_epoch(epoch)
        elif self.rollouts["chain"].device != self.device:  # restored from a checkpoint
            self.rollouts = {key: v.to(self.device) if torch.is_tensor(v) and key != "ids" else v
                             for key, v in self.rollouts.items()}
        ro = self.rollouts
        steps = ro["steps"]
        order, chosen = self.schedule(epoch, inner, len(steps))
        rank, world = self.rank_and_world()
        rows = order[m * self.train_batch_size:(m + 1) * self.train_batch_size]
        if self.skip_zero_advantage:  # Flow-GRPO: samples of zero advantage are not trained on
            rows = rows[ro["adv"][rows.to(ro["adv"].device)].cpu() != 0]
        mine = rows[rank::world]
        n_train = chosen.shape[1]
        count = max(len(rows) * n_train, 1)  # (sample, timestep) pairs of the minibatch, over all ranks
        mb = self.micro_batch or max(len(mine), 1)
        opt = self.optimizers()
        opt.zero_grad()
        # loss, clipped pairs, sum of squared log-ratios (approx_kl), KL to the base model, over this rank's pairs
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        with self.no_gradient_sync():  # one gradient all-reduce per step, below
            for j, step in enumerate(steps):  # one network call per timestep over the rows trained on it
                sel = mine[(chosen[mine] == j).any(1)]
                for s in range(0, len(sel), mb):
                    r = sel[s:s + mb]
                    r_dev = r.to(self.device)
                    c = model.encode_conditions(self.conditions_of(ro["ids"][r].tolist()))
                    x_t = ro["chain"][r_dev, step]
                    tr = self._transition(x_t, step, c)
                    diff = mean_log_prob(ro["chain"][r_dev, step + 1], tr.mean, tr.std) - ro["old_logp"][r_dev, j]
                    ratio = torch.exp(diff)
                    a = ro["adv"][r_dev]
                    loss = torch.maximum(-a * ratio, -a * ratio.clamp(1 - self.clip_range, 1 + self.clip_range))
                    kl = torch.zeros_like(loss)
                    if self.kl_coef:
                        with torch.no_grad(), adapters_disabled(model):
                            ref = self._transition(x_t, step, c).mean
                        kl = gaussian_kl(tr.mean, ref, tr.std)
                        loss = loss + self.kl_coef * kl
                    loss = loss.sum() / count
                    self.manual_backward(loss)
                    d = diff.detach().double()
                    sums += torch.stack([loss.detach().double(),
                                         ((ratio.detach() - 1).abs() > self.clip_range).sum().double(), (d * d).sum(),
                                         kl.detach().double().sum()])
        self.sum_gradients_over_ranks()
        sums = self.sum_over_ranks(sums).cpu()
        self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        rewards = ro["rewards"]
        metrics = {"loss": float(sums[0]), "clipfrac": float(sums[1]) / count, "approx_kl": 0.5 * float(sums[2]) / count,
                   "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(correction=0))}
        if self.kl_coef:
            metrics["kl"] = float(sums[3]) / count  # mean KL to the base model per (sample, step) pair
        self.log_dict({f"train/{key}": v for key, v in metrics.items()}, prog_bar=False)
        self.log("train/reward", metrics["reward_mean"], prog_bar=True)
        if self.trainer.is_global_zero:  # the per-step curve, readable without wandb
            with self.metrics_path().open("a") as f:
                f.write(json.dumps({"step": k + 1, "epoch": epoch, "inner_epoch": inner, **metrics}) + "\n")

    # -- run files and checkpoints --------------------------------------------------------------
    #: metrics.jsonl: one line per optimiser step (a fresh run starts it anew, a resumed one continues it)
    run_curves = ("val_metrics.jsonl", "metrics.jsonl")

    def metrics_path(self) -> Path:
        path = Path(self.trainer.default_root_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ddpo_stats"] = self.stats.state_dict()
        if self.rollouts is not None and self.global_step % self.steps_per_epoch:  # inside an epoch
            checkpoint["ddpo_rollouts"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.rollouts.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.stats.load_state_dict(checkpoint.get("ddpo_stats", {}))
        self.rollouts = checkpoint.get("ddpo_rollouts")
