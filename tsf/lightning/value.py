"""ValueModule: trains the SVDD-MC value network with Lightning ``fit`` (SVDD paper, Algorithm 3).

Rollouts of the base model are drawn once (per-sample seeds, every grid time kept);
``v_phi(x_t, t, class)`` regresses the reward of each rollout's final sample on its
states at all grid times. ``loss: mse`` (plain MSE on ``r``, the practical default) or
``loss: exp`` (MSE on ``exp(r / alpha)``, the paper's). The trained network is written to
``<trainer.default_root_dir>/value.safetensors``, which a sampler config names through
``tsf.samplers.LearnedValue``; Lightning checkpoints go beside it (resume with ``--ckpt_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from tsf.errors import ConfigError
from tsf.models.base import BaseModel
from tsf.models.digits import NUM_CLASSES, ResidualMLPDenoiser, save_network
from tsf.rewards.base import Reward, build_reward
from tsf.samplers.base import Noise, Sampler
from tsf.samplers.value import value_time


class ValueModule(L.LightningModule):
    """Fit ``v_phi(x_t, t, class) ~ r(x0)`` on base-model rollouts.

    Args:
        base: the base model whose rollouts define the value.
        reward: the reward (a registered name or a Reward).
        conditions: classes cycled over the rollouts (the value is conditioned on them; ``null``
            entries use the null label).
        num_rollouts: number of base trajectories (each contributes every grid time).
        loss: ``mse`` on ``r`` or ``exp`` on ``exp(r / alpha)``.
        alpha: temperature of the ``exp`` loss.
        lr, batch_size: AdamW learning rate and batch size.
        width, depth, hidden: the residual MLP's size.
        seed: seed of the rollouts.
        output: file name of the exported network in ``trainer.default_root_dir``.
    """

    def __init__(self, base: BaseModel, reward: Union[str, Reward] = "digit", conditions: Optional[list[Any]] = None,
                 num_rollouts: int = 4096, loss: Literal["mse", "exp"] = "mse", alpha: float = 1.0,
                 lr: float = 1e-3, batch_size: int = 1024, width: int = 256, depth: int = 3, hidden: int = 512,
                 seed: int = 0, output: str = "value.safetensors") -> None:
        super().__init__()
        if loss not in ("mse", "exp"):
            raise ConfigError(f"unknown loss {loss!r}; known: mse, exp")
        if num_rollouts < 1:
            raise ConfigError(f"num_rollouts must be >= 1, got {num_rollouts}")
        self.base, self.reward = base, build_reward(reward)
        self.conditions = list(conditions) if conditions else [None]
        self.reward.check_conditions(self.conditions)
        self.num_rollouts, self.loss_kind, self.alpha = int(num_rollouts), loss, float(alpha)
        self.lr, self.batch_size, self.seed, self.output = lr, batch_size, seed, output
        dim = base.value_dim
        self.net = ResidualMLPDenoiser(dim=dim, width=width, depth=depth, hidden=hidden, num_classes=NUM_CLASSES,
                                       out_dim=1)
        self.data: Optional[TensorDataset] = None

    @torch.no_grad()
    def rollouts(self) -> TensorDataset:
        """``(x_t, t, label, r(x0))`` for every grid time of ``num_rollouts`` base trajectories."""
        model, n, T = self.base.load(), self.num_rollouts, self.base.num_steps
        self.reward.load()
        conds = [self.conditions[i % len(self.conditions)] for i in range(n)]
        helper = Sampler()
        c = model.encode_conditions(conds)
        noise = Noise(self.seed, range(n), model.device)
        x = model.prior(noise.for_kernel(model, 1))
        xs, ts = [], []
        for i in range(T):
            xs.append(model.value_input(x).cpu())
            ts.append(value_time(model, i).expand(n).cpu())
            x = helper.transition(model, x, i, c).sample(noise.for_kernel(model, 1))
        r = helper.score(model, self.reward, x, conds).float().cpu()
        labels = torch.tensor([NUM_CLASSES if k is None else int(k) for k in conds])
        return TensorDataset(torch.cat(xs), torch.cat(ts), labels.repeat(T), r.repeat(T))

    def setup(self, stage: str) -> None:
        if self.data is None:
            self.data = self.rollouts()

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, generator=gen, drop_last=True)

    def training_step(self, batch, _):
        x, t, labels, r = batch
        v = self.net(x, t, labels).squeeze(1)
        if self.loss_kind == "mse":
            loss = F.mse_loss(v, r)
        else:
            loss = F.mse_loss(torch.exp(v / self.alpha), torch.exp(r / self.alpha))
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr)
        steps = max(1, self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
                                                   "interval": "step"}}

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / self.output
            save_network(self.net, path, {"reward": self.reward.name, "loss": self.loss_kind})
            print(f"value network: {path}")
