"""The shared evaluator (ALGORITHMS.md section 8): every sample of every method is judged here.

A torchmetrics ``Metric``: per-sample states are concatenated (and synced across
processes by torchmetrics, uneven shards included), ``compute`` returns the flat
dict of DESIGN.md's metric keys:

``target/mean``, ``target/median``, ``target/q90``, ``cross/<reward>/mean``,
``diversity/pairwise``, ``diversity/vendi``, ``fidelity/fd`` (when a reference set of
plain base samples is given), ``compute/nfe``, ``compute/nfe_grad``,
``compute/reward_calls``, ``compute/reward_grad_calls``, ``compute/seconds`` (per sample).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.image.fid import _compute_fid
from torchmetrics.utilities import dim_zero_cat

from tsf.rewards.base import Reward
from tsf.samplers.base import COMPUTE_KEYS, SampleBatch, chunked


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[n, d]``."""
    a, b = a.double(), b.double()
    return float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T)))


def pairwise_cosine_distance(features: Tensor) -> float:
    """Mean ``1 - cos`` over distinct pairs, in O(n d)."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    u = torch.nn.functional.normalize(features.double(), dim=1)
    s = u.sum(0)
    mean_cos = (s @ s - n) / (n * (n - 1))
    return float(1 - mean_cos)


def vendi_score(features: Tensor) -> float:
    """Vendi score ``exp(-sum l log l)`` of the eigenvalues ``l`` of ``K / n``, ``K`` the cosine kernel.

    The non-zero eigenvalues of ``U U^T / n`` equal those of ``U^T U / n`` (``d x d``).
    """
    n = features.shape[0]
    if n < 1:
        return float("nan")
    u = torch.nn.functional.normalize(features.double(), dim=1)
    lam = torch.linalg.eigvalsh(u.T @ u / n).clamp(min=0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


class Evaluator(Metric):
    """Target reward, cross-rewards, diversity, fidelity and compute of a set of samples.

    Args:
        target: the reward being optimised.
        cross: rewards evaluated on the same samples, never used for guidance.
        features: a reward with a ``features`` method for diversity and fidelity
            (on digits: the holdout classifier); ``None`` uses the raw samples.
        max_batch: most images in one reward or feature call.
    """

    full_state_update = False

    def __init__(self, target: Reward, cross: Sequence[Reward] = (), features: Optional[Reward] = None,
                 max_batch: int = 4096, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_batch = max_batch
        self.target = target
        self.cross = torch.nn.ModuleList(cross)
        self.feature_reward = features
        self.add_state("target_values", default=[], dist_reduce_fx="cat")
        for i in range(len(self.cross)):
            self.add_state(f"cross_{i}", default=[], dist_reduce_fx="cat")
        self.add_state("features", default=[], dist_reduce_fx="cat")
        for key in COMPUTE_KEYS:
            self.add_state(f"compute_{key}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.reference: Optional[Tensor] = None

    def cross_names(self) -> list[str]:
        return [r.name for r in self.cross]

    @torch.no_grad()
    def featurize(self, images: Tensor) -> Tensor:
        if self.feature_reward is None:
            return images.flatten(1).float()
        return chunked(self.feature_reward.features, self.max_batch, images).float()

    def set_reference(self, images: Tensor) -> None:
        """Plain base-model samples that ``fidelity/fd`` compares against."""
        self.reference = self.featurize(images.to(self.device)).cpu()

    @torch.no_grad()
    def rewards(self, batch: SampleBatch, conditions: Sequence[Any]) -> dict[str, Tensor]:
        """Target and cross rewards of a batch's samples, by reward name (the input of :meth:`update`)."""
        images = batch.images if batch.images is not None else batch.x0
        return {r.name: chunked(r, self.max_batch, images, list(conditions)).float()
                for r in [self.target, *self.cross]}

    @torch.no_grad()
    def update(self, batch: SampleBatch, rewards: dict[str, Tensor]) -> None:  # type: ignore[override]
        """Add a batch of final samples with their rewards from :meth:`rewards`."""
        images = batch.images if batch.images is not None else batch.x0
        self.target_values.append(rewards[self.target.name])
        for i, r in enumerate(self.cross):
            getattr(self, f"cross_{i}").append(rewards[r.name])
        self.features.append(self.featurize(images))
        for key in COMPUTE_KEYS:
            setattr(self, f"compute_{key}", getattr(self, f"compute_{key}") + float(batch.compute.get(key, 0.0)))
        self.count += len(batch)

    def compute(self) -> dict[str, float]:
        target = dim_zero_cat(self.target_values).double()
        feats = dim_zero_cat(self.features)
        n = max(float(self.count), 1.0)
        out = {
            "target/mean": float(target.mean()),
            "target/median": float(target.median()),
            "target/q90": float(torch.quantile(target, 0.9)),
        }
        for i, r in enumerate(self.cross):
            out[f"cross/{r.name}/mean"] = float(dim_zero_cat(getattr(self, f"cross_{i}")).double().mean())
        out["diversity/pairwise"] = pairwise_cosine_distance(feats)
        out["diversity/vendi"] = vendi_score(feats)
        if self.reference is not None:
            out["fidelity/fd"] = frechet_distance(feats.cpu(), self.reference)
        for key in COMPUTE_KEYS:
            out[f"compute/{key}"] = float(getattr(self, f"compute_{key}")) / n
        return out
