"""The recipes of ``tsf pretrain`` (:mod:`tsf.commands.pretrain`): what makes the embedded digits models.

Three Lightning ``fit`` runs on scikit-learn's digits (train split only):

1. the diffusion denoiser (eps-prediction, class-conditional with 10% null labels, EMA weights)
   on the whole train split;
2. the target classifier (MLP) on half A of the train split;
3. the cross classifier (CNN) on half B.

Then it measures what the README records: test accuracies, the fraction of 1,000 base
samples the cross classifier labels with confidence >= 0.9, and Frechet distances of
cross-classifier features (base samples vs real test digits; real half A vs real half B).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from tsf.models import digits as D


def _loader(x: Tensor, y: Tensor, batch_size: int, steps: int, seed: int) -> DataLoader:
    ds = TensorDataset(x, y)
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(ds, replacement=True, num_samples=batch_size * steps, generator=gen)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True)


def _cosine_adamw(params, lr: float, steps: int, weight_decay: float):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 50)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, 0.01, 1.0, warmup),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps - warmup))],
        milestones=[warmup],
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DenoiserTraining(L.LightningModule):
    """Eps-prediction loss ``|eps - eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t, c)|^2``."""

    def __init__(self, net: nn.Module, steps: int, lr: float = 1e-3, p_uncond: float = 0.1) -> None:
        super().__init__()
        self.net, self.steps, self.lr, self.p_uncond = net, steps, lr, p_uncond
        from diffusers import DDPMScheduler

        self.noise_scheduler = DDPMScheduler(**D.SCHEDULER_CONFIG)

    def training_step(self, batch, _):
        x, y = batch
        x0 = x * 2 - 1
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        eps = torch.randn_like(x0)
        xt = self.noise_scheduler.add_noise(x0, eps, t)
        labels = torch.where(torch.rand(x.shape[0], device=x.device) < self.p_uncond,
                             torch.full_like(y, D.NUM_CLASSES), y)
        loss = F.mse_loss(self.net(xt, t, labels), eps)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return _cosine_adamw(self.net.parameters(), self.lr, self.steps, weight_decay=0.0)


class FlowTraining(DenoiserTraining):
    """Flow matching on the linear path: ``|(eps - x0) - u_theta((1 - t) x0 + t eps, t, c)|^2``, ``t ~ U(0, 1)``
    (the network sees ``1000 t``, the scale of the diffusion timesteps)."""

    def training_step(self, batch, _):
        x, y = batch
        x0 = x * 2 - 1
        t = torch.rand(x.shape[0], device=x.device)
        eps = torch.randn_like(x0)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        labels = torch.where(torch.rand(x.shape[0], device=x.device) < self.p_uncond,
                             torch.full_like(y, D.NUM_CLASSES), y)
        loss = F.mse_loss(self.net(xt, t * D.FLOW_TIME_SCALE, labels), eps - x0)
        self.log("loss", loss, prog_bar=True)
        return loss


class MaskedTraining(DenoiserTraining):
    """Masked diffusion (MDLM's SUBS): each pixel token masked with probability ``1 - alpha(t)`` (linear: ``t``),
    ``t ~ U(0, 1)``, and the cross-entropy of the true level at the masked pixels (unweighted: every ``t``'s
    minimiser is the same posterior, so the ELBO's ``1 / t`` weight changes only the emphasis)."""

    def training_step(self, batch, _):
        x, y = batch
        tokens = (x * (D.LEVELS - 1)).round().long().flatten(1)  # the digits' native levels 0 .. 16
        t = torch.rand(x.shape[0], 1, device=x.device)
        masked = torch.rand(tokens.shape, device=x.device) < t
        xt = torch.where(masked, torch.full_like(tokens, D.LEVELS), tokens)
        labels = torch.where(torch.rand(x.shape[0], device=x.device) < self.p_uncond,
                             torch.full_like(y, D.NUM_CLASSES), y)
        logits = self.net(D.one_hot_tokens(xt), t[:, 0] * D.FLOW_TIME_SCALE, labels).view(-1, 64, D.LEVELS)
        loss = F.cross_entropy(logits[masked], tokens[masked])
        self.log("loss", loss, prog_bar=True)
        return loss


def augment(x: Tensor) -> Tensor:
    """Random 1-pixel shifts and a little pixel noise: robustness for classifying samples."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2, n), device=x.device)
    rows = (torch.arange(8, device=x.device)[None, :] + dy[:, None])  # [n, 8]
    cols = (torch.arange(8, device=x.device)[None, :] + dx[:, None])
    out = padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    sigma = 0.1 * torch.rand(n, 1, 1, 1, device=x.device)
    return (out + sigma * torch.randn_like(out)).clamp(0, 1)


class ClassifierTraining(L.LightningModule):
    def __init__(self, net: nn.Module, steps: int, lr: float = 2e-3) -> None:
        super().__init__()
        self.net, self.steps, self.lr = net, steps, lr

    def training_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self.net(augment(x)), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return _cosine_adamw(self.net.parameters(), self.lr, self.steps, weight_decay=1e-4)


def _fit(module: L.LightningModule, loader: DataLoader, steps: int, ema: bool = False) -> None:
    callbacks = [EMAWeightAveraging(decay=0.999, update_starting_at_step=steps // 10)] if ema else []
    trainer = L.Trainer(max_steps=steps, max_epochs=1, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, loader)


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    return (net.eval()(x).argmax(1) == y).float().mean().item()


@torch.no_grad()
def quality(cross: nn.Module, base_images: Tensor, splits: D.DigitsSplits) -> dict:
    """Confidence >= 0.9 fraction of the cross classifier, and feature Frechet distances."""
    from tsf.evaluation import frechet_distance

    conf = cross(base_images).softmax(-1).max(-1).values
    real_conf = cross(splits.test_x).softmax(-1).max(-1).values
    feats = cross.features
    return {
        "base_confident_fraction": (conf >= 0.9).float().mean().item(),
        "test_confident_fraction": (real_conf >= 0.9).float().mean().item(),
        "fd_base_vs_test": frechet_distance(feats(base_images), feats(splits.test_x)),
        "fd_half_a_vs_half_b": frechet_distance(feats(splits.train_x[splits.half_a]),
                                                feats(splits.train_x[splits.half_b])),
    }


def pretrain_digits(out: Path, denoiser_steps: int = 15000, classifier_steps: int = 3000, seed: int = 0,
                    num_quality_samples: int = 1000) -> dict:
    out = Path(out)
    start = time.time()
    L.seed_everything(seed, verbose=False)
    splits = D.load_digits_splits(seed)
    report: dict = {"command": f"tsf pretrain digits --denoiser_steps {denoiser_steps} "
                               f"--classifier_steps {classifier_steps} --seed {seed}"}

    classifiers = {}
    for role, cls, half in (("target", D.MLPClassifier, splits.half_a), ("holdout", D.CNNClassifier, splits.half_b)):
        net = cls()
        t0 = time.time()
        _fit(ClassifierTraining(net, classifier_steps),
             _loader(splits.train_x[half], splits.train_y[half], 128, classifier_steps, seed), classifier_steps)
        net.eval()
        acc = accuracy(net, splits.test_x, splits.test_y)
        report[f"{role}_classifier"] = {"architecture": cls.__name__, "test_accuracy": acc,
                                        "train_size": len(half), "seconds": time.time() - t0}
        D.save_network(net, out / f"{D.CLASSIFIERS[role]}.safetensors", {"test_accuracy": acc})
        classifiers[role] = net.requires_grad_(False)

    net = D.ResidualMLPDenoiser()
    t0 = time.time()
    _fit(DenoiserTraining(net, denoiser_steps),
         _loader(splits.train_x, splits.train_y, 256, denoiser_steps, seed), denoiser_steps, ema=True)
    report["denoiser"] = {"architecture": "ResidualMLPDenoiser", "parameters": sum(p.numel() for p in net.parameters()),
                          "steps": denoiser_steps, "seconds": time.time() - t0}
    D.save_network(net, out / f"{D.DENOISER}.safetensors")

    # quality of the shipped (fp16-stored) denoiser, sampled as a user would
    from tsf.samplers.base import BaseSampler

    model = D.DigitsDiffusion(weights=str(out / f"{D.DENOISER}.safetensors")).load()
    t0 = time.time()
    batch = BaseSampler().sample(model, None, [None] * num_quality_samples, torch.arange(num_quality_samples), seed=seed)
    report["sampling_seconds_per_1000"] = (time.time() - t0) * 1000 / num_quality_samples
    report["quality"] = quality(classifiers["holdout"], batch.images, splits)
    report["quality"]["num_samples"] = num_quality_samples
    report["quality"]["sampler"] = f"DDIM eta={model.eta}, {model.num_steps} steps, unconditional"
    report["seconds_total"] = time.time() - start
    (out / "digits.json").write_text(json.dumps(report, indent=2))
    return report


def pretrain_digits_flow(out: Path, steps: int = 15000, seed: int = 0, num_quality_samples: int = 1000) -> dict:
    """The embedded digits flow model (same data, architecture and size as the diffusion denoiser)."""
    out = Path(out)
    start = time.time()
    L.seed_everything(seed, verbose=False)
    splits = D.load_digits_splits(seed)
    net = D.ResidualMLPDenoiser()
    _fit(FlowTraining(net, steps), _loader(splits.train_x, splits.train_y, 256, steps, seed), steps, ema=True)
    D.save_network(net, out / f"{D.FLOW}.safetensors")
    report: dict = {"command": f"tsf pretrain digits_flow --flow_steps {steps} --seed {seed}",
                    "flow": {"architecture": "ResidualMLPDenoiser", "parameters": sum(p.numel() for p in net.parameters()),
                             "steps": steps, "seconds": time.time() - start}}
    from tsf.samplers.base import BaseSampler

    cross = D.load_network(D.CLASSIFIERS["holdout"])
    for name, kw in (("linear_ode", dict(diffusion="none")), ("linear_sde", dict(diffusion="square")),
                     ("vp_sde", dict(interpolant="vp", diffusion="square"))):
        model = D.DigitsFlow(weights=str(out / f"{D.FLOW}.safetensors"), num_steps=50, **kw).load()
        t0 = time.time()
        batch = BaseSampler().sample(model, None, [None] * num_quality_samples, torch.arange(num_quality_samples),
                                     seed=seed)
        q = quality(cross, batch.images, splits)
        q["sampling_seconds_per_1000"] = (time.time() - t0) * 1000 / num_quality_samples
        report[f"quality_{name}"] = q
    report["seconds_total"] = time.time() - start
    (out / "digits_flow.json").write_text(json.dumps(report, indent=2))
    return report


def pretrain_digits_masked(out: Path, steps: int = 15000, seed: int = 0, num_quality_samples: int = 1000) -> dict:
    """The embedded masked (discrete) digits model: the residual MLP on one-hot pixel tokens, x0 logits out."""
    out = Path(out)
    start = time.time()
    L.seed_everything(seed, verbose=False)
    splits = D.load_digits_splits(seed)
    net = D.ResidualMLPDenoiser(dim=64 * (D.LEVELS + 1), out_dim=64 * D.LEVELS)
    _fit(MaskedTraining(net, steps), _loader(splits.train_x, splits.train_y, 256, steps, seed), steps, ema=True)
    D.save_network(net, out / f"{D.MASKED}.safetensors")
    report: dict = {"command": f"tsf pretrain digits_masked --masked_steps {steps} --seed {seed}",
                    "masked": {"architecture": "ResidualMLPDenoiser", "parameters": sum(p.numel() for p in net.parameters()),
                               "steps": steps, "seconds": time.time() - start}}
    from tsf.samplers.base import BaseSampler

    cross = D.load_network(D.CLASSIFIERS["holdout"])
    for T in (16, 64):
        model = D.DigitsMasked(weights=str(out / f"{D.MASKED}.safetensors"), num_steps=T).load()
        t0 = time.time()
        batch = BaseSampler().sample(model, None, [None] * num_quality_samples, torch.arange(num_quality_samples),
                                     seed=seed)
        q = quality(cross, batch.images, splits)
        q["sampling_seconds_per_1000"] = (time.time() - t0) * 1000 / num_quality_samples
        report[f"quality_T{T}"] = q
    report["seconds_total"] = time.time() - start
    (out / "digits_masked.json").write_text(json.dumps(report, indent=2))
    return report

